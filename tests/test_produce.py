"""Shard production (no Ray): whole shards, shuffled rows, special tokens dropped, exact resume."""

from collections import Counter

import numpy as np
import torch

from sae_ray.activations.hooks import capture_activations, resolve_hook
from sae_ray.activations.model import load_model
from sae_ray.activations.produce import iter_shards
from sae_ray.activations.text import pack_documents


def produce(model_dir, texts, **kw):
    model, tok = load_model(model_dir)
    hook = resolve_hook(model, layer=1, site="resid_post")
    return list(iter_shards(model, tok, [hook], texts, context_size=16, batch_size=3, shard_rows=50,
                            dtype="float32", **kw)), hook, model, tok


def test_shards_hold_every_kept_row_once(tiny_model_factory, sample_texts):
    shards, hook, model, tok = produce(tiny_model_factory("gpt2"), sample_texts)
    assert all(len(s) == 50 for s in shards[:-1]) and 0 < len(shards[-1]) <= 50
    batches = list(pack_documents(tok, sample_texts, 16, 3))
    assert sum(len(s) for s in shards) == sum(int(b.keep.sum()) for b in batches)
    assert Counter(np.concatenate([s.tokens for s in shards]).tolist()) == Counter(
        np.concatenate([b.input_ids[b.keep] for b in batches]).tolist())
    # rows are shuffled within a shard but each row is still its own token's activation
    first = batches[0]
    acts = capture_activations(model, [hook], torch.from_numpy(first.input_ids), torch.from_numpy(first.attention_mask))
    ref = acts[hook.name][torch.from_numpy(first.keep)].numpy()
    shard0 = shards[0]
    order = np.lexsort((shard0.position, shard0.doc_index))
    assert not np.array_equal(order, np.arange(len(shard0)))  # shuffled
    # batch 0 (at most 3 x 16 rows) lies wholly in shard 0: each of its rows is there
    got = shard0.acts[hook.name]
    assert len(ref) <= 50
    for row in ref:
        assert np.abs(got - row).max(axis=1).min() < 1e-5


def test_skip_rows_resumes_exactly(tiny_model_factory, sample_texts):
    full, *_ = produce(tiny_model_factory("gpt2"), sample_texts)
    done = sum(len(s) for s in full[:2])
    resumed, *_ = produce(tiny_model_factory("gpt2"), sample_texts, skip_rows=done)
    rest = np.concatenate([s.tokens for s in full[2:]])
    again = np.concatenate([s.tokens for s in resumed])
    assert Counter(again.tolist()) == Counter(rest.tolist())
    rows = lambda shards: sorted(map(tuple, np.concatenate([s.acts["blocks.1.hook_resid_post"] for s in shards]).round(5)))  # noqa: E731
    assert rows(resumed) == rows(full[2:])
    # each shard's shuffle is seeded by its place in the stream: a resumed run yields the very same shards
    assert len(resumed) == len(full) - 2
    for a, b in zip(resumed, full[2:]):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.acts["blocks.1.hook_resid_post"], b.acts["blocks.1.hook_resid_post"])


def test_model_and_storage_dtypes(tiny_model_factory, sample_texts):
    """The model computes in its own dtype; rows are stored in the buffer's (bfloat16 as uint16 bits), bit for bit."""
    model_dir = tiny_model_factory("gpt2")
    for model_dtype, dtype in [("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "bfloat16"), ("bfloat16", "float32")]:
        model, tok = load_model(model_dir, dtype=model_dtype)
        hook = resolve_hook(model, layer=1, site="resid_post")
        shard = next(iter_shards(model, tok, [hook], sample_texts, 16, 3, 50, dtype))
        got = shard.acts[hook.name]
        assert got.dtype == {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}[dtype]
        batch = next(iter(pack_documents(tok, sample_texts, 16, 3)))
        ref = capture_activations(model, [hook], torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
        ref = ref[hook.name][torch.from_numpy(batch.keep)].to(getattr(torch, dtype))
        ref = ref.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else ref.numpy()
        stored = {row.tobytes() for row in got}
        assert all(row.tobytes() in stored for row in ref), (model_dtype, dtype)  # batch 0 lies inside shard 0


def test_producer_rank_split_covers_documents_once(tiny_model_factory, sample_texts):
    model_dir = tiny_model_factory("gpt2")
    world = 3
    per_rank = [produce(model_dir, sample_texts[r::world], rank=r, world=world)[0] for r in range(world)]
    docs = np.concatenate([s.doc_index for shards in per_rank for s in shards])
    assert set(docs.tolist()) == set(range(len(sample_texts)))
    for r, shards in enumerate(per_rank):
        assert all((s.doc_index % world == r).all() for s in shards)
