"""`sae-ray analyze` and its neighbours on a real buffer made by 2 producers with a tiny Llama: the
statistics against a brute-force pass, contexts rebuilt exactly from the corpus, the logit lens,
steering, concepts, and the bad-input errors (each before any pass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from sae_ray.analysis.concepts import rank_latents, read_concepts
from sae_ray.analysis.features import FeatureStats
from sae_ray.analysis.lens import final_norm_weight, logit_lens, steer
from sae_ray.analysis.report import Analysis
from sae_ray.buffer import ActivationBuffer
from sae_ray.cli import main
from sae_ray.config import load_config
from sae_ray.formats import save_saelens
from sae_ray.sae import SAEConfig, create_sae
from tests.tiny_models import CORPUS, write_jsonl

HOOK = "blocks.1.hook_resid_post"
WINDOW = 3


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_factory, local_ray):
    """(cfg, config path, buffer, local SAE dir, model dir, analysis dir) for a buffer of 2 producers."""
    tmp = tmp_path_factory.mktemp("analysis")
    model_dir = tiny_model_factory("llama")
    data = write_jsonl(tmp / "docs.jsonl", [f"{t} Line {i}, {t.lower()}" for i, t in enumerate(CORPUS * 12)])
    raw = {"name": "an", "workdir": str(tmp / "work"), "model": {"name": model_dir},
           "data": {"path": data, "context_size": 16, "batch_size": 4}, "hooks": [{"layer": 1, "site": "resid_post"}],
           "buffer": {"eval_fraction": 0.2, "n_tokens": 3000, "shard_rows": 512, "chunk_rows": 128},
           "producers": {"count": 2, "num_cpus": 1}, "train": {"eval_rows": 256}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["cache", str(path)]) == 0
    cfg = load_config(str(path)).with_absolute_paths()
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=24, k=4, hook_name=HOOK, model_name=model_dir))
    local = tmp / "sae"
    save_saelens(sae, local)
    out = tmp / "analysis"
    assert main(["analyze", str(local), "--config", str(path), "--split", "all", "--top-k", "3", "--samples", "5",
                 "--window", str(WINDOW), "--workers", "2", "--out", str(out)]) == 0
    return cfg, str(path), ActivationBuffer.open(cfg.buffer_path()), local, model_dir, out


def _all_rows(buffer: ActivationBuffer):
    """(x [R, d_in], global rows [R], tokens [R]) of every committed row."""
    xs, rows, toks = [], [], []
    for s in buffer.commit_state().committed:
        x = buffer.read_tensor(HOOK, s).float()
        xs.append(x)
        rows.append(torch.arange(len(x)) + s * buffer.shard_rows)
        toks.append(torch.from_numpy(buffer.read_column("tokens", s).astype(np.int64)))
    return torch.cat(xs), torch.cat(rows), torch.cat(toks)


def test_statistics_and_top_contexts_equal_a_brute_force_pass(made):
    import sae_ray

    cfg, _, buffer, local, _, out = made
    sae = sae_ray.load_sae(str(local))
    a = Analysis.open(out)
    x, rows, _ = _all_rows(buffer)
    f = sae.encode(x).detach()
    assert a.meta.rows == len(x) and a.meta.split == "all"
    assert torch.allclose(a.stats["frequency"], (f > 0).float().mean(0), atol=1e-6)
    assert torch.allclose(a.stats["max_act"], f.max(0).values, atol=1e-5)
    assert int(a.stats["hist_counts"].sum()) == int((f > 0).sum())
    top = f.topk(3, dim=0)
    assert torch.allclose(a.contexts["top_values"], top.values.T, atol=1e-5)
    # a sampled context is a row where the latent fired, at its activation
    got = a.contexts["sample_rows"]
    on = got >= 0
    where = {int(r): i for i, r in enumerate(rows)}
    for i, j in on.nonzero().tolist()[:40]:
        assert f[where[int(got[i, j])], i] > 0
        assert float(a.contexts["sample_values"][i, j]) == pytest.approx(float(f[where[int(got[i, j])], i]), abs=1e-5)


def test_contexts_are_rebuilt_exactly_from_the_corpus(made):
    """The rebuilt token at every centre is the stored token; every window token that has a buffer
    row is that row's stored token, and its activation is the SAE's at that row."""
    import sae_ray

    _, _, buffer, local, _, out = made
    sae = sae_ray.load_sae(str(local))
    a = Analysis.open(out)
    x, rows, toks = _all_rows(buffer)
    where = {int(r): i for i, r in enumerate(rows)}
    f = sae.encode(x).detach()
    checked = 0
    for kind in ("top", "sample"):
        centre_rows = a.contexts[f"{kind}_rows"]
        for i, j in (centre_rows >= 0).nonzero().tolist():
            r = where[int(centre_rows[i, j])]
            window_tokens = a.contexts[f"{kind}_tokens"][i, j]
            assert int(window_tokens[WINDOW]) == int(toks[r])
            acts = a.contexts[f"{kind}_acts"][i, j].float()
            assert float(acts[WINDOW]) == pytest.approx(float(f[r, i]), rel=1e-2, abs=1e-3)
            checked += 1
    assert checked > 50
    report = a.latent(int(a.stats["frequency"].argmax()))
    assert report.top and report.top[0].tokens[report.top[0].centre] == a.vocab[int(a.contexts["top_tokens"][report.index, 0, WINDOW])]


def test_feature_stats_merge_equals_one_pass():
    torch.manual_seed(0)
    f = torch.relu(torch.randn(300, 16))
    rows = torch.arange(300)
    whole = FeatureStats.empty(16, 4, 6)
    whole.add(f, rows, torch.Generator().manual_seed(1))
    parts = []
    for lo, hi in ((0, 120), (120, 300)):
        p = FeatureStats.empty(16, 4, 6)
        p.add(f[lo:hi], rows[lo:hi], torch.Generator().manual_seed(lo))
        parts.append(p)
    merged = parts[0].merge(parts[1])
    assert merged.rows == 300 and torch.equal(merged.fired, whole.fired) and torch.equal(merged.hist, whole.hist)
    assert torch.equal(merged.top_values, whole.top_values) and torch.equal(merged.top_rows, whole.top_rows)
    assert ((merged.sample_values > 0) | (merged.sample_rows < 0)).all()  # only firing rows are sampled


def test_the_logit_lens_is_the_decoder_direction_through_the_unembedding(made, tiny_model_factory):
    import sae_ray
    from sae_ray.activations.model import load_model

    _, _, _, local, model_dir, out = made
    model, _ = load_model(model_dir)
    sae = sae_ray.load_sae(str(local))
    lens = logit_lens(model, sae, top=5)
    W = model.get_output_embeddings().weight.float() * final_norm_weight(model)
    logits = sae.W_dec.detach() @ W.T
    assert torch.equal(lens["promoted_ids"].long(), logits.topk(5, dim=1).indices)
    assert torch.equal(lens["suppressed_ids"].long(), logits.topk(5, dim=1, largest=False).indices)
    assert torch.equal(Analysis.open(out).lens["promoted_ids"][:, :5], lens["promoted_ids"])  # analyze wrote it


def test_steering_moves_the_logits_along_the_logit_lens_and_strength_0_changes_nothing(made):
    import sae_ray
    from sae_ray.activations.hooks import resolve_hook
    from sae_ray.activations.model import load_model

    _, _, _, local, model_dir, _ = made
    model, tok = load_model(model_dir)
    sae = sae_ray.load_sae(str(local))
    hook = resolve_hook(model, 1, "resid_post")  # the last block: the direction reaches the head through the norm only
    ids = tok("The cat sat on", return_tensors="pt")
    plain = model(**ids).logits[0, -1]
    latent = 3
    with steer(model, hook, sae.W_dec[latent].detach(), strength=0.0):
        assert torch.equal(model(**ids).logits[0, -1], plain)
    with steer(model, hook, sae.W_dec[latent].detach(), strength=200.0):
        steered = model(**ids).logits[0, -1]
    assert int(steered.argmax()) == int(logit_lens(model, sae, top=1)["promoted_ids"][latent, 0])
    with steer(model, hook, clamp=(sae, latent, 50.0)):
        clamped = model(**ids).logits[0, -1]
    assert not torch.allclose(clamped, plain)
    assert model(**ids).logits[0, -1].equal(plain)  # the hook is gone after the block


def test_steer_command_prints_both_generations(made, capsys):
    _, path, _, local, _, _ = made
    assert main(["steer", str(local), "--config", path, "--latent", "2", "--strength", "50", "--prompt", "The cat",
                 "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert "plain:" in printed and "steered:" in printed and "latent 2" in printed


def test_concepts_rank_the_latent_that_fires_only_on_the_concept_first(tmp_path):
    torch.manual_seed(0)
    background = torch.relu(torch.randn(500, 8)) * (torch.arange(8) != 3)  # latent 3 silent on the background
    concept = torch.relu(torch.randn(40, 8))
    concept[:, 3] = 1.0
    hits = rank_latents(concept, background, top=3)
    assert hits[0].latent == 3 and hits[0].precision == 1.0 and hits[0].recall == 1.0
    (tmp_path / "numbers.txt").write_text("1 2 3\n\n42\n")
    assert read_concepts([tmp_path]) == {"numbers": ["1 2 3", "42"]}


def test_concepts_command_runs_on_the_shipped_concept_files(made, capsys):
    _, path, _, local, _, out = made
    assert main(["concepts", str(local), "--config", path, "--texts", "jobs/concepts", "--analysis", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "numbers:" in printed and "precision" in printed
    assert Analysis.open(out).concepts  # written into the analysis


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"\xff\xfe bad", "is not UTF-8")])
def test_a_bad_concept_file_is_named(made, tmp_path, capsys, content, message):
    _, path, _, local, _, _ = made
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    assert main(["concepts", str(local), "--config", path, "--texts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.txt" in err and message in err


def test_bad_input_is_one_message_before_any_pass(made, tmp_path, tiny_model_factory, capsys):
    _, path, _, local, model_dir, _ = made
    wide = create_sae(SAEConfig(architecture="topk", d_in=16, d_sae=24, k=4, hook_name=HOOK, model_name=model_dir))
    save_saelens(wide, tmp_path / "wide")
    assert main(["analyze", str(tmp_path / "wide"), "--config", path]) == 2
    assert "d_in 16" in capsys.readouterr().err
    other = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=24, k=4, hook_name=HOOK, model_name="other/model"))
    save_saelens(other, tmp_path / "other")
    assert main(["analyze", str(tmp_path / "other"), "--config", path]) == 2
    assert "'other/model'" in capsys.readouterr().err
    assert main(["steer", str(local), "--config", path, "--latent", "24", "--prompt", "x"]) == 2
    assert "0..23" in capsys.readouterr().err
    assert main(["analyze", str(local), "--config", path, "--split", "train"]) == 2
    assert "--split" in capsys.readouterr().err


def test_steering_an_encoder_is_refused(tmp_path, tiny_model_factory, capsys):
    bert = tiny_model_factory("bert")
    raw = {"name": "b", "workdir": str(tmp_path / "w"), "model": {"name": bert}, "data": {"path": "x.jsonl"},
           "hooks": [{"layer": 1, "site": "resid_post"}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=24, k=4, hook_name=HOOK, model_name=bert))
    save_saelens(sae, tmp_path / "sae")
    assert main(["steer", str(tmp_path / "sae"), "--config", str(tmp_path / "c.yaml"), "--latent", "1", "--prompt", "x"]) == 2
    assert "causal LM" in capsys.readouterr().err


def test_a_registered_sae_gets_its_analysis_and_dashboard_in_its_run(made, tmp_path):
    from tests.test_eval_command import register_local_sae

    cfg, path, _, local, model_dir, _ = made
    client, run_id, name, version = register_local_sae(cfg, local, model_dir, HOOK)
    ref = f"{name}/{version}"
    assert main(["analyze", ref, "--config", path, "--top-k", "2", "--samples", "2", "--window", "1"]) == 0
    local_analysis = cfg.workdir_path() / "analysis" / f"{name}_v{version}"
    assert main(["concepts", ref, "--config", path, "--texts", "jobs/concepts/numbers.txt", "--analysis", str(local_analysis)]) == 0
    assert main(["dashboard", ref, "--config", path, "--out", str(tmp_path / "site")]) == 0
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"analysis", "dashboard"} <= names
    assert "analysis/concepts.json" in {a.path for a in client.list_artifacts(run_id, "analysis")}
    page = (tmp_path / "site" / "index.html").read_text()
    assert f"models:/{name}/{version}" in page
    assert main(["export", "neuronpedia", ref, "--config", path, "--out", str(tmp_path / "np"), "--model-id", "tiny"]) == 0
    assert list((tmp_path / "np" / "tiny").glob("1-sae-ray/features/batch-*.jsonl.gz"))
