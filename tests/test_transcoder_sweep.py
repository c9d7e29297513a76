"""Transcoders from config to registry: the mlp_in site of every model family, the reader's
(input, output) pairs, the sweep plan and preflight's checks, and a real sweep that trains,
evaluates (LM-level, spliced in place of the MLP) and registers a transcoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import sae_ray
from sae_ray import tracking
from sae_ray.activations.hooks import capture_activations, hook_name, resolve_hook, valid_hook_points
from sae_ray.buffer import ActivationBuffer, BufferReader
from sae_ray.buffer.split import held_out_rows
from sae_ray.cli import main
from sae_ray.config import ConfigError, validate_config
from sae_ray.eval.metrics import evaluate_sae
from sae_ray.preflight import preflight, transcoder_problems
from sae_ray.sweep import run_sweep
from sae_ray.sweep.plan import Stack
from test_end_to_end import sweep_raw, with_changes
from tiny_models import KINDS, write_jsonl

IN, OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
TRANSCODER = {"input": {"layer": 1, "site": "mlp_in"}, "output": {"site": "mlp_out"}}


def sweep_config(workdir, model_dir, data_path, **changes):
    """A transcoder sweep on a tiny model: no `hooks:` (the transcoder's two are added)."""
    raw = sweep_raw(workdir, model_dir, data_path)
    del raw["hooks"]
    raw.update(name="tc", producers={"count": 1, "num_cpus": 0.5}, eval={"tokens": 256, "batch_size": 4},
               sae={"architectures": ["topk"], "expansion_factor": [2], "k": [4, 8], "max_stack": 2, "transcoder": TRANSCODER})
    raw["train"]["total_tokens"] = 4096
    return validate_config(with_changes(raw, changes))


# -- mlp_in ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_mlp_in_is_what_the_mlp_reads(kind, tiny_model_factory, sample_texts):
    """mlp_in is the MLP's input (after the pre-MLP norm): the MLP applied to it gives mlp_out."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory(kind)
    model = (AutoModel if kind == "bert" else AutoModelForCausalLM).from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    hooks = [resolve_hook(model, 1, "mlp_in"), resolve_hook(model, 1, "mlp_out")]
    assert hooks[0].name == IN == hook_name(1, "mlp_in") and hooks[0].capture == "input"
    assert resolve_hook(model, module=IN) == hooks[0]  # the buffer name resolves back
    assert IN in valid_hook_points(model)
    batch = tok(sample_texts[:2], return_tensors="pt", padding=True)
    acts = capture_activations(model, hooks, batch["input_ids"], batch["attention_mask"])
    mlp = model.get_submodule(hooks[0].module_path)
    with torch.no_grad():
        if kind == "bert":  # intermediate -> output.dense (mlp_out: before the residual add and LayerNorm)
            out = model.get_submodule(hooks[1].module_path)(mlp(acts[IN]))
        else:
            out = mlp(acts[IN])
    torch.testing.assert_close(out, acts[OUT])


class _NoMLP(nn.Module):
    """Blocks with attention only: mlp_in cannot resolve."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"self_attn": nn.Linear(4, 4)}) for _ in range(2)])


def test_mlp_in_that_cannot_resolve_lists_what_can():
    with pytest.raises(ValueError, match=r"site 'mlp_in'.*sites that resolve there: \['resid_pre', 'resid_post', "
                                         r"'attn_out'\]"):
        resolve_hook(_NoMLP(), 1, "mlp_in")
    cfg = sweep_config("/tmp/unused", "unused", "unused")
    _, problems = transcoder_problems(cfg, _NoMLP(), {})
    assert len(problems) == 2
    assert problems[0].startswith("sae.transcoder.input: value {'layer': 1, 'site': 'mlp_in'}: cannot find the module")
    assert "hook points of this model: ['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post', 'blocks.0.hook_attn_out'" \
        in problems[0]
    assert problems[1].startswith("sae.transcoder.output: value {'layer': 1, 'site': 'mlp_out'}")


# -- config and preflight ------------------------------------------------------------------


def test_config_adds_the_transcoder_hooks_and_plans_transcoders(tmp_path, tiny_model_factory, sample_texts):
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    cfg = sweep_config(tmp_path / "w", tiny_model_factory("gpt2"), data,
                       hooks=[{"layer": 0, "site": "resid_post"}, {"layer": 1, "site": "mlp_out"}])
    # hooks: kept as given, the input added once (the output was there); output.layer = input.layer
    assert [h.model_dump(exclude_none=True) for h in cfg.hooks] == [
        {"layer": 0, "site": "resid_post"}, {"layer": 1, "site": "mlp_out"}, {"layer": 1, "site": "mlp_in"}]
    assert validate_config(cfg.model_dump(mode="json")).hooks == cfg.hooks  # a round trip adds nothing
    plan = preflight(cfg, check_buffer=False)
    assert plan.transcoder == (IN, OUT) and set(plan.hooks) == {"blocks.0.hook_resid_post", IN, OUT}
    assert sorted(plan.fingerprint["hooks"]) == sorted(plan.hooks)  # the buffer captures all three
    assert [t.name for t in plan.trials] == [f"topk-transcoder-d64-k{k}@{IN}->{OUT}" for k in (4, 8)]
    (stack,) = plan.stacks
    assert stack.name == f"topk-transcoder-d64-k4,k8@{IN}->{OUT}" and stack.reader_hooks == (IN, OUT)
    assert Stack.from_dict(stack.to_dict()) == stack
    c = stack.sae_configs(cfg)[0]
    assert (c.d_in, c.d_out, c.skip, c.hook_name, c.hook_layer, c.hook_name_out, c.hook_layer_out) == \
        (32, 32, False, IN, 1, OUT, 1)
    tags = plan.trials[0].tags()
    assert tags["hook"] == IN and tags["hook_out"] == OUT and tags["kind"] == "transcoder"

    skip = sweep_config(tmp_path / "w", tiny_model_factory("gpt2"), data,
                        sae={"transcoder": {**TRANSCODER, "skip": True}})
    trial = preflight(skip, check_buffer=False).trials[0]
    assert trial.name.startswith("topk-skip_transcoder-") and trial.sae_config(skip).skip


def test_bad_transcoder_configs_are_named(tmp_path, tiny_model_factory, sample_texts):
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    gpt2 = tiny_model_factory("gpt2")

    def problems(check=True, **transcoder) -> str:
        with pytest.raises(ConfigError) as e:
            cfg = sweep_config(tmp_path / "w", gpt2, data, sae={"transcoder": transcoder})
            if check:
                preflight(cfg, check_buffer=False)
        return str(e.value)

    # the same hook point twice: in the config, and where two spellings resolve to one hook
    assert "sae.transcoder.output: value {'layer': 1, 'site': 'mlp_in'}: the same hook point as input" in problems(
        check=False, input={"layer": 1, "site": "mlp_in"}, output={"site": "mlp_in"})
    assert f"sae.transcoder.output: value {IN!r}: the same hook point as input" in problems(
        input={"layer": 1, "site": "mlp_in"}, output={"module": IN})
    # an output before its input: the layers do not match where the user meant them to
    text = problems(input={"layer": 1, "site": "mlp_in"}, output={"layer": 0, "site": "mlp_out"})
    assert "sae.transcoder.output: value 'blocks.0.hook_mlp_out': comes before (or at) input" in text
    assert "e.g. blocks.1.hook_mlp_out for input mlp_in" in text
    assert "comes before" in problems(input={"layer": 1, "site": "mlp_out"}, output={"site": "mlp_in"})
    # a layer out of range, and a site that is not a site
    assert "sae.transcoder.input: value {'layer': 9, 'site': 'mlp_in'}: layer 9 out of range" in problems(
        input={"layer": 9, "site": "mlp_in"}, output={"layer": 9, "site": "mlp_out"})
    assert "sae.transcoder.input.site" in problems(check=False, input={"layer": 1, "site": "mlp_middle"}, output={})
    # a module input and an output site with no layer to take
    assert "sae.transcoder.output: value {'site': 'mlp_out'}: give a layer" in problems(
        check=False, input={"module": "transformer.h.1.mlp"}, output={"site": "mlp_out"})
    # an activation that is not one vector per token (as a pooler's [batch, d]): the shapes of
    # preflight's meta-device pass, here given as a pooler would give them
    from sae_ray.preflight import meta_model

    model, _, _ = meta_model(gpt2, None, False)
    cfg = sweep_config(tmp_path / "w", gpt2, data, sae={"transcoder": {"input": {"layer": 1, "site": "mlp_in"},
                                                                        "output": {"module": "transformer.ln_f"}}})
    names, found = transcoder_problems(cfg, model, {IN: (1, 4, 32), "transformer.ln_f": (1, 32)})
    assert names is None and len(found) == 1
    assert found[0].startswith("sae.transcoder.output: value {'module': 'transformer.ln_f'}: transformer.ln_f gives "
                               "activations of shape [1, 32] for a batch of 1 context of 4 tokens, not [1, 4, d]")
    assert transcoder_problems(cfg, model, {IN: (1, 4, 32), "transformer.ln_f": (1, 4, 32)}) == \
        ((IN, "transformer.ln_f"), [])  # a module after the input, one vector per token: accepted


# -- the reader's pairs --------------------------------------------------------------------

D_A, D_B, SHARD = 3, 5, 64


def pair_buffer(path) -> ActivationBuffer:
    """Two arrays; row r of the buffer has A = r (D_A wide) and B = -r (D_B wide), documents of 8 rows."""
    hooks = {IN: D_A, OUT: D_B}
    buf = ActivationBuffer.create_or_open(str(path), {"eval_fraction": 0.2}, hooks, SHARD, 16, capacity_rows=4 * SHARD)
    for s in range(4):
        rows = np.arange(s * SHARD, (s + 1) * SHARD, dtype=np.float32)
        acts = {IN: np.repeat(rows[:, None], D_A, 1), OUT: -np.repeat(rows[:, None], D_B, 1)}
        docs = (rows // 8).astype(np.int64)
        buf.commit_shard(s, SHARD, buf.write_shard(s, acts, np.arange(SHARD), docs, np.arange(SHARD) % 8))
    buf.mark_complete()
    return buf


def test_reader_pairs_are_the_same_rows_each_array_read_once(tmp_path, monkeypatch):
    buf = pair_buffer(tmp_path / "buf")
    reads: list[tuple[str, int]] = []
    read = buf.read_tensor
    monkeypatch.setattr(buf, "read_tensor", lambda hook, shard: reads.append((hook, shard)) or read(hook, shard))
    reader = BufferReader(buf, (IN, OUT), batch_size=16, seed=3, shards_in_mix=2, prefetch=0, split="train")
    batches = []
    for x, y in reader:
        batches.append((x, y))
        if reader.epoch > 0:
            break
    first_epoch = batches[:-1]  # the last one is of epoch 1
    assert sorted(reads[:8]) == sorted((h, s) for h in (IN, OUT) for s in range(4))  # each array of each shard once
    assert len(reads) == 8 + 4  # the second epoch's first mix: 2 shards x 2 arrays
    seen = []
    for x, y in first_epoch:
        assert x.dtype == y.dtype == torch.float32 and x.shape == (16, D_A) and y.shape == (16, D_B)
        torch.testing.assert_close(y, -x[:, :1].expand(-1, D_B))  # row for row: B = -A
        assert (x == x[:, :1]).all()
        seen += x[:, 0].long().tolist()
    assert len(set(seen)) == len(seen)  # no row twice in an epoch
    held = set(held_out_rows(buf, IN, 10_000)[:, 0].long().tolist())
    assert held and not held & set(seen)  # the held-out documents are not trained on

    # resume: a reader from a state yields exactly what comes next
    reader = BufferReader(buf, (IN, OUT), batch_size=16, seed=3, shards_in_mix=2, prefetch=1, split="train")
    it = iter(reader)
    for _ in range(3):
        next(it)
    state = reader.state_dict()
    assert state["hook"] == [IN, OUT]
    expected = [next(it) for _ in range(4)]
    reader.close()
    again = BufferReader(buf, (IN, OUT), batch_size=16, seed=3, shards_in_mix=2, prefetch=1, split="train", state=state)
    for (x, y), (x2, y2) in zip(expected, iter(again)):
        torch.testing.assert_close(x, x2)
        torch.testing.assert_close(y, y2)
    again.close()
    with pytest.raises(ValueError, match=r"state was saved with hook=\['blocks.1.ln2.hook_normalized', "
                                         r"'blocks.1.hook_mlp_out'\] but this reader has hook='blocks.1.ln2"):
        BufferReader(buf, IN, batch_size=16, seed=3, shards_in_mix=2, split="train", state=state)
    with pytest.raises(KeyError, match="has no hook 'nope'"):
        BufferReader(buf, (IN, "nope"), batch_size=16)


def test_held_out_pairs_are_the_same_rows(tmp_path, monkeypatch):
    buf = pair_buffer(tmp_path / "buf")
    reads: list[str] = []
    read = buf.read_tensor
    monkeypatch.setattr(buf, "read_tensor", lambda hook, shard: reads.append(hook) or read(hook, shard))
    x, y = held_out_rows(buf, (IN, OUT), 20)
    assert len(x) == len(y) == 20 and x.shape[1] == D_A and y.shape[1] == D_B
    torch.testing.assert_close(y, -x[:, :1].expand(-1, D_B))
    assert reads == [IN, OUT] * (len(reads) // 2) and reads  # each array once per shard it took rows from
    torch.testing.assert_close(x, held_out_rows(buf, IN, 20))  # the same rows as the input alone


# -- a real sweep --------------------------------------------------------------------------


def test_transcoder_sweep_end_to_end(tmp_path, tiny_model_factory, sample_texts, local_ray, capsys):
    model_dir = tiny_model_factory("gpt2")
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts * 3)
    cfg = sweep_config(tmp_path / "work", model_dir, data)
    result = run_sweep(cfg)
    assert len(result.rows) == 2 and all(r["hook"] == IN and r["hook_out"] == OUT for r in result.rows)

    buffer = ActivationBuffer.open(cfg.buffer_path())
    assert set(buffer.hooks) == {IN, OUT}
    client = tracking.client_for(cfg.tracking_uri())
    name = tracking.registry_name(model_dir, IN)
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2
    for v in versions:
        assert v.tags["hook_out"] == OUT and v.tags["kind"] == "transcoder"
        run = client.get_run(v.run_id)
        assert run.data.tags["sae_ray.hook_out"] == OUT and run.data.tags["sae_ray.sae_kind"] == "transcoder"
        assert "final/output_scale" in run.data.metrics
        sae = sae_ray.load_sae(f"models:/{name}/{v.version}", tracking_uri=cfg.tracking_uri())
        assert sae.cfg.is_transcoder and sae.cfg.hook_name == IN and sae.cfg.hook_name_out == OUT
        assert sae.cfg.d_out == 32 and not sae.cfg.skip
        x, y = held_out_rows(buffer, (IN, OUT), int(v.tags["eval_rows"]))
        again = evaluate_sae(sae, x, target=y)
        assert again["fvu"] == pytest.approx(run.data.metrics["final/fvu"], rel=1e-4, abs=1e-6)
        assert again["fvu"] < 1.0
        assert again["fvu"] == pytest.approx(float(v.tags["fvu"]), rel=1e-4, abs=1e-6)
        # spliced in place of the MLP: CE loss recovered against the MLP's output zero-ablated
        for metric in ("ce_loss_score", "kl_div_score", "delta_lm_loss"):
            assert float(v.tags[metric]) == pytest.approx(run.data.metrics[f"lm/{metric}"], rel=1e-4, abs=1e-6)
        assert run.data.metrics["lm/ce_loss_with_ablation"] > run.data.metrics["lm/ce_loss_without_sae"]
        assert run.data.metrics["lm/kl_div_with_sae"] >= 0

    # steering writes a latent's decoder direction where the transcoder writes: the MLP's output
    path = tmp_path / "tc.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    steer = ["steer", f"{name}/1", "--config", str(path), "--latent", "1", "--prompt", "The cat", "--max-new-tokens", "3"]
    assert main([*steer, "--strength", "20"]) == 0
    assert f"(latent 1, strength 20.0, at {OUT})" in capsys.readouterr().out
    assert main([*steer, "--clamp", "5"]) != 0  # read at one hook, written at another: refused, named
    assert "is a transcoder" in capsys.readouterr().err


# -- LM-level evaluation: spliced in place of the MLP ----------------------------------------


def test_lm_eval_splices_the_transcoder_in_place_of_the_mlp(tiny_model_factory, sample_texts):
    """A transcoder that outputs zero is the MLP zero-ablated (CE loss recovered 0); one that
    outputs the mean is its mean ablation; one whose skip connection copies its input puts
    mlp_in where mlp_out was, and its FVU is that of mlp_in against mlp_out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_ray.eval.lm import activation_mean, evaluate_lm, held_out_contexts
    from sae_ray.eval.metrics import fvu
    from sae_ray.sae import SAEConfig, create_sae

    path = tiny_model_factory("gpt2")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    h_in, h_out = resolve_hook(model, 1, "mlp_in"), resolve_hook(model, 1, "mlp_out")
    ctx = held_out_contexts(tok, sample_texts * 20, 0.3, 24, n_tokens=200)
    mean = activation_mean(model, h_out, ctx)
    saes = []
    for b_dec, skip in ((torch.zeros(32), False), (mean, False), (torch.zeros(32), True)):
        sae = create_sae(SAEConfig("topk", 32, 64, k=4, d_out=32, skip=skip, hook_name=IN, hook_name_out=OUT))
        with torch.no_grad():
            sae.W_dec.zero_()
            sae.b_dec.copy_(b_dec)
            if skip:
                sae.W_skip.copy_(torch.eye(32))
        saes.append(sae.eval())
    ref, (zero, mean_row, copy) = evaluate_lm(model, h_out, ctx, saes, mean, batch_size=4, input_hook=h_in)
    assert zero["ce_loss_with_sae"] == pytest.approx(ref["ce_loss_with_ablation"], rel=1e-5)
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-5) and zero["kl_div_score"] == pytest.approx(0.0, abs=1e-5)
    assert mean_row["ce_loss_score_mean_ablation"] == pytest.approx(0.0, abs=1e-4)
    acts = capture_activations(model, [h_in, h_out], ctx.input_ids, ctx.attention_mask)
    keep = ctx.keep.bool()
    x_in, x_out = acts[IN][keep].float(), acts[OUT][keep].float()
    assert copy["fvu"] == pytest.approx(fvu(x_out, x_in).item(), rel=1e-4)
    with pytest.raises(ValueError, match="give input_hook exactly when every SAE is a transcoder"):
        evaluate_lm(model, h_out, ctx, saes, mean, batch_size=4)


def test_a_transcoder_changed_after_validation_is_named(tmp_path, tiny_model_factory, sample_texts):
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    cfg = sweep_config(tmp_path / "w", tiny_model_factory("gpt2"), data)
    from sae_ray.config.sections import TranscoderConfig

    moved = TranscoderConfig(input={"layer": 0, "site": "mlp_in"}, output={"site": "mlp_out"})
    changed = cfg.model_copy(update={"sae": cfg.sae.model_copy(update={"transcoder": moved})})  # not validated again
    with pytest.raises(ConfigError, match=r"lacks \['blocks.0.ln2.hook_normalized', 'blocks.0.hook_mlp_out'\], the hook "
                                          r"points of sae.transcoder"):
        preflight(changed, check_buffer=False)
