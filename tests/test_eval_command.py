"""`sae-ray eval`: one SAE, registered or a local directory, evaluated on a config's model and
held-out documents; an MLflow eval run, the version's tags, a SAEBench-style JSON."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
import yaml

from sae_ray import tracking
from sae_ray.cli import main
from sae_ray.config import load_config
from sae_ray.formats import save_saelens
from sae_ray.sae import SAEConfig, create_sae
from tests.tiny_models import CORPUS, write_jsonl

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def setup(tmp_path, tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    data = write_jsonl(tmp_path / "docs.jsonl", [f"{t} Line {i}." for i, t in enumerate(CORPUS * 20)])
    raw = {"name": "ev", "workdir": str(tmp_path / "work"), "model": {"name": model_dir},
           "data": {"path": data, "context_size": 24, "batch_size": 4}, "hooks": [{"layer": 1, "site": "resid_post"}],
           "buffer": {"eval_fraction": 0.2}, "eval": {"tokens": 300, "batch_size": 4}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hook_name=HOOK, model_name=model_dir))
    local = tmp_path / "sae"
    save_saelens(sae, local)
    return load_config(str(path)).with_absolute_paths(), str(path), local, model_dir


def register_local_sae(cfg, local, model_dir: str, hook: str):
    """Log the SAE directory `local` in a new run of cfg's store and register it:
    (client, run id, registered name, version)."""
    uri = cfg.tracking_uri()
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, cfg.artifact_location())
    client = tracking.client_for(uri)
    run_id = tracking.start_run(uri, experiment_id, "trained")
    client.log_artifacts(run_id, str(local), tracking.SAE_ARTIFACT_PATH)
    name = tracking.registry_name(model_dir, hook)
    return client, run_id, name, tracking.register_sae(client, name, run_id, {"architecture": "topk"})


def test_eval_of_a_registered_version_writes_a_run_tags_and_a_saebench_file(setup, capsys):
    cfg, path, local, model_dir = setup
    client, run_id, name, version = register_local_sae(cfg, local, model_dir, HOOK)

    out = cfg.workdir_path() / "result.json"
    assert main(["eval", f"models:/{name}/{version}", "--config", path, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ce_loss_score" in printed and "held-out tokens" in printed
    result = json.loads(out.read_text())
    assert result["eval_type_id"] == "core" and result["sae_cfg_dict"]["d_sae"] == 64
    perf = result["eval_result_metrics"]["model_performance_preservation"]
    assert perf["ce_loss_with_ablation"] > perf["ce_loss_without_sae"]  # ablating the layer hurts
    assert result["eval_config"]["n_eval_tokens"] >= 300

    v = client.get_model_version(name, version)
    assert float(v.tags["ce_loss_score"]) == pytest.approx(perf["ce_loss_score"], rel=1e-5, abs=1e-6)
    eval_run = client.get_run(v.tags["lm_eval_run"])
    assert eval_run.data.tags["sae_ray.kind"] == "eval" and eval_run.data.tags["sae_ray.source_run"] == run_id
    assert eval_run.data.metrics["lm/ce_loss_score"] == pytest.approx(perf["ce_loss_score"], rel=1e-5, abs=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        freq = client.download_artifacts(eval_run.info.run_id, "lm_eval/frequencies.safetensors", tmp)
        from safetensors.torch import load_file

        assert load_file(freq)["frequencies"].shape == (64,)


def test_eval_of_a_local_directory_and_bad_refs(setup, capsys):
    cfg, path, local, _ = setup
    assert main(["eval", str(local), "--config", path]) == 0
    files = list((cfg.workdir_path() / "eval").glob("*_core.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["eval_type_id"] == "core"
    capsys.readouterr()
    assert main(["eval", "no-such-model/3", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "no-such-model/3" in err and "registry list" in err and "Traceback" not in err
    assert main(["eval", str(local), "--config", path, "--hook", "blocks.0.hook_resid_post"]) == 2
    assert "blocks.0.hook_resid_post" in capsys.readouterr().err


def test_eval_with_absorption_on_a_causal_lm_and_refused_on_an_encoder(setup, tiny_model_factory, capsys):
    cfg, path, local, _ = setup
    out = cfg.workdir_path() / "abs.json"
    assert main(["eval", str(local), "--config", path, "--set", "eval.absorption=true", "--output", str(out)]) == 0
    figures = json.loads(out.read_text())["eval_result_metrics"]["absorption"]
    assert figures["absorption_words"] > 0  # the tiny vocabulary's letter-only tokens, prompted and probed
    assert 0 <= figures["absorption_n_letters"] <= 26
    raw = yaml.safe_load(open(path))
    raw["model"]["name"] = tiny_model_factory("bert")
    bert = cfg.workdir_path().parent / "bert.yaml"
    bert.write_text(yaml.safe_dump(raw))
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hook_name=HOOK))
    save_saelens(sae, cfg.workdir_path().parent / "bert-sae")
    capsys.readouterr()
    assert main(["eval", str(cfg.workdir_path().parent / "bert-sae"), "--config", str(bert),
                 "--set", "eval.absorption=true"]) == 2
    assert "eval.absorption" in capsys.readouterr().err
