"""The live quality monitor: verdicts from metrics, and members stopped mid-run by the training loop."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from sparse_rows import sparse_data

from sae_ray.config import TrainConfig
from sae_ray.config.sections import MonitorConfig
from sae_ray.sae import SAE, SAEConfig, create_sae
from sae_ray.train.loop import train_sae
from sae_ray.train.monitor import Monitor, keep_members, nonfinite_weights
from sae_ray.train.optim import Adam

D_IN, D_SAE = 32, 64
TOTAL = 10_000  # tokens of the run the unit tests pretend to watch; warmup 0.1: 1,000


def monitor(n: int = 1, **kw) -> Monitor:
    return Monitor(MonitorConfig(**kw), n, D_SAE, TOTAL)


def m(tokens: int, member: int = 0, l0: float = 2.0, fvu: float = 0.2, dead: float = 0.0, loss: float = 1.0,
      sparsity_scale: float = 1.0) -> dict[str, float]:
    """A metrics dict as the loop gives it (l0 in latents)."""
    return {"member": member, "tokens": float(tokens), "loss": loss, "l0": l0, "fvu": fvu, "dead_fraction": dead,
            "sparsity_scale": sparsity_scale}


# -- verdicts from metrics ------------------------------------------------------------


def test_healthy_member_stays_ok():
    mon = monitor()
    for t in range(500, TOTAL + 1, 500):
        assert mon.check(m(t, l0=2.0), last=t == TOTAL) == "ok"
    assert mon.reasons == [[]]


def test_nan_loss_stops_at_once_even_in_warmup():
    mon = monitor(2)
    assert mon.check(m(100, member=1, loss=float("nan"))) == "stopped"
    assert mon.reasons[1] == ["nan: loss is nan at 100 tokens"]
    assert mon.check(m(100, member=0)) == "ok"
    assert mon.check(m(200, member=1)) == "stopped"  # a stopped member stays stopped, not judged again
    assert len(mon.reasons[1]) == 1


def test_inf_loss_and_nonfinite_weights_stop():
    mon = monitor(2)
    assert mon.check(m(100, member=0, loss=float("inf"))) == "stopped"
    assert mon.reasons[0] == ["nan: loss is inf at 100 tokens"]
    assert mon.check(m(100, member=1), bad_weights=["W_enc", "b_dec"]) == "stopped"
    assert mon.reasons[1] == ["nan: W_enc, b_dec not finite at 100 tokens"]


def test_nothing_but_nan_is_judged_during_warmup():
    mon = monitor()
    for t in (100, 500, 999):
        assert mon.check(m(t, l0=0.9 * D_SAE, fvu=3.0, dead=0.9)) == "ok"
    assert mon.reasons == [[]]


def test_dense_and_not_falling_stops_after_warmup():
    mon = monitor()
    assert mon.check(m(500, l0=40)) == "ok"  # warmup: not judged
    assert mon.check(m(1000, l0=30)) == "warn"  # dense from here: remembered, judged after a warmup's worth of tokens
    assert mon.check(m(1500, l0=33)) == "warn"
    assert mon.check(m(2000, l0=31)) == "stopped"  # still dense and no lower than at 1,000
    assert mon.reasons[0][-1] == "dense: L0 0.48·d_sae at 2,000 tokens (above 0.2 and not falling)"
    assert mon.reasons[0][-1].startswith("dense")


def test_dense_but_falling_is_only_flagged_and_flagged_once():
    mon = monitor()
    assert mon.check(m(500, l0=40)) == "ok"  # warmup
    for t, l0 in ((1000, 30), (2000, 20), (3000, 14)):
        assert mon.check(m(t, l0=l0)) == "warn"
    assert mon.reasons[0] == ["dense: L0 0.22·d_sae at 3,000 tokens (warn above 0.05)"]  # one reason, the latest figure
    assert mon.check(m(TOTAL, l0=13), last=True) == "warn"  # still above 0.2 at the end: flagged, kept
    assert mon.reasons[0][-1] == "dense: L0 0.20·d_sae at 10,000 tokens, the end (above 0.2)"
    assert mon.check(m(500, l0=2.0)) == "warn"  # during the warmup nothing is judged


def test_a_dense_or_dead_warning_goes_when_the_sae_is_no_longer_so():
    mon = monitor()
    assert mon.check(m(1000, l0=8, dead=0.7)) == "warn"
    assert mon.check(m(2000, l0=8, dead=0.1)) == "warn" and mon.reasons[0] == [
        "dense: L0 0.12·d_sae at 2,000 tokens (warn above 0.05)"]  # the dead latents came back
    assert mon.check(m(3000, l0=10, sparsity_scale=0.5)) == "warn"  # not at full penalty: not judged
    assert mon.check(m(TOTAL, l0=2.0), last=True) == "ok" and mon.reasons == [[]]  # sparse at the end


def test_dense_is_judged_only_at_full_sparsity_penalty():
    mon = monitor()
    for t in (1000, 2000, 3000):
        assert mon.check(m(t, l0=50, sparsity_scale=0.5)) == "ok"
    assert mon.check(m(4000, l0=50)) == "warn"  # first check at full penalty: the reference
    assert mon.check(m(5000, l0=50)) == "stopped"


def test_warn_level_and_stop_level_come_from_the_config():
    mon = monitor(2, warn_l0_fraction=0.1, max_l0_fraction=0.5)
    assert mon.check(m(2000, member=0, l0=6)) == "ok"  # 0.09 d_sae
    assert mon.check(m(2000, member=1, l0=20)) == "warn"  # 0.31 d_sae: above warn, below stop
    assert mon.check(m(3000, member=1, l0=30)) == "warn"  # not falling, but not above 0.5
    assert mon.check(m(4000, member=1, l0=40)) == "warn"  # 0.63 d_sae: dense from here
    assert mon.check(m(5000, member=1, l0=41)) == "stopped"  # a warmup's worth later, not falling


def test_fvu_that_stays_at_least_one_for_a_warmup_stops():
    mon = monitor(2)
    assert mon.check(m(1000, member=0, fvu=1.02)) == "ok"  # the span starts
    assert mon.check(m(1500, member=0, fvu=1.1)) == "ok"
    assert mon.check(m(2000, member=0, fvu=1.02)) == "stopped"
    assert mon.reasons[0] == ["fvu: 1.02 >= 1 after warmup at 2,000 tokens (not falling)"]
    for t, fvu in ((1000, 1.5), (1500, 0.9), (2000, 1.5), (2500, 1.5)):  # a dip below 1 starts the span again
        assert mon.check(m(t, member=1, fvu=fvu)) == "ok"
    assert mon.check(m(3000, member=1, fvu=1.5)) == "stopped"


def test_fvu_above_one_but_falling_trains_on():
    """A transcoder starts well above FVU 1 and comes down: above 1 for a warmup's worth, falling, it is not stopped."""
    mon = monitor(2)
    for t, fvu in ((1000, 1.42), (1500, 1.2), (2000, 1.02), (2500, 1.01)):
        assert mon.check(m(t, member=0, fvu=fvu)) == "ok"
    assert mon.check(m(3000, member=0, fvu=0.8)) == "ok"
    for t, fvu in ((1000, 1.3), (1500, 1.1), (2000, 1.35)):  # back up to where it started: stopped
        mon.check(m(t, member=1, fvu=fvu))
    assert mon.verdicts[1] == "stopped"


def test_fvu_at_least_one_at_the_end_is_flagged():
    mon = monitor()
    assert mon.check(m(TOTAL, fvu=9.1), last=True) == "warn"
    assert mon.reasons[0] == ["fvu: 9.10 >= 1 at 10,000 tokens, the end"]


def test_many_dead_latents_are_flagged():
    mon = monitor()
    assert mon.check(m(2000, dead=0.5)) == "ok"
    assert mon.check(m(3000, dead=0.62)) == "warn"
    assert mon.reasons[0] == ["dead: 0.62 of latents dead at 3,000 tokens"]


def test_disabled_monitor_judges_nothing():
    mon = monitor(enabled=False)
    assert mon.check(m(100, loss=float("nan"))) == "ok"
    assert mon.check(m(5000, l0=60, fvu=5.0)) == "ok"
    assert mon.reasons == [[]]


def test_config_refuses_a_warning_level_above_the_stop_level():
    with pytest.raises(ValidationError, match="warn_l0_fraction 0.3 > max_l0_fraction 0.2"):
        MonitorConfig(warn_l0_fraction=0.3)
    assert TrainConfig().monitor == MonitorConfig()
    for name, field in MonitorConfig.model_fields.items():
        assert field.description, name


def test_nonfinite_weights_names_the_member_and_parameter():
    sae = SAE.stack([create_sae(SAEConfig("standard", D_IN, D_SAE, l1_coefficient=1.0)) for _ in range(3)])
    assert nonfinite_weights(sae) == [[], [], []]
    with torch.no_grad():
        sae.W_dec[2, 0, 0] = float("inf")
        sae.b_enc[2, 1] = float("nan")
    assert nonfinite_weights(sae) == [[], [], ["b_enc", "W_dec"]]


# -- keeping members ---------------------------------------------------------------------


def test_kept_members_train_on_exactly_as_in_the_full_stack():
    torch.manual_seed(0)
    cfgs = [SAEConfig("standard", D_IN, D_SAE, l1_coefficient=c) for c in (0.3, 1.0, 3.0)]
    sae = create_sae(cfgs)
    opt = Adam(sae.parameters(), lr=[1e-3, 2e-3, 3e-3], n_stack=3)
    batches = sparse_data(128 * 10, 0).split(128)

    def step(sae, opt, x):
        opt.zero_grad()
        sae(x).loss.sum().backward()
        opt.step()

    for x in batches[:5]:
        step(sae, opt, x)
    full, full_opt = copy.deepcopy(sae), copy.deepcopy(opt)
    full_opt.params = list(full.parameters())
    full_opt.exp_avg, full_opt.exp_avg_sq = copy.deepcopy(opt.exp_avg), copy.deepcopy(opt.exp_avg_sq)
    rng = torch.get_rng_state()
    kept, kept_opt = keep_members(sae, opt, [0, 2])
    assert torch.equal(torch.get_rng_state(), rng)
    assert kept.n_stack == 2 and [c.l1_coefficient for c in kept.cfgs] == [0.3, 3.0]
    assert kept_opt.lr == [1e-3, 3e-3] and kept_opt.steps == opt.steps
    for x in batches[5:]:
        step(full, full_opt, x)
        step(kept, kept_opt, x)
    for name, p in kept.named_parameters():
        torch.testing.assert_close(p, full.get_parameter(name)[[0, 2]], rtol=0, atol=0, msg=name)


# -- the loop stops members ----------------------------------------------------------------


def quick(**kw) -> TrainConfig:
    kw.setdefault("batch_size", 256)
    kw.setdefault("total_tokens", 256 * 200)
    kw.setdefault("lr", 3e-3)
    kw.setdefault("log_every", 10)
    return TrainConfig(**kw)


def standard_stack(coefficients: list[float]) -> SAE:
    torch.manual_seed(0)
    return create_sae([SAEConfig("standard", D_IN, D_SAE, l1_coefficient=c) for c in coefficients])


def test_a_dense_member_is_stopped_and_the_others_train_on():
    x = sparse_data(256 * 200, 0)
    train = quick()
    sae = standard_stack([1e-6, 1.0, 3.0])
    reference = copy.deepcopy(sae)
    logs = []
    state = train_sae(sae, iter(x.split(256)), train, on_log=lambda s, ms: logs.append((s, ms)))

    assert state.verdicts[0] == "stopped" and state.reasons[0][-1].startswith("dense")
    assert state.verdicts[1] in ("ok", "warn") and state.verdicts[2] in ("ok", "warn")
    assert state.member_tokens[1] == state.member_tokens[2] == state.tokens_seen == train.total_tokens
    assert state.member_tokens[0] < train.total_tokens
    assert state.sae is not sae and state.sae.n_stack == 2 and state.members == [1, 2]
    assert [c.l1_coefficient for c in state.sae.cfgs] == [1.0, 3.0]
    assert len(state.dead_fraction) == 3
    # on_log names members by original index; the stopping step still carries member 0, later ones do not
    stop_step = next(s for s, ms in logs if len(ms) == 2) - train.log_every
    for s, ms in logs:
        assert [d["member"] for d in ms] == ([0, 1, 2] if s <= stop_step else [1, 2])
    assert stop_step * train.batch_size == state.member_tokens[0]

    # the survivors end exactly where they would have with no monitor (scale folded in as usual)
    alone = train_sae(reference, iter(x.split(256)), quick(monitor=MonitorConfig(enabled=False)))
    assert alone.sae is reference and alone.members == [0, 1, 2] and alone.verdicts == ["ok"] * 3
    for name, p in state.sae.named_parameters():
        torch.testing.assert_close(p, reference.get_parameter(name)[1:], rtol=1e-5, atol=1e-6, msg=name)


def nan_at(batches, sae: SAE, at: int, member: int | None):
    """The batches; just before yielding batch `at`, a NaN goes into `sae`'s W_enc (member `member`)."""
    for i, xb in enumerate(batches):
        if i == at:
            with torch.no_grad():
                (sae.W_enc if member is None else sae.W_enc[member])[0, 0] = float("nan")
        yield xb


def test_nan_in_one_member_stops_only_that_member():
    x = sparse_data(256 * 200, 0)
    sae = standard_stack([0.3, 1.0, 3.0])
    state = train_sae(sae, nan_at(x.split(256), sae, 30, member=1), quick())
    assert state.verdicts[1] == "stopped" and state.reasons[1][-1].startswith("nan:")
    assert state.member_tokens[1] == 40 * 256  # the first log step after the NaN
    assert "stopped" not in (state.verdicts[0], state.verdicts[2])
    assert state.members == [0, 2] and state.sae.n_stack == 2
    assert state.member_tokens[0] == state.member_tokens[2] == 256 * 200
    assert all(torch.isfinite(p).all() for p in state.sae.parameters())


def test_a_stopped_single_sae_ends_training():
    x = sparse_data(256 * 200, 0)
    torch.manual_seed(0)
    sae = create_sae(SAEConfig("standard", D_IN, D_SAE, l1_coefficient=1.0))
    logs = []
    state = train_sae(sae, nan_at(x.split(256), sae, 30, member=None), quick(), on_log=lambda s, ms: logs.append(s))
    assert state.verdicts == ["stopped"] and state.reasons[0][-1] == "nan: loss is nan at 10,240 tokens"
    assert state.sae is None and state.members == []
    assert state.step == 40 and state.tokens_seen == state.member_tokens[0] == 40 * 256 and logs[-1] == 40
