"""Every architecture: its math, stacks, input-scale folding, SAELens round trips, training."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from sae_ray.eval import evaluate_sae
from sae_ray.formats import load_sae_dir, save_saelens
from sae_ray.formats.saelens import CFG_FILENAME, WEIGHTS_FILENAME
from sae_ray.sae import ARCHITECTURES, SAE, SAEConfig, create_sae
from sae_ray.sae.jumprelu import JumpReLUFunction, JumpReLUSAE, StepFunction
from sparse_rows import sparse_data
from stack_check import assert_same_outputs, assert_same_state, step_both

ALL = ["standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]
UNIT_NORM = ["topk", "batchtopk", "jumprelu", "gated", "matryoshka"]
K_ARCHS = ["topk", "batchtopk", "matryoshka"]
# three sparsity values per architecture, for stacks whose members differ
SPARSITY = {"k": [2, 4, 7], "l1_coefficient": [0.05, 0.2, 1.0], "l0_coefficient": [0.01, 0.1, 0.5]}


def config(arch: str, d_in: int = 8, d_sae: int = 32, member: int = 1, dtype: str = "float32", **extra) -> SAEConfig:
    """A config with the architecture's member-th sparsity value (jumprelu: a wide bandwidth,
    so that a test batch has pre-activations inside the kernel window)."""
    param = ARCHITECTURES[arch].sparsity_param
    value = min(SPARSITY[param][member], d_sae) if param == "k" else SPARSITY[param][member]
    if arch == "jumprelu":
        extra.setdefault("bandwidth", 0.5)
    return SAEConfig(arch, d_in, d_sae, dtype=dtype, extra=extra, **{param: value})


def perturb(sae: SAE, seed: int = 0) -> SAE:
    """Random values everywhere (not the init's zero biases and tied weights); a BatchTopK
    threshold as if it had been trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(1.0)
    return sae


def batch(n: int = 16, d_in: int = 8, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3


def adam_step(sae: SAE, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad()
    loss.backward()
    sae.pre_step()
    opt.step()
    sae.post_step()


# -- JumpReLU straight-through estimators ------------------------------------------------
#
# With the jump smoothed over a window of width eps around θ, the derivatives w.r.t. θ
# are exactly the STEs. For H: H_s = clip((z - θ)/eps + 1/2, 0, 1). For f = z H(z - θ),
# whose jump at z = θ has height θ: f_s = z - ∫_{-inf}^{θ} (t/eps) K((z - t)/eps) dt.


def smooth_step(z, theta, eps):
    return ((z - theta) / eps + 0.5).clamp(0, 1)


def smooth_jumprelu(z, theta, eps):
    lo = z - eps / 2
    t = theta.clamp(min=lo, max=z + eps / 2)
    return z - (t**2 - lo**2) / (2 * eps)


def test_smoothed_functions_are_the_jumps_outside_the_window():
    z = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    theta = torch.full_like(z, 1.5)
    torch.testing.assert_close(smooth_jumprelu(z, theta, 0.1), z * (z > theta))
    torch.testing.assert_close(smooth_step(z, theta, 0.1), (z > theta).double())


@pytest.mark.parametrize("which", ["jumprelu", "step"])
def test_jumprelu_ste_is_the_derivative_of_the_smoothed_function(which):
    g = torch.Generator().manual_seed(0)
    eps = 0.4
    z = torch.rand(64, 6, generator=g, dtype=torch.float64) * 3
    theta = (torch.rand(6, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    w = torch.randn(64, 6, generator=g, dtype=torch.float64)  # an arbitrary downstream gradient
    fn, smooth = (JumpReLUFunction, smooth_jumprelu) if which == "jumprelu" else (StepFunction, smooth_step)

    (fn.apply(z, theta, eps) * w).sum().backward()
    h = 1e-6
    numeric = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for j in range(6):
            up, down = theta.clone(), theta.clone()
            up[j] += h
            down[j] -= h
            numeric[j] = ((smooth(z, up, eps) - smooth(z, down, eps)) * w).sum() / (2 * h)
    in_window = ((z - theta).abs() < eps / 2).sum(0)
    assert (in_window > 0).all()  # every θ_j has points in its window: the check is not 0 == 0
    torch.testing.assert_close(theta.grad, numeric, rtol=1e-6, atol=1e-6)


def test_jumprelu_ste_gradients_to_z():
    z = torch.tensor([[0.2, 0.9, 1.05, 2.0]], dtype=torch.float64, requires_grad=True)
    theta = torch.ones(4, dtype=torch.float64)
    JumpReLUFunction.apply(z, theta, 0.5).sum().backward()
    assert z.grad.tolist() == [[0.0, 0.0, 1.0, 1.0]]  # through f = z where it fired, nothing else
    z.grad = None
    StepFunction.apply(z, theta, 0.5).sum().backward()
    assert z.grad is None or (z.grad == 0).all()


def test_jumprelu_l0_term_trains_only_the_threshold():
    torch.manual_seed(0)
    sae = perturb(create_sae(config("jumprelu")))
    out = sae(batch())
    out.aux["l0"].backward()
    assert sae.log_threshold.grad.abs().sum() > 0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        grad = getattr(sae, name).grad
        assert grad is None or (grad == 0).all(), name


def test_jumprelu_forward_and_loss():
    torch.manual_seed(0)
    sae = perturb(create_sae(config("jumprelu", member=2)))
    x = batch()
    pre, out = sae.pre_acts(x), sae(x)
    theta = sae.log_threshold.exp()
    f = out.feature_acts
    assert (f != 0).any() and (f == 0).any()
    assert (f[f != 0] > 0).all()
    fired = pre > theta
    torch.testing.assert_close(f, torch.where(fired, pre, 0))  # nothing below θ, z itself above
    torch.testing.assert_close(out.aux["l0"], 0.5 * fired.sum(-1).float().mean())
    sae.sparsity_scale = 0.25
    torch.testing.assert_close(sae(x).aux["l0"], 0.25 * 0.5 * fired.sum(-1).float().mean())


def test_jumprelu_l0_target():
    torch.manual_seed(0)
    sae = perturb(create_sae(config("jumprelu", member=2, l0_target=4.0)))
    x = batch()
    l0 = (sae.pre_acts(x) > sae.log_threshold.exp()).sum(-1).float().mean()
    torch.testing.assert_close(sae(x).aux["l0"], 0.5 * (l0 / 4 - 1) ** 2)
    with pytest.raises(ValueError, match="l0_target"):
        create_sae([config("jumprelu", l0_target=4.0), config("jumprelu")])


def test_jumprelu_dead_latent_losses():
    x = batch()
    plain = perturb(create_sae(config("jumprelu", member=2)))
    aux = plain(x).aux
    assert set(aux) == {"l0", "auxk"}  # AuxK on by default (jumprelu.AUXK_COEFFICIENT), p_act off
    assert aux["auxk"] == 0 and plain.auxk_coefficient == 1 / 32  # zero while no latent is dead

    cfg = config("jumprelu", member=2, pre_act_coefficient=2.0, auxk_coefficient=0.5, k_aux=2)
    sae = perturb(create_sae(cfg))
    sae.dead_tokens = 64
    sae.tokens_since_fired[:3] = 100  # latents 0..2 are dead
    out = sae(x)
    pre, theta = sae.pre_acts(x), sae.log_threshold.exp()
    below = (theta - pre).relu()[:, :3] * sae.W_dec[:3].norm(dim=-1)
    torch.testing.assert_close(out.aux["pre_act"], 2.0 * below.sum(-1).mean())
    # AuxK: the 2 largest dead pre-activations of each row reconstruct the residual
    top = pre[:, :3].topk(2, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    e = (x - out.x_hat).detach()
    torch.testing.assert_close(out.aux["auxk"], 0.5 * (z @ sae.W_dec - e).pow(2).sum(-1).mean())

    # p_act raises the dead latents' z and lowers their θ, and touches no live latent
    sae.zero_grad()
    out.aux["pre_act"].backward()
    assert (sae.b_enc.grad[:3] <= 0).all() and (sae.b_enc.grad[:3] < 0).any()
    assert (sae.log_threshold.grad[:3] >= 0).all() and (sae.log_threshold.grad[:3] > 0).any()
    assert (sae.b_enc.grad[3:] == 0).all() and (sae.log_threshold.grad[3:] == 0).all()

    for key in ("pre_act_coefficient", "auxk_coefficient"):
        with pytest.raises(ValueError, match=key):
            create_sae(config("jumprelu", **{key: -1.0}))


# -- invariants --------------------------------------------------------------------------


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("arch", UNIT_NORM)
def test_unit_norm_decoder_after_steps(arch, stacked):
    torch.manual_seed(0)
    sae = create_sae([config(arch, member=i) for i in range(3)] if stacked else config(arch))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for seed in range(5):
        out = sae(batch(seed=seed))
        opt.zero_grad()
        out.loss.sum().backward()
        sae.pre_step()
        W, g = sae.W_dec, sae.W_dec.grad
        assert (g * W).sum(-1).abs().max() < 1e-5 * max(1.0, g.abs().max().item())  # nothing along the rows
        opt.step()
        sae.post_step()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.shape(32)))


def test_topk_stack_keeps_each_members_k():
    sae = perturb(create_sae([config("topk", member=i) for i in range(3)]))
    f = sae.encode(batch(40))
    assert f.shape == (3, 40, 32)
    for i, k in enumerate(SPARSITY["k"]):
        assert ((f[i] != 0).sum(-1) == k).all()


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_keeps_k_times_batch_in_training(arch):
    sae = perturb(create_sae([config(arch, member=i) for i in range(3)]))
    single = perturb(create_sae(config(arch, member=0)))
    x = batch(24)
    for i, k in enumerate(SPARSITY["k"]):
        f = sae(x).feature_acts[i]
        assert (f != 0).sum() == k * 24
        assert (f != 0).sum(-1).float().std() > 0  # per row it varies: this is not per-row TopK
        pre = sae.pre_acts(x)[i]
        kth = pre.flatten().topk(k * 24).values[-1]
        assert ((f != 0) == (pre >= kth)).all()  # the largest of the whole batch
    assert (single(x).feature_acts != 0).sum() == SPARSITY["k"][0] * 24


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_threshold_and_eval_mode(arch):
    sae = perturb(create_sae([config(arch, member=i) for i in range(3)]))
    with torch.no_grad():
        sae.topk_threshold.zero_()
    sae.eval()
    x = batch(32)
    torch.testing.assert_close(sae.encode(x), sae.pre_acts(x).relu())  # before training: a ReLU
    sae.train()
    f = sae(x).feature_acts
    smallest = torch.stack([fi[fi > 0].min() for fi in f])
    torch.testing.assert_close(sae.topk_threshold, smallest)  # the first batch sets θ
    x2 = batch(32, seed=2)
    f2 = sae(x2).feature_acts
    smallest2 = torch.stack([fi[fi > 0].min() for fi in f2])
    torch.testing.assert_close(sae.topk_threshold, 0.99 * smallest + 0.01 * smallest2)

    sae.eval()
    pre, f = sae.pre_acts(x2), sae.encode(x2)
    theta = sae.topk_threshold.view(3, 1, 1)
    torch.testing.assert_close(f, torch.where(pre > theta, pre, 0))  # nothing below θ
    assert (f[f != 0] > theta.expand_as(f)[f != 0]).all()
    # eval L0 is close to k: θ is the smallest activation BatchTopK keeps
    l0 = (f != 0).sum(-1).float().mean(-1)
    assert ((l0 - torch.tensor(SPARSITY["k"])).abs() < torch.tensor(SPARSITY["k"]) * 0.6 + 1).all()


def test_matryoshka_prefix_losses():
    torch.manual_seed(0)
    sae = perturb(create_sae(config("matryoshka", d_sae=32, matryoshka_prefixes=[4, 12])))
    assert sae.prefixes == [4, 12, 32]
    x = batch()
    out = sae(x)
    f = out.feature_acts
    for m in (4, 12):
        x_hat_m = f[:, :m] @ sae.W_dec[:m] + sae.b_dec
        torch.testing.assert_close(out.aux[f"mse_prefix_{m}"], (x_hat_m - x).pow(2).sum(-1).mean())
    assert set(out.aux) == {"mse_prefix_4", "mse_prefix_12", "auxk"}
    torch.testing.assert_close(out.loss, out.mse + sum(out.aux.values()))
    default = create_sae(config("matryoshka", d_sae=64))
    assert default.prefixes == [4, 8, 16, 32, 64]
    for bad in ([8, 4], [0, 8], [4, 40], "16"):
        with pytest.raises(ValueError, match="matryoshka_prefixes"):
            create_sae(config("matryoshka", d_sae=32, matryoshka_prefixes=bad))
    with pytest.raises(ValueError, match="matryoshka_prefixes"):
        create_sae([config("matryoshka", matryoshka_prefixes=[4, 32]), config("matryoshka")])


def test_gated_forward_and_losses():
    torch.manual_seed(0)
    sae = perturb(create_sae(config("gated", member=1)))
    assert {n for n, _ in sae.named_parameters()} == {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}
    x = batch()
    out = sae(x)
    pi_gate = (x - sae.b_dec) @ sae.W_enc + sae.b_gate
    pi_mag = (x - sae.b_dec) @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (pi_gate > 0) * pi_mag.relu()
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(out.feature_acts, f)
    torch.testing.assert_close(out.x_hat, f @ sae.W_dec + sae.b_dec)
    l1 = 0.2 * (pi_gate.relu() * sae.W_dec.norm(dim=1)).sum(-1).mean()
    aux = (pi_gate.relu() @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.aux["l1"], l1)
    torch.testing.assert_close(out.aux["aux"], aux)
    torch.testing.assert_close(out.loss, out.mse + l1 + aux)
    # the aux reconstruction trains the gate, never the (frozen) decoder
    out.aux["aux"].backward()
    assert sae.W_dec.grad is None and sae.b_dec.grad is not None  # b_dec through the centering only
    assert sae.b_gate.grad.abs().sum() > 0 and sae.W_enc.grad.abs().sum() > 0


def test_sparsity_scale_scales_only_the_sparsity_penalty():
    x = batch()
    for arch, key in [("standard", "l1"), ("gated", "l1"), ("jumprelu", "l0")]:
        sae = perturb(create_sae(config(arch)))
        full = sae(x)
        sae.sparsity_scale = 0.3
        part = sae(x)
        torch.testing.assert_close(part.aux[key], 0.3 * full.aux[key])
        for other in set(full.aux) - {key}:
            torch.testing.assert_close(part.aux[other], full.aux[other])
    sae = perturb(create_sae(config("topk")))
    sae.dead_tokens = 1
    sae.tokens_since_fired.fill_(5)  # all dead: AuxK is on
    full = sae(x).aux["auxk"]
    sae.sparsity_scale = 0.3
    sae.tokens_since_fired.fill_(5)
    assert full > 0 and sae(x).aux["auxk"] == full


def test_adam_betas_and_sparsity_params():
    assert JumpReLUSAE.adam_betas == (0.0, 0.999)
    assert ARCHITECTURES["gated"].adam_betas == (0.0, 0.999)
    for arch in ("standard", "topk", "batchtopk", "matryoshka"):
        assert ARCHITECTURES[arch].adam_betas == (0.9, 0.999)
    params = {arch: ARCHITECTURES[arch].sparsity_param for arch in ALL}
    assert params == {"standard": "l1_coefficient", "gated": "l1_coefficient", "jumprelu": "l0_coefficient",
                      "topk": "k", "batchtopk": "k", "matryoshka": "k"}


def test_configs_name_what_is_missing():
    with pytest.raises(ValueError, match="l0_coefficient"):
        create_sae(SAEConfig("jumprelu", 8, 32))
    with pytest.raises(ValueError, match="l1_coefficient"):
        create_sae(SAEConfig("gated", 8, 32))
    with pytest.raises(ValueError, match="SAEConfig.k"):
        create_sae(SAEConfig("batchtopk", 8, 32, k=0))
    with pytest.raises(ValueError, match="bandwidth"):
        create_sae(config("jumprelu", bandwidth=0))
    with pytest.raises(ValueError, match="l0_coefficient.*not a number"):
        SAEConfig("jumprelu", 8, 32, l0_coefficient="a lot")


# -- stacks ------------------------------------------------------------------------------


def test_stack_shapes_and_attributes():
    sae = create_sae([config("topk", member=i) for i in range(3)])
    assert sae.n_stack == 3 and len(sae.cfgs) == 3 and sae.cfg is sae.cfgs[0]
    shapes = {n: tuple(p.shape) for n, p in sae.named_parameters()}
    assert shapes == {"W_enc": (3, 8, 32), "b_enc": (3, 32), "W_dec": (3, 32, 8), "b_dec": (3, 8)}
    assert sae.tokens_since_fired.shape == (3, 32) and sae.dead_mask.shape == (3, 32)
    single = create_sae(config("topk"))
    assert single.n_stack is None and single.cfgs == [single.cfg]
    # every member starts with its own random decoder
    assert not torch.allclose(sae.W_dec[0], sae.W_dec[1])
    torch.testing.assert_close(sae.W_enc, sae.W_dec.transpose(1, 2))


def test_stack_config_errors():
    with pytest.raises(ValueError, match="d_sae.*member 1"):
        create_sae([config("topk"), config("topk", d_sae=16)])
    with pytest.raises(ValueError, match="architecture"):
        ARCHITECTURES["topk"]([config("topk"), config("batchtopk")])
    with pytest.raises(ValueError, match="dtype"):
        create_sae([config("standard"), config("standard", dtype="float64")])
    with pytest.raises(ValueError, match="stack member 1: SAEConfig.k"):
        create_sae([config("topk"), SAEConfig("topk", 8, 32, k=99)])
    with pytest.raises(ValueError, match="k_aux"):
        create_sae([config("topk", k_aux=3), config("topk")])
    with pytest.raises(ValueError, match="at least one"):
        ARCHITECTURES["topk"]([])
    with pytest.raises(ValueError, match="TopKSAE is 'topk'"):
        ARCHITECTURES["topk"](config("batchtopk"))
    with pytest.raises(ValueError, match="one architecture"):
        SAE.stack([create_sae(config("topk")), create_sae(config("batchtopk"))])
    stack = create_sae([config("topk"), config("topk")])
    with pytest.raises(ValueError, match="already a stack"):
        SAE.stack([stack, stack])
    with pytest.raises(ValueError, match="not a stack"):
        create_sae(config("topk")).unstack()


def _members(arch: str, **extra) -> list[SAE]:
    """Three float64 SAEs with different sparsity, weights and dead latents (none, a
    few, all), so that AuxK runs with different numbers of dead latents per member."""
    saes = []
    for i in range(3):
        cfg = config(arch, member=i, dtype="float64", k_aux=5, **extra)
        sae = perturb(create_sae(cfg), seed=i)
        sae.dead_tokens = 64
        sae.tokens_since_fired[: [0, 3, 32][i]] = 100
        saes.append(sae)
    return saes


# JumpReLU again with both optional dead-latent losses on (per-member coefficients)
@pytest.mark.parametrize("arch,extra", [(a, {}) for a in ALL] + [
    ("jumprelu", {"auxk_coefficient": 0.5, "pre_act_coefficient": 0.3})], ids=ALL + ["jumprelu-dead-losses"])
def test_stack_equals_separate(arch, extra):
    saes = _members(arch, **extra)
    stack = SAE.stack(saes)
    assert stack.n_stack == 3 and [c.__dict__ for c in stack.cfgs] == [s.cfg.__dict__ for s in saes]
    assert_same_state(stack, saes)
    for s in (*saes, stack):
        s.sparsity_scale = 0.7
    opts = [torch.optim.Adam(s.parameters(), lr=1e-2, betas=s.adam_betas) for s in saes]
    stack_opt = torch.optim.Adam(stack.parameters(), lr=1e-2, betas=stack.adam_betas)
    dead_seen = False
    for step in range(3):
        x = batch(24, seed=step, dtype=torch.float64)
        outs = [s(x) for s in saes]
        stack_out = stack(x)
        assert_same_outputs(stack_out, outs)
        if "auxk" in stack_out.aux and step == 0:
            assert stack_out.aux["auxk"][0] == 0 and (stack_out.aux["auxk"][1:] > 0).all()
            dead_seen = True
        step_both(stack, saes, stack_out, outs, stack_opt, opts)
    assert dead_seen or (arch not in K_ARCHS and not extra)

    x = batch(24, seed=9, dtype=torch.float64)
    for s in (*saes, stack):
        s.eval()
    assert_same_outputs(stack(x), [s(x) for s in saes])

    back = stack.unstack()
    assert [type(s) for s in back] == [type(saes[0])] * 3
    assert [asdict(s.cfg) for s in back] == [asdict(s.cfg) for s in saes]
    assert all(not s.training and s.n_stack is None and s.sparsity_scale == 0.7 for s in back)
    assert stack.dead_tokens == 64 and all(s.dead_tokens == 64 for s in back)
    for i, (b, s) in enumerate(zip(back, saes)):
        assert b.state_dict().keys() == s.state_dict().keys()
        for name, t in b.state_dict().items():
            assert torch.equal(t, stack.state_dict()[name][i]), name  # exact copies of the slices
            torch.testing.assert_close(t, s.state_dict()[name], msg=name)  # of what it learned alone
        assert torch.equal(b.tokens_since_fired, s.tokens_since_fired)
        torch.testing.assert_close(b(x).x_hat, s(x).x_hat)
    with torch.no_grad():  # copies, not views
        back[0].W_dec.zero_()
    assert stack.W_dec[0].abs().sum() > 0


def test_stack_members_may_share_k():
    saes = [perturb(create_sae(config("batchtopk", member=1, dtype="float64")), seed=i) for i in range(2)]
    stack = SAE.stack(saes)
    assert stack.k == 4  # one k: the plain path, no rank masks
    x = batch(dtype=torch.float64)
    assert_same_outputs(stack(x), [s(x) for s in saes])


def test_stack_encode_decode_take_shared_or_per_member_batches():
    stack = perturb(create_sae([config("standard", member=i) for i in range(2)]))
    x = batch()
    f = stack.encode(x)
    torch.testing.assert_close(stack.encode(torch.stack([x, x])), f)
    torch.testing.assert_close(stack.decode(f), stack(x).x_hat)


def test_save_of_a_stack_says_unstack(tmp_path):
    with pytest.raises(ValueError, match="unstack"):
        save_saelens(create_sae([config("topk"), config("topk")]), tmp_path)


# -- input scale -------------------------------------------------------------------------


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("arch", ALL)
def test_fold_input_scale(arch, stacked):
    s = 0.37
    sae = perturb(create_sae([config(arch, member=i, dtype="float64") for i in range(2)] if stacked
                             else config(arch, dtype="float64")))
    x = batch(dtype=torch.float64) / s  # raw inputs; the SAE was trained on x * s
    for training in (True, False):
        sae.train(training)
        before = sae(x * s)
        folded = perturb(create_sae(sae.cfgs if stacked else sae.cfg))
        folded.load_state_dict(sae.state_dict())
        folded.fold_input_scale(s)
        folded.train(training)
        after = folded(x)
        assert (before.feature_acts != 0).any()
        torch.testing.assert_close(after.feature_acts, before.feature_acts)
        torch.testing.assert_close(after.x_hat, before.x_hat / s)
    with pytest.raises(ValueError, match="fold_input_scale"):
        sae.fold_input_scale(0)


# -- SAELens files -----------------------------------------------------------------------

META = dict(model_name="gpt2", hook_name="blocks.3.hook_resid_post", hook_layer=3, context_size=128)


@pytest.mark.parametrize("arch", ALL)
def test_save_load_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    sae = perturb(create_sae(SAEConfig(**{**asdict(config(arch, member=2)), **META})))
    if arch in ("batchtopk", "matryoshka"):
        sae(batch(32))  # a real θ from a training batch
    sae.eval()
    save_saelens(sae, tmp_path)
    loaded = load_sae_dir(tmp_path).eval()
    assert type(loaded) is type(sae)
    assert asdict(loaded.cfg) == asdict(sae.cfg)
    x = batch(40, seed=5)
    a, b = sae(x), loaded(x)
    assert (a.feature_acts != 0).any()
    torch.testing.assert_close(b.feature_acts, a.feature_acts, rtol=0, atol=0)
    torch.testing.assert_close(b.x_hat, a.x_hat, rtol=0, atol=0)
    for name, t in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, msg=name)

    cfg = json.loads((tmp_path / CFG_FILENAME).read_text())
    weights = load_file(tmp_path / WEIGHTS_FILENAME)
    shapes = {n: tuple(t.shape) for n, t in weights.items()}
    assert cfg["sae_ray"]["architecture"] == arch
    param = ARCHITECTURES[arch].sparsity_param
    assert cfg["sae_ray"][param] == getattr(sae.cfg, param)
    expected = {"W_enc": (8, 32), "b_enc": (32,), "W_dec": (32, 8), "b_dec": (8,)}
    if arch == "gated":
        assert cfg["architecture"] == "gated"
        del expected["b_enc"]
        expected.update(b_gate=(32,), r_mag=(32,), b_mag=(32,))
    elif arch in ("jumprelu", "batchtopk", "matryoshka"):
        assert cfg["architecture"] == "jumprelu" and cfg["activation_fn_str"] == "relu"
        expected["threshold"] = (32,)
    else:
        assert cfg["architecture"] == arch
    assert shapes == expected
    if arch in ("batchtopk", "matryoshka"):
        assert (weights["threshold"] == sae.topk_threshold.float()).all()
    if arch == "jumprelu":
        torch.testing.assert_close(weights["threshold"], sae.log_threshold.exp().detach())


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_file_runs_as_a_jumprelu(tmp_path, arch):
    """What SAELens sees: without our "sae_ray" section the file is a JumpReLU SAE that
    gives the eval-mode outputs."""
    sae = perturb(create_sae(config(arch, member=1)))
    sae(batch(32))
    sae.eval()
    save_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / CFG_FILENAME).read_text())
    del cfg["sae_ray"]
    (tmp_path / CFG_FILENAME).write_text(json.dumps(cfg))
    as_jumprelu = load_sae_dir(tmp_path).eval()
    assert isinstance(as_jumprelu, JumpReLUSAE) and as_jumprelu.cfg.l0_coefficient == 0.0
    x = batch(40, seed=5)
    torch.testing.assert_close(as_jumprelu.encode(x), sae.encode(x))
    torch.testing.assert_close(as_jumprelu(x).x_hat, sae(x).x_hat)


def test_batchtopk_file_with_varying_threshold_is_refused(tmp_path):
    from safetensors.torch import save_file

    sae = create_sae(config("batchtopk"))
    save_saelens(sae, tmp_path)
    weights = load_file(tmp_path / WEIGHTS_FILENAME)
    weights["threshold"] = torch.rand(32)
    save_file(weights, tmp_path / WEIGHTS_FILENAME)
    with pytest.raises(ValueError, match="sae_weights.safetensors.*one threshold"):
        load_sae_dir(tmp_path)


# -- properties --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    arch=st.sampled_from(ALL),
    n_stack=st.sampled_from([None, 1, 2, 3]),
    b=st.integers(1, 6),
    d_in=st.integers(1, 8),
    d_sae=st.integers(1, 16),
    training=st.booleans(),
    data=st.data(),
)
def test_shapes_and_nonnegative_latents(arch, n_stack, b, d_in, d_sae, training, data):
    param = ARCHITECTURES[arch].sparsity_param
    n = n_stack or 1
    if param == "k":
        values = data.draw(st.lists(st.integers(1, d_sae), min_size=n, max_size=n))
    else:
        values = data.draw(st.lists(st.floats(0, 2), min_size=n, max_size=n))
    cfgs = [SAEConfig(arch, d_in, d_sae, **{param: v}) for v in values]
    sae = perturb(create_sae(cfgs if n_stack else cfgs[0]), seed=data.draw(st.integers(0, 2**16)))
    sae.train(training)
    lead = (n_stack,) if n_stack else ()
    x = torch.randn(b, d_in) * 3
    f = sae.encode(x)
    assert f.shape == (*lead, b, d_sae)
    assert (f >= 0).all()
    assert sae.decode(f).shape == (*lead, b, d_in)
    out = sae(x)
    assert out.x_hat.shape == (*lead, b, d_in) and out.feature_acts.shape == (*lead, b, d_sae)
    assert out.loss.shape == lead and out.mse.shape == lead
    assert all(v.shape == lead for v in out.aux.values())
    assert torch.isfinite(out.loss).all()
    assert (out.feature_acts >= 0).all()
    if arch == "topk":
        k = torch.tensor(values).view(*lead, 1)
        assert ((out.feature_acts != 0).sum(-1) <= k).all()


# -- training ----------------------------------------------------------------------------


# config, and the most FVU and L0 after 300 steps (measured, with a margin); JumpReLU
# thresholds learn slowly (log θ, as Gemma Scope), so it gets a wide kernel and a high θ_0
TRAIN = {
    "standard": ({"l1_coefficient": 1.0}, 0.15, 16),
    "gated": ({"l1_coefficient": 3.0}, 0.2, 16),
    "jumprelu": ({"l0_coefficient": 0.2, "extra": {"bandwidth": 0.1, "threshold_init": 0.1}}, 0.15, 32),
    "topk": ({"k": 4}, 0.2, 4),
    "batchtopk": ({"k": 4}, 0.2, 6),
    "matryoshka": ({"k": 4}, 0.3, 6),
}


def train(cfg: SAEConfig, steps: int = 300) -> tuple[SAE, dict, dict]:
    """`steps` Adam steps of 256 rows (lr 3e-3, the architecture's betas); the SAE and
    its figures on held-out rows before and after."""
    torch.manual_seed(0)
    x, x_test = sparse_data(256 * steps, seed=0, n_feat=48, p=0.06), sparse_data(2000, seed=1, n_feat=48, p=0.06)
    sae = create_sae(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(x[:2000].mean(0))
    start = evaluate_sae(sae, x_test)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3, betas=sae.adam_betas)
    for xb in x.split(256):
        adam_step(sae, opt, sae(xb).loss)
    return sae, start, evaluate_sae(sae, x_test)


@pytest.mark.parametrize("arch", ALL)
def test_training_reduces_fvu(arch):
    kw, max_fvu, max_l0 = TRAIN[arch]
    sae, start, end = train(SAEConfig(arch, 32, 64, **kw))
    assert start["fvu"] > 0.5
    assert end["fvu"] < max_fvu, end
    assert end["l0"] <= max_l0, end
    if sae.unit_norm_decoder:
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_jumprelu_l0_penalty_lowers_l0():
    extra = TRAIN["jumprelu"][0]["extra"]
    _, _, free = train(SAEConfig("jumprelu", 32, 64, l0_coefficient=0.0, extra=extra))
    _, _, penalised = train(SAEConfig("jumprelu", 32, 64, l0_coefficient=0.2, extra=extra))
    assert penalised["l0"] < 0.75 * free["l0"], (free, penalised)


def test_training_a_stack():
    torch.manual_seed(0)
    x, x_test = sparse_data(256 * 200, seed=0, n_feat=48, p=0.06), sparse_data(2000, seed=1, n_feat=48, p=0.06)
    stack = create_sae([SAEConfig("batchtopk", 32, 64, k=k) for k in (2, 4, 8)])
    with torch.no_grad():
        stack.b_dec.copy_(x[:2000].mean(0).expand(3, -1))
    opt = torch.optim.Adam(stack.parameters(), lr=3e-3)
    for xb in x.split(256):
        adam_step(stack, opt, stack(xb).loss.sum())
    results = [evaluate_sae(s, x_test) for s in stack.unstack()]
    assert all(r["fvu"] < 0.4 for r in results), results
    assert results[0]["fvu"] > results[1]["fvu"] > results[2]["fvu"]
    assert results[0]["l0"] < results[1]["l0"] < results[2]["l0"]
