"""`sae-ray bench sweep`: the SAEs of each size, the bound's arithmetic, the flag checks, and the
whole bench on a tiny model (one sweep per size, one separate run per SAE, on one local Ray)."""

from pathlib import Path

import pytest
import yaml

from sae_ray.bench.sweep import (
    ARCHITECTURES,
    MAX_SIZE,
    bench_config,
    bound_seconds,
    check_bench_args,
    format_table,
    match_separate,
    run_sweep_bench,
    saes_of,
    same_but_saes,
    size_figures,
    size_problems,
)
from sae_ray.config import ConfigError, load_config
from tiny_models import write_jsonl

QUICKSTART = Path(__file__).parent.parent / "jobs" / "configs" / "quickstart.yaml"


def test_the_saes_of_a_size_are_a_grid_and_smaller_sizes_are_among_larger_ones():
    assert saes_of(4) == [("standard", 32), ("standard", 64), ("topk", 32), ("topk", 64)]
    assert saes_of(8) == [(a, t) for a in ARCHITECTURES for t in (16, 32, 64, 128)]
    for n in (1, 2, 4, 6, 8):
        assert len(saes_of(n)) == n and set(saes_of(n)) <= set(saes_of(MAX_SIZE))


def test_bad_sizes_are_refused_with_the_flag_named():
    assert size_problems([1, 2, 4, 8]) == []
    problems = size_problems([0, 3, 10, 4, 4])
    assert any(p.startswith("--sizes: value 0:") for p in problems)
    assert any(p.startswith("--sizes: value 3:") and "1 or even" in p for p in problems)
    assert any(p.startswith("--sizes: value 10:") and f"at most {MAX_SIZE}" in p for p in problems)
    assert any("4 more than once" in p for p in problems)


def test_the_bound_is_production_or_the_cores_work_whichever_is_longer():
    # production dominates: 100 s of production, 2 x 10 s of training on 4 cores
    assert bound_seconds(100.0, 1, [10.0, 10.0], 4) == 100.0
    # the cores' work dominates: (10 * 1 + 4 * 50) / 2 = 105
    assert bound_seconds(10.0, 1, [50.0] * 4, 2) == pytest.approx(105.0)
    row = size_figures(2, a_seconds=60.0, separate_seconds=[50.0, 70.0],
                       producer_stats=[{"rows": 3000, "tokens_per_s": 100.0}], producer_cpus=1,
                       tokens_trained=[2000, 2000], tokens_per_s=[100.0, 50.0], cores=2)
    assert row["production_seconds"] == pytest.approx(30.0) and row["train_seconds"] == pytest.approx([20.0, 40.0])
    assert row["bound_seconds"] == pytest.approx(45.0)  # (30 + 60) / 2 > 30
    assert row["b_seconds"] == 120.0 and row["ratio"] == pytest.approx(2.0) and row["a_over_bound"] == pytest.approx(60 / 45)
    assert "2.00x" in format_table([row])


def test_separate_runs_differ_from_the_sweep_only_in_their_saes(tmp_path):
    base = load_config(QUICKSTART)
    common = {"tokens": 65_536, "tracking_uri": f"sqlite:///{tmp_path}/m.db", "artifact_location": tmp_path.as_uri()}
    sweep = bench_config(base, saes_of(8), workdir=tmp_path / "a", name="a", **common)
    alone = bench_config(base, [("topk", 16)], workdir=tmp_path / "b", name="b", **common)
    assert same_but_saes(sweep, alone) == []
    assert sweep.buffer.n_tokens == sweep.train.total_tokens == 65_536 and not sweep.train.monitor.enabled
    assert alone.sae.architectures == ["topk"] and alone.sae.target_l0 == [16]
    other = alone.model_copy(update={"train": alone.train.model_copy(update={"lr": 1e-3})})
    assert same_but_saes(sweep, other) == ["train.lr"]
    with pytest.raises(ValueError, match="not a grid"):
        bench_config(base, saes_of(2) + [("standard", 64)], workdir=tmp_path / "c", name="c", **common)

    row = {"sae": "topk-d3072-L0_16@h", "architecture": "topk", "d_sae": 3072, "target_l0": 16, "hook": "h", "tokens_seen": 10}
    assert match_separate([row], {("topk", 3072, 16, "h"): row}) == [("topk", 3072, 16, "h")]
    with pytest.raises(ValueError, match="no separate run"):
        match_separate([row], {("topk", 3072, 32, "h"): {**row, "target_l0": 32}})
    with pytest.raises(ValueError, match="tokens"):
        match_separate([row], {("topk", 3072, 16, "h"): {**row, "tokens_seen": 20}})


def test_bad_flags_fail_before_any_work(tmp_path, capsys):
    from sae_ray.cli import main

    def error(*argv: str) -> str:
        assert main(["bench", "sweep", *argv, "--workdir", str(tmp_path / "w")]) == 2
        return capsys.readouterr().err

    assert "--sizes: value 0:" in error("--config", str(QUICKSTART), "--sizes", "0,4")
    assert "--sizes: value 9: at most 8" in error("--config", str(QUICKSTART), "--sizes", "4,9")
    assert "--sizes: value '4,x': expected whole numbers" in error("--config", str(QUICKSTART), "--sizes", "4,x")
    assert "--config: value 'no/such.yaml': no such file" in error("--config", "no/such.yaml")
    assert "--tokens: value 100: at least train.batch_size (1,024)" in error("--config", str(QUICKSTART), "--tokens", "100")
    assert not (tmp_path / "w").exists()  # nothing was started or written
    with pytest.raises(ConfigError, match="--sizes: value 3"):
        check_bench_args(QUICKSTART, [3], 65_536)


def test_the_bench_on_a_tiny_model(tmp_path, tiny_model_factory, sample_texts, local_ray, capsys):
    config = {
        "name": "tiny",
        "model": {"name": tiny_model_factory("gpt2")},
        "data": {"path": write_jsonl(tmp_path / "docs.jsonl", sample_texts * 8), "context_size": 16, "batch_size": 4},
        "hooks": [{"layer": 1, "site": "resid_post"}],
        "buffer": {"n_tokens": 100_000, "shard_rows": 256, "chunk_rows": 64},
        "producers": {"count": 1, "num_cpus": 1},
        "sae": {"architectures": ["topk"], "expansion_factor": [8], "k": [4]},  # replaced by the bench's SAEs
        "train": {"total_tokens": 100_000, "batch_size": 128, "lr": 0.003, "log_every": 4, "eval_rows": 4096,
                  "dead_tokens": 1024},
        "resources": {"cpus_per_trial": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    tokens = 1024
    out = run_sweep_bench(path, sizes=(2, 1), tokens=tokens, workdir=tmp_path / "bench", timed_steps=2)
    printed = capsys.readouterr().out

    assert out["cores"] == 2 and out["tokens"] == tokens
    assert [r["n"] for r in out["sizes"]] == [1, 2]
    names = list(out["separate_seconds"])
    assert len(names) == 2 and [n.split("-")[0] for n in names] == ["standard", "topk"]
    assert all("L0_32" in n for n in names) and set(out["tokens_per_s"]) == set(names)
    assert all(v > 0 for v in out["tokens_per_s"].values())
    first, both = out["sizes"]
    assert first["b_seconds"] == out["separate_seconds"][names[0]]  # N=1 is the first separate run alone
    assert both["b_seconds"] == pytest.approx(sum(out["separate_seconds"].values()))
    for r in out["sizes"]:
        assert r["ratio"] == pytest.approx(r["b_seconds"] / r["a_seconds"])
        assert r["a_over_bound"] == pytest.approx(r["a_seconds"] / r["bound_seconds"])
        assert r["producer_rows"] >= tokens and r["cores"] == 2 and r["producer_cpus"] == 1
        assert r["production_seconds"] == pytest.approx(r["producer_rows"] / r["producer_rows_per_s"])
        assert len(r["train_seconds"]) == r["n"]
        assert r["bound_seconds"] == pytest.approx(max(r["production_seconds"],
                                                       (r["production_seconds"] + sum(r["train_seconds"])) / 2))
        assert r["bound_seconds"] >= r["production_seconds"]
    # W_i = tokens / tokens-per-s of that SAE alone
    assert sorted(both["train_seconds"]) == pytest.approx(sorted(tokens / v for v in out["tokens_per_s"].values()))
    assert first["train_seconds"] == pytest.approx([tokens / out["tokens_per_s"][names[0]]])
    # every run produced its own buffer, in its own directory, kept under --workdir
    (root,) = (tmp_path / "bench").iterdir()
    assert str(root) == out["workdir"]
    assert sorted(p.name for p in root.iterdir() if (p / "buffer").is_dir()) == \
        ["separate-standard-L0_32", "separate-topk-L0_32", "sweep-1", "sweep-2"]
    assert "(b)/(a)" in printed and "(a)/bound" in printed and "2 distinct separate runs" in printed
