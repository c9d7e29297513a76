"""Target-L0 ladders: the L0 controller, the plan's target trials, the rules, and every
architecture landing on its targets on a small synthetic problem. No Ray."""

from __future__ import annotations

import pytest
import torch

from sae_ray.bench.synthetic import SAE_EXTRA, SyntheticActivations, SyntheticConfig
from sae_ray.config import ConfigError, TrainConfig, validate_config
from sae_ray.eval.metrics import evaluate_sae
from sae_ray.sae import ARCHITECTURES, SAEConfig, create_sae
from sae_ray.sweep.plan import expand_trials, pack_stacks, summary_row
from sae_ray.train.loop import train_sae
from sae_ray.train.target import L0Controller

BASE = {"model": {"name": "m"}, "data": {"path": "d"}, "hooks": [{"layer": 1, "site": "resid_post"}]}


def test_the_controller_raises_the_coefficient_of_a_dense_member_and_lowers_a_sparse_ones():
    c = L0Controller([10, 10, None], [1.0, 1.0, 1.0], start_step=2, stop_step=5, gain=0.1)
    assert c.update(1, [100, 1, 100]) == [1.0, 1.0, 1.0]  # before the span: unchanged
    dense, sparse, free = c.update(2, [100, 1, 100])
    assert dense == pytest.approx(torch.e ** 0.1) and sparse == pytest.approx(torch.e ** -0.1)  # error clipped at ±1
    assert free == 1.0  # no target: not controlled
    on_target = c.update(3, [10, 10, 100])  # on target, but member 0 fell onto it and member 1 rose onto it
    assert on_target[:2] == pytest.approx([1.0, 1.0])  # the trend predicts them past it: each moved back (clipped)
    c.update(5, [100, 100, 100])
    assert c.coefficients[:2] == pytest.approx([1.0, 1.0])  # after the span: frozen
    c.keep([1])
    assert c.targets == [10] and c.coefficients == pytest.approx([1.0])
    restored = L0Controller([None], [1.0], 0, 1, 0.1)
    restored.load_state_dict(c.state_dict())
    assert restored.coefficients == c.coefficients and restored.targets == c.targets


def test_the_coefficient_acts_on_the_l0_the_trend_predicts_for_the_end_of_the_span():
    c = L0Controller([10.0], [1.0], start_step=0, stop_step=100, gain=0.1, trend_steps=2)
    c.update(0, [400.0])  # no trend yet: dense, clipped at +1
    assert c.coefficients[0] == pytest.approx(torch.e ** 0.1)
    c.update(1, [400.0])  # flat: still dense
    assert c.coefficients[0] == pytest.approx(torch.e ** 0.2)
    c.update(2, [200.0])  # dense, but falling by half in two steps: the two capped terms cancel, λ stays
    assert c.coefficients[0] == pytest.approx(torch.e ** 0.2)  # +1 (distance) - 1 (trend, clipped)
    c.update(3, [20.0])   # nearly there and still falling fast: λ falls
    assert c.coefficients[0] < torch.e ** 0.2
    late = L0Controller([10.0], [1.0], start_step=0, stop_step=100, gain=0.1, trend_steps=2)
    late.update(97, [12.0])
    late.update(98, [11.0])  # a slow fall, two steps before the freeze: it will not reach 10, λ still grows
    assert late.coefficients[0] > torch.e ** 0.01


def test_a_target_ladder_makes_one_trial_per_target_for_every_architecture():
    cfg = validate_config({**BASE, "sae": {"architectures": ["standard", "topk", "jumprelu"], "expansion_factor": [4],
                                           "target_l0": [8, 16]}})
    trials = expand_trials(cfg.sae, {"h": 16})
    by_arch = {(t.architecture, t.target_l0): t for t in trials}
    assert len(trials) == 6
    assert by_arch["topk", 8].k == 8 and by_arch["topk", 16].k == 16  # k = target
    assert by_arch["standard", 8].l1_coefficient == ARCHITECTURES["standard"].target_start
    assert by_arch["jumprelu", 16].l0_coefficient == ARCHITECTURES["jumprelu"].target_start
    assert by_arch["standard", 16].name == "standard-d64-L0_16@h"
    assert by_arch["topk", 8].tags()["target_l0"] == 8
    stacks = pack_stacks(trials, max_stack=8)
    assert [len(s.trials) for s in stacks] == [2, 2, 2] and stacks[0].name == "standard-d64-L0_8,L0_16@h"
    row = summary_row(by_arch["standard", 8], {"l0": 8.2, "fvu": 0.3, "dead_fraction": 0.0, "tokens_seen": 1,
                                               "train_tokens_per_s": 1.0, "verdict": "ok", "reasons": "",
                                               "registered_version": "1", "mlflow_run_id": "r", "coefficient": 7.5})
    assert row["target_l0"] == 8 and row["l1_coefficient"] == 7.5  # where the controller left it


@pytest.mark.parametrize("sae, expected", [
    ({"architectures": ["topk"], "expansion_factor": [4], "target_l0": [8], "k": [4]},
     "sae.target_l0: value [8]: given together with sae.k [4]"),
    ({"architectures": ["standard"], "expansion_factor": [4], "target_l0": [0, 8]},
     "sae.target_l0: value [0, 8]: must be a non-empty list of positive integers"),
    ({"architectures": ["standard"], "d_sae": [32], "target_l0": [32]},
     "sae.target_l0: value [32]: a target L0 must be < d_sae (smallest d_sae is 32)"),
    ({"architectures": ["standard"], "expansion_factor": [4], "target_l0": [8, 8]},
     "sae.target_l0: value [8, 8]: lists 8 more than once"),
])
def test_bad_targets_are_named_before_anything_runs(sae, expected):
    with pytest.raises(ConfigError) as e:
        validate_config({**BASE, "sae": sae})
    assert expected in str(e.value)


def test_a_target_at_or_above_d_sae_from_an_expansion_factor_is_refused_once_d_in_is_known():
    from sae_ray.sweep.plan import trial_problems

    cfg = validate_config({**BASE, "sae": {"architectures": ["standard"], "expansion_factor": [2], "target_l0": [40]}})
    problems = trial_problems(cfg, expand_trials(cfg.sae, {"h": 16}))
    assert problems == ["sae.target_l0: value 40: must be < d_sae (32 = expansion_factor x d_in 16) for standard"]


def test_the_controlled_coefficient_is_kept_by_unstacking_and_in_the_config():
    sae = create_sae([SAEConfig("standard", 8, 32, l1_coefficient=1.0), SAEConfig("standard", 8, 32, l1_coefficient=1.0)])
    sae.set_coefficients([2.0, 3.0])
    assert sae.l1_coefficient.tolist() == [2.0, 3.0]
    a, b = sae.unstack()
    assert (a.l1_coefficient, b.l1_coefficient) == (2.0, 3.0) and b.cfg.l1_coefficient == 3.0


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_lands_within_15_percent_of_two_targets(architecture):
    """The issue's test: a stack of two targets per architecture on a small known-dictionary
    problem (d 64, 512 features, true L0 5; d_sae 512), held-out L0 within ±15% of each target. The
    synthetic benchmark's knobs (SAE_EXTRA: AuxK for the k architectures, JumpReLU's wider
    bandwidth and threshold) as `sae-ray bench synthetic` uses them; JumpReLU's Gemma Scope
    defaults learn nothing in a run this short (the init-presets issue is about that)."""
    data = SyntheticActivations(SyntheticConfig(d=64, n_features=512, l0=5.0))
    cls = ARCHITECTURES[architecture]
    targets = [8, 16]
    start = {cls.sparsity_param: cls.target_start} if cls.sparsity_param != "k" else {}
    cfgs = [SAEConfig(architecture, 64, 512, extra=dict(SAE_EXTRA.get(architecture, {})),
                      **(start or {"k": t})) for t in targets]
    torch.manual_seed(0)
    # BatchTopK's held-out L0 comes from its learned threshold, not from k: at 60k tokens it was 6 for k 8
    train = TrainConfig(total_tokens=150_000, batch_size=256, lr=3e-3, dead_tokens=10_000, log_every=10**6)
    state = train_sae(create_sae(cfgs), data.batches(256), train, targets=targets)
    held_out = data.fresh(16_384)  # rows the SAE never trained on
    for target, member in zip(targets, state.sae.unstack()):
        achieved = evaluate_sae(member, held_out)["l0"]
        print(f"{architecture}: target {target}, held-out L0 {achieved:.2f}")  # the figures of the note (pytest -s)
        assert abs(achieved / target - 1) <= 0.15, (architecture, target, achieved)
    if cls.sparsity_param != "k":
        assert all(c != cls.target_start for c in state.coefficients)  # the controller moved each one


def test_the_reservoir_is_a_uniform_sample_of_the_stream_and_resumes_exactly():
    from sae_ray.train.target import RowReservoir

    r = RowReservoir(200, seed=0)
    stream = torch.arange(10_000, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds i
    for batch in stream.split(128):
        r.add(batch)
    rows = r.rows
    assert rows.shape == (200, 3) and r.seen == 10_000
    assert len(set(rows[:, 0].tolist())) == 200  # no row twice
    assert 3_500 < float(rows[:, 0].mean()) < 6_500  # spread over the whole stream, not its start or end
    assert (rows[:, 0] >= 5_000).float().mean() > 0.35  # half the stream is after row 5,000
    rest = RowReservoir(200, seed=0)
    for batch in stream.split(100):
        rest.add(batch)
    resumed = RowReservoir(200, seed=0)
    for batch in stream[:5_000].split(100):
        resumed.add(batch)
    meta, tensors = resumed.state_dict()
    again = RowReservoir(200, seed=1)  # another seed: the state carries the generator
    again.load_state_dict(meta, tensors)
    for batch in stream[5_000:].split(100):
        again.add(batch)
    assert torch.equal(again.rows, rest.rows)  # a checkpointed reservoir goes on exactly as an uninterrupted one
