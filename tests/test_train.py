"""The training loop: schedules, Adam, clipping, data init, activation scaling, stacks."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from sae_ray.config import TrainConfig
from sae_ray.eval import evaluate_sae
from sae_ray.sae import ARCHITECTURES, SAE, SAEConfig, create_sae
from sae_ray.train import loop
from sae_ray.train.init import expected_norm_scale, geometric_median
from sae_ray.train.loop import train_sae
from sae_ray.train.optim import Adam, clip_grad_norm_, lr_factor, sparsity_factor
from sparse_rows import sparse_data

D_IN, D_SAE = 32, 64



SPARSITY = {"k": 4, "l1_coefficient": 1.0, "l0_coefficient": 0.1}


def sae_cfg(arch: str, **kw) -> SAEConfig:
    param = ARCHITECTURES[arch].sparsity_param
    kw.setdefault(param, SPARSITY[param])
    return SAEConfig(arch, D_IN, D_SAE, **kw)


def make_stack(cfgs: list[SAEConfig]) -> SAE:
    """A stack of SAEs."""
    return ARCHITECTURES[cfgs[0].architecture](cfgs)


def quick(**kw) -> TrainConfig:
    """A short run: 256-row batches, 200 steps, lr 3e-3, warmup and decay as the defaults say."""
    kw.setdefault("batch_size", 256)
    kw.setdefault("total_tokens", 256 * 200)
    kw.setdefault("lr", 3e-3)
    return TrainConfig(**kw)


# -- schedules -------------------------------------------------------------


def test_lr_warmup_then_constant():
    train = TrainConfig(lr_warmup_steps=10, lr_decay="none")
    assert [lr_factor(s, 1000, train) for s in (0, 4, 9, 10, 500, 999)] == pytest.approx([0.1, 0.5, 1, 1, 1, 1])


def test_lr_warmup_is_capped_at_a_tenth_of_the_run():
    train = TrainConfig(lr_warmup_steps=1000, lr_decay="none")
    assert lr_factor(0, 100, train) == pytest.approx(0.1)
    assert lr_factor(9, 100, train) == 1.0
    assert lr_factor(0, 5, train) == 1.0  # a run too short for warmup


def test_lr_linear_decay_over_the_last_fifth():
    train = TrainConfig(lr_warmup_steps=10, lr_decay="linear", lr_decay_fraction=0.2, lr_end_factor=0.0)
    got = [lr_factor(s, 100, train) for s in (10, 79, 80, 90, 99)]
    assert got == pytest.approx([1, 1, 1, 0.5, 0.05])
    end = TrainConfig(lr_warmup_steps=0, lr_decay="linear", lr_decay_fraction=0.5, lr_end_factor=0.2)
    assert lr_factor(75, 100, end) == pytest.approx(0.6)  # halfway down from 1 to 0.2


def test_lr_cosine_after_warmup():
    train = TrainConfig(lr_warmup_steps=10, lr_decay="cosine", lr_end_factor=0.1)
    assert lr_factor(10, 110, train) == pytest.approx(1.0)
    assert lr_factor(60, 110, train) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_factor(109, 110, train) == pytest.approx(0.1, abs=1e-3)


def test_sparsity_warmup():
    train = TrainConfig(sparsity_warmup_fraction=0.05)
    assert [sparsity_factor(s, 200, train) for s in (0, 5, 10, 150)] == pytest.approx([0, 0.5, 1, 1])
    assert sparsity_factor(0, 200, TrainConfig(sparsity_warmup_fraction=0.0)) == 1.0


def test_loop_applies_the_schedules():
    torch.manual_seed(0)
    sae = create_sae(sae_cfg("standard"))
    train = quick(total_tokens=256 * 40, lr_warmup_steps=8, sparsity_warmup_fraction=0.25, log_every=1)
    logs = []
    train_sae(sae, iter(sparse_data(256 * 40, 0).split(256)), train, on_log=lambda s, m: logs.append(m[0]))
    assert [m["lr"] for m in logs] == pytest.approx([train.lr * lr_factor(s, 40, train) for s in range(40)])
    assert [m["sparsity_scale"] for m in logs] == pytest.approx([sparsity_factor(s, 40, train) for s in range(40)])
    assert logs[0]["sparsity_scale"] == 0.0 and logs[-1]["lr"] < train.lr / 5
    assert sae.sparsity_scale == 1.0  # the returned SAE has its full penalty


# -- Adam ------------------------------------------------------------------


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.999)])
def test_adam_matches_torch_adam(betas):
    torch.manual_seed(0)
    ours = create_sae(sae_cfg("topk"))
    ref, start = copy.deepcopy(ours), copy.deepcopy(ours)
    opts = [Adam(ours.parameters(), lr=1e-2, betas=betas), torch.optim.Adam(ref.parameters(), lr=1e-2, betas=betas)]
    for xb in sparse_data(64 * 8, 0).split(64):
        for sae, opt in zip((ours, ref), opts):
            opt.zero_grad()
            sae(xb).loss.backward()
            sae.pre_step()
            opt.step()
            sae.post_step()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert not torch.equal(p, start.get_parameter(name)), name
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("lrs", [[1e-1, 1e-2, 0.0], [1e-2] * 3])
@pytest.mark.parametrize("n_stack", [None, 3])
def test_adam_steps_each_member_of_a_stacked_tensor_as_torch_adam_steps_it_alone(lrs, n_stack):
    # a list of lrs steps member by member; one float with n_stack does so on CPU; one float
    # without n_stack steps the whole tensor
    torch.manual_seed(0)
    stacked = torch.randn(3, 4, 5, requires_grad=True)
    singles = [stacked[k].detach().clone().requires_grad_() for k in range(3)]
    ours = Adam([stacked], lr=lrs if len(set(lrs)) > 1 else lrs[0], n_stack=n_stack)
    refs = [torch.optim.Adam([p], lr=lr) for p, lr in zip(singles, lrs)]
    for _ in range(5):
        target = torch.randn(3, 4, 5)
        ours.zero_grad()
        (stacked - target).pow(3).sum().backward()
        ours.step()
        for k, (p, opt) in enumerate(zip(singles, refs)):
            opt.zero_grad()
            (p - target[k]).pow(3).sum().backward()
            opt.step()
    for k in range(3):
        torch.testing.assert_close(stacked[k].detach(), singles[k].detach(), rtol=1e-6, atol=1e-7)


def test_adam_betas_from_config_else_architecture(monkeypatch):
    seen = []

    class Recording(Adam):
        def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, n_stack=None):
            seen.append(tuple(betas))
            super().__init__(params, lr, betas, eps, n_stack)

    monkeypatch.setattr(loop, "Adam", Recording)
    sae = create_sae(sae_cfg("topk"))
    sae.adam_betas = (0.0, 0.99)  # what a JumpReLU class says
    x = sparse_data(512, 0)
    train_sae(sae, iter(x.split(256)), quick(total_tokens=512))
    train_sae(sae, iter(x.split(256)), quick(total_tokens=512, adam_betas=(0.5, 0.9)))
    assert seen == [(0.0, 0.99), (0.5, 0.9)]


def test_adam_rejects_bad_betas():
    with pytest.raises(ValueError, match="adam_betas"):
        Adam([torch.zeros(2, requires_grad=True)], lr=1e-3, betas=(1.0, 0.999))


def test_stack_learning_rate_per_member():
    torch.manual_seed(0)
    sae = make_stack([sae_cfg("topk"), sae_cfg("topk")])
    W_enc = sae.W_enc.detach().clone()
    logs = []
    train = quick(total_tokens=256 * 20, normalize_activations="none")
    train_sae(sae, iter(sparse_data(256 * 20, 0).split(256)), train, lrs=[3e-3, 0.0], on_log=lambda s, m: logs.append(m))
    assert not torch.allclose(sae.W_enc[0], W_enc[0])
    assert torch.equal(sae.W_enc[1], W_enc[1])
    assert logs[-1][1]["lr"] == 0.0 and logs[-1][0]["lr"] > 0


# -- gradient clipping ------------------------------------------------------


def test_clip_global_norm():
    params = [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 1.0)
    after = torch.cat([p.grad.flatten() for p in params]).norm()
    assert norm == pytest.approx(torch.cat([g.flatten() for g in before]).norm().item())
    assert after <= 1.0 + 1e-5 and after == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(params[0].grad / params[0].grad.norm(), before[0] / before[0].norm())


def test_clip_per_member_norm():
    params = [torch.zeros(2, 3, 4, requires_grad=True), torch.zeros(2, 5, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
        p.grad[0] *= 100  # member 0 far over the limit
        p.grad[1] *= 0.01  # member 1 well under it
    small = [p.grad[1].clone() for p in params]
    norms = clip_grad_norm_(params, 1.0, n_stack=2)
    assert norms.shape == (2,) and norms[0] > 1 > norms[1]
    member = [torch.cat([p.grad[k].flatten() for p in params]).norm().item() for k in range(2)]
    assert member[0] == pytest.approx(1.0, rel=1e-4)
    for p, g in zip(params, small):
        assert torch.equal(p.grad[1], g)


def test_clip_per_member_in_a_stack():
    torch.manual_seed(0)
    sae = make_stack([sae_cfg("topk"), sae_cfg("topk", k=8)])
    x = sparse_data(256, 0) * 50
    sae(x).loss.sum().backward()
    clip_grad_norm_(sae.parameters(), 1.0, n_stack=2)
    for k in range(2):
        norm = torch.cat([p.grad[k].flatten() for p in sae.parameters() if p.grad is not None]).norm()
        assert norm <= 1.0 + 1e-4


def test_loop_clips_gradients(monkeypatch):
    norms = []

    def recording(params, max_norm, n_stack=None):
        out = clip_grad_norm_(params, max_norm, n_stack)
        norms.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm().item())
        return out

    monkeypatch.setattr(loop, "clip_grad_norm_", recording)
    x = sparse_data(256 * 5, 0) * 100
    train_sae(create_sae(sae_cfg("topk")), iter(x.split(256)),
              quick(total_tokens=len(x), normalize_activations="none", grad_clip_norm=0.5))
    assert len(norms) == 5 and max(norms) <= 0.5 + 1e-5


# -- data init ---------------------------------------------------------------


def test_geometric_median_resists_outliers():
    g = torch.Generator().manual_seed(0)
    center = torch.full((8,), 3.0)
    bulk = center + torch.randn(1000, 8, generator=g)
    outliers = center + 1000.0 * torch.eye(8)[0] + torch.randn(100, 8, generator=g)
    x = torch.cat([bulk, outliers])
    median = geometric_median(x)
    assert (median - center).norm() < 0.5  # 9% outliers 1000 away pull it by ~0.3
    assert (median - center).norm() < (x.mean(0) - center).norm() / 100


@pytest.mark.parametrize("method,normalize", [("geometric_median", "none"), ("geometric_median", "expected_norm"),
                                              ("mean", "none"), ("zeros", "none")])
def test_b_dec_is_initialised_before_the_first_step(method, normalize):
    torch.manual_seed(0)
    sae = create_sae(sae_cfg("topk"))
    seen = []
    pre_step = sae.pre_step
    sae.pre_step = lambda: (seen.append(sae.b_dec.detach().clone()), pre_step())  # after backward, before any update
    x = sparse_data(256 * 12, 0, offset=5.0)
    train = quick(total_tokens=len(x), b_dec_init=method, normalize_activations=normalize)
    state = train_sae(sae, iter(x.split(256)), train)
    first = x[:2560]  # the 10 init batches (<= 4096 rows)
    expected = {"geometric_median": geometric_median(first), "mean": first.mean(0), "zeros": torch.zeros(D_IN)}[method]
    torch.testing.assert_close(seen[0], expected * state.input_scale, rtol=1e-4, atol=1e-5)


# -- activation scaling -------------------------------------------------------


def test_activation_scaling_is_folded_into_the_saved_sae():
    torch.manual_seed(0)
    x = sparse_data(256 * 200, 0, scale=400.0, offset=100.0)  # norms in the hundreds
    x_test = sparse_data(2000, 1, scale=400.0, offset=100.0)
    sae = create_sae(sae_cfg("topk"))
    state = train_sae(sae, iter(x.split(256)), quick(total_tokens=len(x)))
    init = x[: 256 * 10]
    assert state.input_scale == pytest.approx(math.sqrt(D_IN / init.double().pow(2).sum(1).mean().item()), rel=1e-6)
    assert state.input_scale == pytest.approx(expected_norm_scale(list(init.split(256))))
    final = evaluate_sae(sae, x_test)  # raw activations in, raw reconstructions out
    assert final["fvu"] < 0.15
    assert final["l0"] == pytest.approx(4, abs=0.1)


def test_no_normalization_keeps_scale_one():
    x = sparse_data(256 * 4, 0, scale=400.0)
    sae = create_sae(sae_cfg("topk"))
    state = train_sae(sae, iter(x.split(256)), quick(total_tokens=len(x), normalize_activations="none"))
    assert state.input_scale == 1.0


# -- whole runs ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_short_run_reaches_low_fvu(arch):
    torch.manual_seed(0)
    x, x_test = sparse_data(256 * 200, 0), sparse_data(2000, 1)
    sae = create_sae(sae_cfg(arch))
    start = evaluate_sae(sae, x_test)
    logs = []
    state = train_sae(sae, iter(x.split(256)), quick(log_every=50), on_log=lambda s, m: logs.append((s, m)))
    end = evaluate_sae(sae, x_test)
    assert start["fvu"] > 0.5 and end["fvu"] < 0.1
    assert end["l0"] < 10
    assert state.step == 200 and state.tokens_seen == len(x) and len(state.dead_fraction) == 1
    assert [s for s, _ in logs] == [50, 100, 150, 200]
    m = logs[-1][1]
    assert len(logs[-1][1]) == 1 and m[0]["tokens"] == len(x) and m[0]["fvu"] < 0.1
    aux = {"standard": "l1_loss", "topk": "auxk_loss"}[arch]
    assert {"loss", "mse", "fvu", "l0", "dead_fraction", aux, "lr", "sparsity_scale", "tokens", "tokens_per_s"} <= set(m[0])


def test_stops_at_total_tokens_and_trains_on_the_init_batches():
    x = sparse_data(256 * 30, 0)
    seen = []

    def batches():
        for xb in x.split(256):
            seen.append(len(seen))
            yield xb

    state = train_sae(create_sae(sae_cfg("topk")), batches(), quick(total_tokens=256 * 12))
    assert state.step == 12 and state.tokens_seen == 256 * 12 and len(seen) == 12


def test_bf16_autocast_on_cpu_trains():
    torch.manual_seed(0)
    x, x_test = sparse_data(256 * 60, 0), sparse_data(2000, 1)
    sae = create_sae(sae_cfg("topk"))
    train_sae(sae, iter(x.split(256)), quick(total_tokens=len(x), autocast="bf16"))
    assert sae.W_enc.dtype == torch.float32  # parameters and Adam stay in float32
    assert evaluate_sae(sae, x_test)["fvu"] < 0.35


def test_lrs_must_match_the_stack():
    with pytest.raises(ValueError, match="lrs"):
        train_sae(create_sae(sae_cfg("topk")), iter([torch.randn(8, D_IN)]), quick(), lrs=[1e-3, 1e-4])


def test_stack_reports_each_member():
    torch.manual_seed(0)
    sae = make_stack([sae_cfg("topk", k=2), sae_cfg("topk", k=8)])
    x, x_test = sparse_data(256 * 200, 0), sparse_data(2000, 1)
    logs = []
    state = train_sae(sae, iter(x.split(256)), quick(log_every=100), on_log=lambda s, m: logs.append(m))
    assert len(state.dead_fraction) == 2 and len(logs[-1]) == 2
    assert [m["l0"] for m in logs[-1]] == pytest.approx([2, 8], abs=0.1)
    assert logs[-1][1]["fvu"] < logs[-1][0]["fvu"] < 0.5
    for k, member in enumerate(sae.unstack()):
        assert evaluate_sae(member, x_test)["fvu"] == pytest.approx(logs[-1][k]["fvu"], abs=0.1)


def test_dead_latents_are_those_of_train_dead_tokens():
    """The loop hands train.dead_tokens to the SAE: the latents AuxK treats as dead are the
    ones counted in dead_fraction."""
    torch.manual_seed(0)
    sae = make_stack([sae_cfg("topk", k=2), sae_cfg("topk", k=8)])
    x = sparse_data(256 * 8, 0)
    state = train_sae(sae, iter(x.split(256)), quick(total_tokens=len(x), dead_tokens=512))
    assert sae.dead_tokens == 512
    assert state.dead_fraction == sae.dead_mask.float().mean(-1).tolist()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("stacked", [False, True])
def test_every_architecture_runs_through_the_loop(arch, stacked):
    torch.manual_seed(0)
    cfg = sae_cfg(arch)
    sae = make_stack([cfg, copy.deepcopy(cfg)]) if stacked else create_sae(cfg)
    x = sparse_data(128 * 12, 0, scale=40.0)
    logs = []
    state = train_sae(sae, iter(x.split(128)), quick(total_tokens=len(x), log_every=6), on_log=lambda s, m: logs.append(m))
    assert len(logs) == 2 and len(logs[-1]) == (2 if stacked else 1) and len(state.dead_fraction) == len(logs[-1])
    for m in logs[-1]:
        assert all(math.isfinite(v) for v in m.values()), m
        assert m["loss"] == pytest.approx(m["mse"] + sum(v for k, v in m.items() if k.endswith("_loss")), rel=1e-4)



OTHER_SPARSITY = {"k": [3, 5, 8], "l1_coefficient": [0.3, 1.0, 3.0], "l0_coefficient": [0.03, 0.1, 0.3]}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_stack_trains_to_the_same_weights_as_separate_saes(arch):
    """A stack of 3 (different sparsity each) trained by train_sae == the 3 SAEs trained alone on the same batches."""
    param = ARCHITECTURES[arch].sparsity_param
    separate = []
    for i, value in enumerate(OTHER_SPARSITY[param]):
        torch.manual_seed(i)
        separate.append(create_sae(sae_cfg(arch, **{param: value})))
    stack = SAE.stack([copy.deepcopy(s) for s in separate])
    x = sparse_data(128 * 20, 3, scale=10.0)
    train = quick(total_tokens=len(x), lr=1e-3, lr_warmup_steps=4)
    for sae in separate:
        train_sae(sae, iter(x.split(128)), train)
    train_sae(stack, iter(x.split(128)), train)
    for alone, member in zip(separate, stack.unstack()):
        for name, p in alone.state_dict().items():
            torch.testing.assert_close(member.state_dict()[name], p, rtol=1e-4, atol=1e-5, msg=f"{arch} {name}")


# -- keeping freed memory -----------------------------------------------------

FAULTS_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from sae_ray.train.memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    faults, rss = [], []
    for _ in range(20):  # 64 MB, over the 32 MB above which glibc maps every block fresh from the kernel
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(64 * 2**20 // 4)
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        rss.append(int(open("/proc/self/statm").read().split()[1]) * 4096)
    print(faults[-1], rss[-1] - rss[0])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_freed_blocks_instead_of_fresh_pages():
    # in subprocesses: the setting is process-wide and lasts
    runs = {mode: subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True,
                                 check=True).stdout.split() for mode in ("keep", "default")}
    (keep_faults, keep_growth), (default_faults, _) = [map(int, runs[m]) for m in ("keep", "default")]
    block = 64 * 2**20
    assert default_faults > block // 4096 // 2, runs  # glibc's default: every page of the new block faults again
    assert keep_faults < block // 4096 // 20, runs  # kept: the block reuses memory freed before
    # the heap settles (glibc's aligned allocations leave some slack), it does not grow by a block a step
    assert keep_growth < 10 * block, runs
