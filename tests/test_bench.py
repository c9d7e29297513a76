"""The benchmarks: the synthetic ground truth, the recovery score, and both CLI commands end to end."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from sae_ray.bench import add_bench_commands
from sae_ray.bench.synthetic import (
    BenchConfig,
    SyntheticActivations,
    SyntheticConfig,
    _next_coefficient,
    format_table,
    recovery,
    run_synthetic,
    train_one,
)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sae-ray")
    add_bench_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


# -- recovery ---------------------------------------------------------------


def test_recovery_of_the_true_dictionary_shuffled_is_one():
    data = SyntheticActivations(d=32, n_features=256)
    shuffled = data.dictionary[torch.randperm(256)] * 3.0  # row norms do not matter
    fraction, mean_cos = recovery(shuffled, data.dictionary)
    assert fraction == 1.0
    assert mean_cos == pytest.approx(1.0, abs=1e-5)


def test_recovery_keeps_the_sign():
    data = SyntheticActivations(d=32, n_features=256)
    fraction, mean_cos = recovery(-data.dictionary, data.dictionary)
    assert fraction == 0.0  # a row pointing the opposite way recovers nothing
    assert mean_cos < 0.9  # (with 256 features in 32 dimensions the best match is some other feature's negation)


def test_recovery_of_random_directions_is_about_zero():
    data = SyntheticActivations(d=64, n_features=512)
    fraction, mean_cos = recovery(torch.randn(1024, 64), data.dictionary)
    assert fraction == 0.0
    assert mean_cos < 0.6


def test_recovery_counts_a_partial_match():
    data = SyntheticActivations(d=32, n_features=100)
    decoder = torch.cat([data.dictionary[:40], torch.randn(60, 32)])
    fraction, _ = recovery(decoder, data.dictionary)
    assert fraction == pytest.approx(0.4)


# -- the generator ----------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"correlation": 0.5}, {"hierarchy": True},
                                     {"correlation": 0.5, "hierarchy": True}])
def test_empirical_l0_matches_true_l0(options):
    data = SyntheticActivations(d=64, n_features=512, l0=10.0, **options)
    assert data.true_l0 == pytest.approx(10.0, rel=1e-4)
    x, codes = data.sample_with_codes(40_000)
    assert x.shape == (40_000, 64) and codes.shape == (40_000, 512)
    fired = codes > 0
    assert fired.sum(1).float().mean().item() == pytest.approx(data.true_l0, rel=0.02)
    # each feature at its own probability (loosely: the rarest fire a few dozen times here)
    assert torch.allclose(fired.float().mean(0), data.probs, atol=0.006)
    assert torch.allclose(x, codes @ data.dictionary, atol=1e-5)


def test_generator_shapes_and_spread():
    data = SyntheticActivations(d=64, n_features=512, l0=10.0, prob_ratio=30.0)
    assert data.dictionary.shape == (512, 64)
    assert torch.allclose(data.dictionary.norm(dim=1), torch.ones(512), atol=1e-5)
    assert data.probs.max() / data.probs.min() == pytest.approx(30.0, rel=1e-4)
    # most features are rarer than average
    assert (data.probs < data.probs.mean()).float().mean() > 0.5
    _, codes = data.sample_with_codes(1000)
    magnitudes = codes[codes > 0]
    assert magnitudes.min() >= 0.5 and magnitudes.max() <= 1.5


def test_children_never_fire_without_their_parent():
    data = SyntheticActivations(d=64, n_features=512, hierarchy=True)
    children = torch.nonzero(data.parent >= 0).squeeze(1)
    assert len(children) > 0
    _, codes = data.sample_with_codes(20_000)
    fired = codes > 0
    child_fired = fired[:, children]
    parent_fired = fired[:, data.parent[children]]
    assert child_fired.any()
    assert not (child_fired & ~parent_fired).any()


def test_correlation_makes_features_of_a_group_fire_together():
    independent = SyntheticActivations(d=64, n_features=512)
    correlated = SyntheticActivations(d=64, n_features=512, correlation=0.6)

    def mean_same_group_covariance(data):
        fired = (data.sample_with_codes(20_000)[1] > 0).float()
        cov = torch.cov(fired.T)
        same = (data.group[:, None] == data.group[None, :]) & ~torch.eye(512, dtype=torch.bool)
        return cov[same].mean().item()

    assert mean_same_group_covariance(correlated) > 5 * abs(mean_same_group_covariance(independent))


def test_streams_are_reproducible_and_apart_from_torch_seed():
    a, b = SyntheticActivations(seed=3), SyntheticActivations(seed=3)
    assert torch.equal(a.dictionary, b.dictionary)
    assert torch.equal(a.sample(100), b.sample(100))
    assert torch.equal(a.fresh(100), b.fresh(100))
    assert not torch.equal(a.fresh(100), a.sample(100))
    # an SAE initialised after torch.manual_seed(3) must not start out on the true dictionary
    torch.manual_seed(3)
    assert recovery(torch.randn(512, 64), a.dictionary)[0] == 0.0


def test_bad_problem_is_refused():
    with pytest.raises(ValueError, match="l0"):
        SyntheticActivations(n_features=64, l0=100.0)
    with pytest.raises(ValueError, match="probability"):
        SyntheticActivations(n_features=16, l0=10.0, prob_ratio=100.0)


# -- the benchmark ----------------------------------------------------------


def test_coefficient_search_moves_toward_the_target():
    assert _next_coefficient([(1.0, 20.0)], target=10.0) > 1.0  # too many latents: more penalty
    assert _next_coefficient([(1.0, 5.0)], target=10.0) < 1.0
    assert _next_coefficient([(1.0, 0.0)], target=10.0) == pytest.approx(0.1)  # all dead: at most 10x
    # two points on one side fit L0 ~ c^-a: L0 = 40 / c gives c = 4 for L0 = 10
    assert _next_coefficient([(1.0, 40.0), (2.0, 20.0)], target=10.0) == pytest.approx(4.0)
    # bracketed: interpolate between the closest dense and sparse runs (L0 = 160 / c^2 here)
    tried = [(1.0, 160.0), (2.0, 40.0), (8.0, 2.5), (16.0, 0.625)]
    assert _next_coefficient(tried, target=10.0) == pytest.approx(4.0)
    assert _next_coefficient([(1.0, 40.0), (9.0, 0.0)], target=10.0) == pytest.approx(3.0)


def test_topk_recovers_the_features_of_a_small_problem():
    problem = SyntheticConfig(d=32, n_features=128, l0=5.0, prob_ratio=10.0, seed=1)
    bench = BenchConfig(total_tokens=600 * 512, batch_size=512, lr=1e-2, eval_rows=8192)
    (row,) = run_synthetic(problem, bench, ["topk"], log=None)
    assert row["value"] == 5  # k = round(true L0)
    assert row["recovered"] >= 0.9
    assert row["l0"] == pytest.approx(5.0, rel=0.05)
    assert 0 <= row["fvu"] < 0.5


def test_batchtopk_and_jumprelu_find_the_features_of_a_small_problem():
    # with each architecture's literature defaults this problem gives 77% (batchtopk) and
    # 71% (jumprelu); the bench's short-run AuxK and JumpReLU settings give 92% and 88%
    problem = SyntheticConfig(d=32, n_features=128, l0=5.0, prob_ratio=10.0, seed=1)
    bench = BenchConfig(total_tokens=1500 * 512, batch_size=512, lr=1e-2, eval_rows=8192)
    for arch, value, least in (("batchtopk", 5, 0.88), ("jumprelu", 1.0, 0.85)):
        row = train_one(problem, bench, arch, value)
        assert row["recovered"] >= least, (arch, row)
        assert row["l0"] == pytest.approx(5.0, rel=0.25), (arch, row)


def test_synthetic_cli_prints_one_table(capsys):
    code = run_cli(["bench", "synthetic", "--d", "16", "--n-features", "64", "--l0", "3", "--tokens", "20000",
                    "--batch-size", "500", "--search", "2", "--eval-rows", "2000",
                    "--architectures", "topk,standard"])
    out = capsys.readouterr().out
    assert code == 0
    assert "true L0=3.00" in out
    header = next(line for line in out.splitlines() if line.startswith("architecture"))
    for column in ("sparsity", "recovered", "mean cos", "L0", "true L0", "FVU", "dead", "train s", "target"):
        assert column in header
    assert re.search(r"^topk\s+k=3\s+\d+\.\d%", out, re.M)
    assert re.search(r"^standard\s+l1=\S+", out, re.M)
    assert "wall time" in out
    assert "topk {'k_aux': 4, 'auxk_coefficient': 1.0}" in out  # the short-run settings are printed

    code = run_cli(["bench", "synthetic", "--d", "16", "--n-features", "64", "--l0", "3", "--tokens", "5000",
                    "--batch-size", "500", "--eval-rows", "1000", "--architectures", "topk", "--literature-defaults"])
    out = capsys.readouterr().out
    assert code == 0 and "none (each architecture's defaults)" in out and "k_aux" not in out


def test_format_table_marks_target_rows():
    row = {"architecture": "topk", "param": "k", "value": 10, "recovered": 0.95, "mean_max_cos": 0.97, "l0": 10.0,
           "true_l0": 10.0, "fvu": 0.2, "dead_fraction": 0.1, "seconds": 1.0, "runs": 1, "meets_target": True}
    low = {**row, "architecture": "jumprelu", "param": "l0_coefficient", "value": 0.5, "l0": 14.0, "runs": 2,
           "tried": [(1.0, 3.0), (0.5, 14.0)], "meets_target": False}
    table = format_table([row, low])
    assert re.search(r"^topk .* yes$", table, re.M)
    assert re.search(r"^jumprelu\s+l0=0.5 \(2 tried\) .* NO$", table, re.M)
    assert "jumprelu: l0_coefficient tried 1 -> L0 3.00, 0.5 -> L0 14.00" in table


def test_speed_bench_runs_end_to_end(capsys):
    code = run_cli(["bench", "train", "--d-in", "16", "--d-sae", "64", "--batch-size", "128", "--steps", "1",
                    "--stack", "2", "--repeats", "1", "--device", "cpu", "--return-freed-memory",
                    "--decoder-d-sae", "512,1024", "--rounds", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"torch threads \d+", out) and "freed memory handed back to the kernel" in out
    assert re.search(r"all five \(the step's matmuls alone\): [\d.]+ GFLOP/s", out)
    for arch in ("topk", "standard"):
        assert re.search(rf"^\s+{arch}\s+[\d,]+ tokens/s .* = \d+\.\d\d x matmul FLOP/s$", out, re.M)
    # the decoder part: topk only (standard has no sparse form), at both sizes
    decoder = re.findall(r"^\s+(\w+)\s+d_sae\s+(\d+): sparse\s+[\d,]+ tokens/s, dense\s+[\d,]+ tokens/s: \d+\.\d\dx", out, re.M)
    assert decoder == [("topk", "512"), ("topk", "1024")]
    assert len(re.findall(r"^\s+round \d \((separate|stack) first\): .*: \d+\.\d\dx$", out, re.M)) == 2
    assert re.search(r"stack / separate: \d+\.\d\dx tokens/s per SAE \(median .*; range \d+\.\d\d-\d+\.\d\d\)", out)


@pytest.mark.parametrize("bench", ["synthetic", "train"])
def test_an_unknown_architecture_is_refused_before_any_work(bench, capsys):
    from sae_ray.cli import main

    assert main(["bench", bench, "--architectures", "topk,gatted"]) == 2
    err = capsys.readouterr().err
    assert "--architectures: unknown architecture 'gatted'" in err and "gated" in err and "jumprelu" in err
    with pytest.raises(ValueError, match=r"unknown \['gatted'\]"):
        run_synthetic(architectures=["gatted"], log=None)


def test_bench_all_on_cuda_is_refused_without_a_gpu(capsys):
    import torch

    from sae_ray.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    assert main(["bench", "all", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device: value 'cuda': this machine has no CUDA device" in err


def test_a_bad_decoder_size_is_one_line_naming_the_flag(capsys):
    from sae_ray.cli import main

    assert main(["bench", "train", "--decoder-d-sae", "6144,big"]) == 2
    assert "--decoder-d-sae: value '6144,big': expected whole numbers" in capsys.readouterr().err
