"""Transcoders: every architecture reading one activation and reconstructing another (SAEConfig.d_out),
with and without a skip connection (W_skip); their math, stacks, sparse decoding, input scales,
training through `train_sae` on (x_in, x_out) pairs, SAELens files and Gemma Scope's params.npz."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_ray.config import TrainConfig
from sae_ray.eval import evaluate_sae
from sae_ray.formats import SAEFileError, load_gemmascope, load_sae_dir, load_sae_path, save_saelens, save_sparsify
from sae_ray.formats.saelens import CFG_FILENAME, WEIGHTS_FILENAME
from sae_ray.sae import ARCHITECTURES, SAE, SAEConfig, create_sae
from sae_ray.train.checkpoint import load_checkpoint, save_checkpoint
from sae_ray.train.init import expected_norm_scale
from sae_ray.train.loop import train_sae
from sparse_rows import sparse_data
from stack_check import assert_same_outputs, assert_same_state, step_both

ALL = ["standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]
K_ARCHS = ["topk", "batchtopk", "matryoshka"]
SPARSITY = {"k": [2, 4, 7], "l1_coefficient": [0.05, 0.2, 1.0], "l0_coefficient": [0.01, 0.1, 0.5]}
D_IN, D_OUT, D_SAE = 8, 12, 32
CASES = [(a, s) for a in ALL for s in (False, True)]
IDS = [f"{a}{'-skip' if s else ''}" for a, s in CASES]


def config(arch: str, member: int = 1, d_out: int | None = D_OUT, skip: bool = False, dtype: str = "float32",
           d_sae: int = D_SAE, **extra) -> SAEConfig:
    """A transcoder config with the architecture's member-th sparsity value (jumprelu: a wide
    bandwidth, so that a test batch has pre-activations inside the kernel window)."""
    param = ARCHITECTURES[arch].sparsity_param
    value = min(SPARSITY[param][member], d_sae) if param == "k" else SPARSITY[param][member]
    if arch == "jumprelu":
        extra.setdefault("bandwidth", 0.5)
    return SAEConfig(arch, D_IN, d_sae, d_out=d_out, skip=skip, dtype=dtype, extra=extra, **{param: value})


def perturb(sae: SAE, seed: int = 0) -> SAE:
    """Random values everywhere (W_skip too); a BatchTopK threshold as if it had been trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(1.0)
    return sae


def pair(n: int = 16, seed: int = 1, d_out: int = D_OUT, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D_IN, generator=g, dtype=dtype) * 3, torch.randn(n, d_out, generator=g, dtype=dtype) * 2)


# -- config and math ---------------------------------------------------------------------


def test_config_fields_and_errors():
    sae_cfg, tc = SAEConfig("topk", 8, 32, k=4), config("topk")
    assert not sae_cfg.is_transcoder and sae_cfg.d_target == 8
    assert sae_cfg.hook_name_out == "" and sae_cfg.hook_layer_out == -1
    assert tc.is_transcoder and tc.d_target == D_OUT and not tc.skip
    assert SAEConfig("topk", 8, 32, k=4, d_out=8).is_transcoder  # same width, still another activation
    with pytest.raises(ValueError, match=r"SAEConfig\.skip: True, but d_out is None.*transcoder"):
        SAEConfig("topk", 8, 32, k=4, skip=True)
    with pytest.raises(ValueError, match=r"SAEConfig\.d_out: 0 is not positive"):
        SAEConfig("topk", 8, 32, k=4, d_out=0)
    with pytest.raises(ValueError, match=r"SAEConfig\.d_out: 2\.5 is not an integer"):
        SAEConfig("topk", 8, 32, k=4, d_out=2.5)
    with pytest.raises(ValueError, match=r"SAEConfig\.skip: 'yes'"):
        SAEConfig("topk", 8, 32, k=4, d_out=8, skip="yes")
    with pytest.raises(ValueError, match=r"SAEConfig\.d_out: stack member 1 has None, member 0 has 12"):
        create_sae([config("topk"), SAEConfig("topk", D_IN, D_SAE, k=4)])
    with pytest.raises(ValueError, match=r"SAEConfig\.skip: stack member 1 has True, member 0 has False"):
        create_sae([config("topk"), config("topk", skip=True)])


@pytest.mark.parametrize("arch,skip", CASES, ids=IDS)
def test_shapes_init_and_math(arch, skip):
    """Shapes as SAELens's Transcoder; the input is not centred by the output-space b_dec; x_hat =
    f @ W_dec + b_dec (+ x @ W_skip^T); the losses compare with the target."""
    torch.manual_seed(0)
    sae = create_sae(config(arch, skip=skip, dtype="float64"))
    shapes = {n: tuple(p.shape) for n, p in sae.named_parameters()}
    assert shapes["W_enc"] == (D_IN, D_SAE) and shapes["W_dec"] == (D_SAE, D_OUT) and shapes["b_dec"] == (D_OUT,)
    assert ("W_skip" in shapes) == skip and shapes.get("W_skip", (D_OUT, D_IN)) == (D_OUT, D_IN)
    if skip:
        assert (sae.W_skip == 0).all()  # as SAELens
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.full((D_SAE,), sae.decoder_init_norm, dtype=torch.float64))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((D_SAE,), sae.decoder_init_norm, dtype=torch.float64))

    perturb(sae)
    x, y = pair(dtype=torch.float64)
    for training in (True, False):
        sae.train(training)
        bias = 0 if arch == "gated" else sae.b_enc
        torch.testing.assert_close(sae.pre_acts(x), x @ sae.W_enc + bias)  # no x - b_dec
        out = sae(x, y)
        f = out.feature_acts
        x_hat = f @ sae.W_dec + sae.b_dec + (x @ sae.W_skip.T if skip else 0)
        torch.testing.assert_close(out.x_hat, x_hat)
        torch.testing.assert_close(sae.decode(f, x), x_hat)
        torch.testing.assert_close(out.mse, (x_hat - y).pow(2).sum(-1).mean())
        assert out.x_hat.shape == (16, D_OUT) and f.shape == (16, D_SAE)
    if arch == "gated":  # the gate's reconstruction: frozen decoder (and skip), against the target
        sae.train()
        gate = (sae.pre_acts(x) + sae.b_gate).relu()
        x_gate = gate @ sae.W_dec + sae.b_dec + (x @ sae.W_skip.T if skip else 0)
        torch.testing.assert_close(sae(x, y).aux["aux"], (x_gate - y).pow(2).sum(-1).mean())
    if arch == "matryoshka":
        sae.train()
        out = sae(x, y)
        for m in sae.prefixes[:-1]:
            x_hat_m = out.feature_acts[:, :m] @ sae.W_dec[:m] + sae.b_dec + (x @ sae.W_skip.T if skip else 0)
            torch.testing.assert_close(out.aux[f"mse_prefix_{m}"], (x_hat_m - y).pow(2).sum(-1).mean())


def test_auxk_reconstructs_the_residual_of_the_target():
    sae = perturb(create_sae(config("topk", skip=True, dtype="float64", k_aux=3)))
    sae.dead_tokens, sae.sparse_decoding = 10, False
    sae.tokens_since_fired[:20] = 100  # 20 dead latents
    x, y = pair(dtype=torch.float64)
    dead = sae.dead_mask.clone()  # the forward pass counts this batch's firing after its losses
    out = sae(x, y)
    pre = sae.pre_acts(x)
    top = pre.masked_fill(~dead, -torch.inf).topk(3, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    e = y - out.x_hat
    expected = sae.auxk_coefficient * (z @ sae.W_dec - e).pow(2).sum(-1).mean()  # min(20 / 3, 1) = 1
    torch.testing.assert_close(out.aux["auxk"], expected)
    assert sae.k_aux == 3 and create_sae(config("topk")).k_aux == D_OUT // 2  # half the output's width


def test_bad_input_is_named():
    sae = create_sae(config("topk", skip=True))
    x, y = pair()
    with pytest.raises(ValueError, match=r"transcoder \(SAEConfig\.d_out=12\).*forward\(x, target\)"):
        sae(x)
    with pytest.raises(ValueError, match=r"target has shape \[16, 7\]; expected \[B=16, d_out=12\]"):
        sae(x, torch.zeros(16, 7))
    with pytest.raises(ValueError, match=r"target has shape \[15, 12\]; expected \[B=16, d_out=12\]"):
        sae(x, y[:15])
    with pytest.raises(ValueError, match=r"x has shape \[16, 12\]; expected \[B, d_in=8\]"):
        sae(y, y)
    with pytest.raises(ValueError, match=r"SAEConfig\.skip=True.*decode\(f, x\)"):
        sae.decode(sae.encode(x))
    with pytest.raises(ValueError, match=r"target has shape \[16, 12\]; expected \[B=16, d_in \(an SAE"):
        create_sae(SAEConfig("topk", D_IN, D_SAE, k=4))(x, y)
    with pytest.raises(ValueError, match=r"evaluate_sae: this is a transcoder \(SAEConfig\.d_out=12\); pass target"):
        evaluate_sae(sae, x)
    with pytest.raises(ValueError, match=r"evaluate_sae: target has shape \[16, 5\]; expected \[N=16, d_out=12\]"):
        evaluate_sae(sae, x, torch.zeros(16, 5))
    with pytest.raises(ValueError, match=r"save_sparsify: this is a transcoder \(SAEConfig\.d_out=12\)"):
        save_sparsify(create_sae(config("topk")), "unused")


def test_evaluate_sae_measures_against_the_target():
    sae = perturb(create_sae(config("jumprelu", skip=True))).eval()
    x, y = pair(100)
    got = evaluate_sae(sae, x, y, batch_size=30)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x), x)
    sq = (x_hat - y).pow(2).sum()
    assert got["mse"] == pytest.approx(sq.item() / 100, rel=1e-5)
    assert got["fvu"] == pytest.approx((sq / (y - y.mean(0)).pow(2).sum()).item(), rel=1e-5)


# -- stacks ------------------------------------------------------------------------------


def _members(arch: str, skip: bool) -> list[SAE]:
    """Three float64 transcoders with different sparsity, weights and dead latents (none, a few,
    all), so that AuxK runs with different numbers of dead latents per member."""
    saes = []
    for i in range(3):
        sae = perturb(create_sae(config(arch, member=i, skip=skip, dtype="float64", k_aux=5)), seed=i)
        sae.dead_tokens = 64
        sae.tokens_since_fired[: [0, 3, 32][i]] = 100
        saes.append(sae)
    return saes


@pytest.mark.parametrize("arch,skip", CASES, ids=IDS)
def test_stack_equals_separate(arch, skip):
    """Members of a stack share x and the target; outputs, gradients and steps equal theirs alone."""
    saes = _members(arch, skip)
    stack = SAE.stack(saes)
    assert stack.cfg.is_transcoder and stack.W_dec.shape == (3, D_SAE, D_OUT)
    assert not skip or stack.W_skip.shape == (3, D_OUT, D_IN)
    opts = [torch.optim.Adam(s.parameters(), lr=1e-2, betas=s.adam_betas) for s in saes]
    stack_opt = torch.optim.Adam(stack.parameters(), lr=1e-2, betas=stack.adam_betas)
    for step in range(3):
        x, y = pair(24, seed=step, dtype=torch.float64)
        outs = [s(x, y) for s in saes]
        stack_out = stack(x, y)
        assert_same_outputs(stack_out, outs)
        if "auxk" in stack_out.aux and step == 0 and arch in K_ARCHS:
            assert stack_out.aux["auxk"][0] == 0 and (stack_out.aux["auxk"][1:] > 0).all()
        step_both(stack, saes, stack_out, outs, stack_opt, opts)
    x, y = pair(24, seed=9, dtype=torch.float64)
    for s in (*saes, stack):
        s.eval()
    assert_same_outputs(stack(x, y), [s(x, y) for s in saes])
    torch.testing.assert_close(stack.decode(stack.encode(x), x), stack(x, y).x_hat)
    for b, s in zip(stack.unstack(), saes):
        assert asdict(b.cfg) == asdict(s.cfg)
        torch.testing.assert_close(b(x, y).x_hat, s(x, y).x_hat)


# -- sparse decoding ---------------------------------------------------------------------


SPARSE = [(a, ks, s) for a in K_ARCHS for ks in (None, [2, 7, 4]) for s in (False, True)]
SPARSE += [("jumprelu", None, s) for s in (False, True)]  # AuxK alone


@pytest.mark.parametrize("arch,ks,skip", SPARSE)
def test_sparse_decoder_matches_dense(arch, ks, skip):
    torch.manual_seed(len(arch) + len(ks or []))
    extra = {"k_aux": 8, **({"matryoshka_prefixes": [6, 24, 48]} if arch == "matryoshka" else {})}
    if arch == "jumprelu":
        cfgs = [SAEConfig(arch, 24, 128, d_out=20, skip=skip, l0_coefficient=1.0,
                          extra={**extra, "auxk_coefficient": 0.1})]
    else:
        cfgs = [SAEConfig(arch, 24, 128, d_out=20, skip=skip, k=k, extra=extra) for k in ks or [5]]
    sparse = create_sae(cfgs if ks else cfgs[0])
    with torch.no_grad():
        sparse.b_enc.normal_(0, 0.2)
        if skip:
            sparse.W_skip.normal_(0, 0.3)
    sparse.dead_tokens = 1000
    sparse.tokens_since_fired[..., :40] = 5000  # dead: AuxK runs
    dense = copy.deepcopy(sparse)
    dense.sparse_decoding = False
    x, y = torch.randn(40, 24) * 2, torch.randn(40, 20)
    a, b = sparse(x, y), dense(x, y)
    a.loss.sum().backward()
    b.loss.sum().backward()
    assert float(a.aux["auxk"].detach().abs().sum()) > 0
    if arch != "jumprelu":
        assert sparse.sparse_activation(sparse.pre_acts(x)) is not None  # the sparse path was taken
    torch.testing.assert_close(a.x_hat, b.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.feature_acts, b.feature_acts)
    for name in a.aux:
        torch.testing.assert_close(a.aux[name], b.aux[name], rtol=1e-5, atol=1e-5, msg=name)
    for (name, p), (_, q) in zip(sparse.named_parameters(), dense.named_parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert not skip or sparse.W_skip.grad.abs().sum() > 0


# -- input scales ------------------------------------------------------------------------


@pytest.mark.parametrize("arch,skip", CASES, ids=IDS)
def test_fold_input_scale(arch, skip):
    """Trained on x * s against y * s_out; folded, it takes raw x and returns raw-scale x_hat."""
    s, s_out = 0.37, 2.5
    sae = perturb(create_sae(config(arch, skip=skip, dtype="float64")))
    x = pair(dtype=torch.float64)[0] / s
    for training in (True, False):
        sae.train(training)
        y = torch.randn(16, D_OUT, dtype=torch.float64)
        before = sae(x * s, y * s_out)
        folded = create_sae(sae.cfg)
        folded.load_state_dict(sae.state_dict())
        folded.fold_input_scale(s, s_out)
        folded.train(training)
        after = folded(x, y)
        assert (before.feature_acts != 0).any()
        torch.testing.assert_close(after.feature_acts, before.feature_acts)
        torch.testing.assert_close(after.x_hat, before.x_hat / s_out)
    with pytest.raises(ValueError, match="s_out=0.0"):
        sae.fold_input_scale(1.0, 0.0)


def test_an_sae_has_one_scale():
    sae = create_sae(SAEConfig("topk", D_IN, D_SAE, k=4))
    sae.fold_input_scale(2.0, 2.0)
    with pytest.raises(ValueError, match=r"s_out=3\.0 differs from s=2\.0, but an SAE's target is its own input"):
        sae.fold_input_scale(2.0, 3.0)


# -- training through train_sae ----------------------------------------------------------

TD_IN, TD_OUT, TD_SAE = 16, 24, 64
MAP = torch.randn(TD_IN, TD_OUT, generator=torch.Generator().manual_seed(7)) / TD_IN**0.5


def linear_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_in: sparse codes of 16 atoms at input scale 3; x_out = x_in @ MAP at scale 40, offset 5
    (other scales than the input's, and a mean for b_dec)."""
    x = sparse_data(n, seed, d_in=TD_IN, n_feat=16, p=0.06) * 3
    return x, x @ MAP * 40 + 5


# sparsity and the most FVU after 300 steps of 256 pairs (measured 0.005-0.024, with a margin)
TRAIN = {
    "standard": ({"l1_coefficient": 0.3}, 0.03),
    "topk": ({"k": 4}, 0.05),
    "batchtopk": ({"k": 4}, 0.03),
    "matryoshka": ({"k": 4}, 0.06),
    "jumprelu": ({"l0_coefficient": 0.02, "extra": {"bandwidth": 0.1, "threshold_init": 0.1}}, 0.03),
    "gated": ({"l1_coefficient": 0.3}, 0.03),
}


def quick(n: int, **kw) -> TrainConfig:
    return TrainConfig(batch_size=256, total_tokens=n, lr=1e-2, monitor={"enabled": False}, **kw)


@pytest.mark.parametrize("arch", ALL)
def test_trains_on_pairs_to_low_fvu(arch):
    torch.manual_seed(0)
    kw, max_fvu = TRAIN[arch]
    x, y = linear_pairs(256 * 300, 0)
    x_test, y_test = linear_pairs(2000, 1)
    sae = create_sae(SAEConfig(arch, TD_IN, TD_SAE, d_out=TD_OUT, **kw))
    assert evaluate_sae(sae, x_test, y_test)["fvu"] > 0.5
    logs = []
    state = train_sae(sae, zip(x.split(256), y.split(256)), quick(len(x), log_every=100),
                      on_log=lambda step, m: logs.append(m[0]))
    init = list(x[:2560].split(256)), list(y[:2560].split(256))  # the 10 init batches
    assert state.input_scale == pytest.approx(expected_norm_scale(init[0]))
    assert state.output_scale == pytest.approx(expected_norm_scale(init[1]))
    assert state.output_scale != pytest.approx(state.input_scale, rel=0.5)
    end = evaluate_sae(state.sae, x_test, y_test)  # raw x_in in, raw-scale x_out out
    assert end["fvu"] < max_fvu, end
    assert logs[-1]["fvu"] < 2 * max_fvu  # the loop's fvu is against the target


def test_b_dec_starts_at_the_targets_centre():
    x, y = linear_pairs(256 * 12, 0)
    sae = create_sae(SAEConfig("topk", TD_IN, TD_SAE, d_out=TD_OUT, k=4))
    seen = []
    pre_step = sae.pre_step
    sae.pre_step = lambda: (seen.append(sae.b_dec.detach().clone()), pre_step())  # before any update
    state = train_sae(sae, zip(x.split(256), y.split(256)), quick(len(x), b_dec_init="mean"))
    torch.testing.assert_close(seen[0], y[:2560].mean(0) * state.output_scale, rtol=1e-4, atol=1e-5)


def test_skip_transcoder_learns_the_linear_part():
    """x_out = x_in @ A exactly: the skip connection takes all of it (the L1 penalty leaves the
    latents nothing to do); without one a sparse dictionary cannot."""
    A = torch.randn(TD_IN, TD_OUT, generator=torch.Generator().manual_seed(7)) * 3

    def data(n, seed):
        x = torch.randn(n, TD_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 1
        return x, x @ A

    x, y = data(256 * 300, 0)
    x_test, y_test = data(2000, 1)
    fvu = {}
    for skip in (True, False):
        torch.manual_seed(0)
        sae = create_sae(SAEConfig("standard", TD_IN, TD_SAE, d_out=TD_OUT, skip=skip, l1_coefficient=1.0))
        state = train_sae(sae, zip(x.split(256), y.split(256)), quick(len(x)))
        fvu[skip] = evaluate_sae(state.sae, x_test, y_test)["fvu"]
        if skip:  # raw scales: the folded W_skip^T is A itself
            assert ((state.sae.W_skip.T - A).norm() / A.norm()).item() < 1e-2
    assert fvu[True] < 1e-3 and fvu[False] > 0.05, fvu


@pytest.mark.parametrize("batch, match", [
    ("tensor", r"a transcoder \(SAEConfig\.d_out=24\) trains on pairs \(x_in \[B, d_in\], x_out \[B, d_out\]\); "
               r"`batches` yielded a Tensor of shape \[256, 16\]"),
    ("narrow", r"a batch's x_out has shape \[256, 23\]; expected \[B=256, d_out=24\]"),
    ("short", r"a batch's x_out has shape \[255, 24\]; expected \[B=256, d_out=24\]"),
    ("triple", r"a transcoder's batch is a pair of tensors \(x_in, x_out\); got a tuple of 3"),
    ("sae", r"this SAE \(SAEConfig\.d_out None\) reconstructs its input"),
])
def test_bad_batches_are_named(batch, match):
    x, y = linear_pairs(256 * 2, 0)
    d_out = None if batch == "sae" else TD_OUT
    sae = create_sae(SAEConfig("topk", TD_IN, TD_SAE, d_out=d_out, k=4))
    batches = {"tensor": x.split(256), "narrow": [(x[:256], y[:256, :23])], "short": [(x[:256], y[:255])],
               "triple": [(x[:256], y[:256], y[:256])], "sae": zip(x.split(256), y.split(256))}[batch]
    with pytest.raises(ValueError, match=match):
        train_sae(sae, iter(batches), quick(len(x)))


def test_a_resumed_transcoder_run_ends_where_the_uninterrupted_one_ends(tmp_path):
    x, y = linear_pairs(128 * 40, 3)

    def run(resume=None, start=0):
        torch.manual_seed(0)
        sae = create_sae([SAEConfig("jumprelu", TD_IN, TD_SAE, d_out=TD_OUT, skip=True, l0_coefficient=c)
                          for c in (0.02, 0.1)])
        saved = []

        def on_checkpoint(meta, tensors):
            if not saved:
                save_checkpoint(tmp_path / "ckpt", meta, tensors)
            saved.append(meta)

        batches = zip(x[start * 128:].split(128), y[start * 128:].split(128))
        train = TrainConfig(batch_size=128, total_tokens=len(x), lr=3e-3, checkpoint_every=128 * 16,
                            monitor={"enabled": False})
        return train_sae(sae, batches, train, on_checkpoint=on_checkpoint, resume=resume), saved

    whole, saved = run()
    assert saved[0]["output_scale"] == whole.output_scale != whole.input_scale
    meta, tensors = load_checkpoint(tmp_path / "ckpt")
    resumed, _ = run(resume=(meta, tensors), start=meta["step"])
    assert resumed.output_scale == whole.output_scale
    for name, value in whole.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], value, msg=name)


# -- SAELens files -----------------------------------------------------------------------

META = dict(model_name="gemma-2-2b", hook_name="blocks.3.ln2.hook_normalized", hook_layer=3, context_size=128,
            hook_name_out="blocks.3.hook_mlp_out", hook_layer_out=3)
SAELENS_NAME = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder", "batchtopk": "jumprelu_transcoder",
                "matryoshka": "jumprelu_transcoder", "topk": "topk_transcoder", "gated": "gated_transcoder"}


def saved_name(arch: str, skip: bool) -> str:
    name = SAELENS_NAME[arch]
    return name.replace("transcoder", "skip_transcoder") if skip else name


def trained_like(cfg: SAEConfig, seed: int = 0) -> SAE:
    sae = perturb(create_sae(cfg), seed)
    if cfg.architecture in ("batchtopk", "matryoshka"):
        sae(*pair(32, d_out=cfg.d_target))  # a real θ from a training batch
    return sae.eval()


@pytest.mark.parametrize("d_out", [D_OUT, D_IN], ids=["d_out=12", "d_out=d_in"])
@pytest.mark.parametrize("arch,skip", CASES, ids=IDS)
def test_save_load_round_trip(tmp_path, arch, skip, d_out):
    sae = trained_like(SAEConfig(**{**asdict(config(arch, member=2, skip=skip, d_out=d_out)), **META}))
    save_saelens(sae, tmp_path)
    loaded = load_sae_path(tmp_path).eval()
    assert type(loaded) is type(sae) and asdict(loaded.cfg) == asdict(sae.cfg)
    x, y = pair(40, seed=5, d_out=d_out)
    a, b = sae(x, y), loaded(x, y)
    assert (a.feature_acts != 0).any()
    torch.testing.assert_close(b.feature_acts, a.feature_acts, rtol=0, atol=0)
    torch.testing.assert_close(b.x_hat, a.x_hat, rtol=0, atol=0)

    cfg = json.loads((tmp_path / CFG_FILENAME).read_text())
    assert cfg["architecture"] == saved_name(arch, skip) and cfg["sae_ray"]["architecture"] == arch
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (D_IN, D_SAE, d_out)
    assert cfg["apply_b_dec_to_input"] is False  # SAELens refuses true for a transcoder
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.3.ln2.hook_normalized"
    assert cfg["hook_name_out"] == cfg["metadata"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    assert cfg["hook_head_index_out"] is None and cfg["hook_layer_out"] == 3
    shapes = {n: tuple(t.shape) for n, t in load_file(tmp_path / WEIGHTS_FILENAME).items()}
    assert shapes["W_enc"] == (D_IN, D_SAE) and shapes["W_dec"] == (D_SAE, d_out) and shapes["b_dec"] == (d_out,)
    assert shapes.get("W_skip") == ((d_out, D_IN) if skip else None)


@pytest.mark.parametrize("arch", ALL)
def test_a_stack_saves_and_loads_member_by_member(tmp_path, arch):
    stack = SAE.stack([trained_like(config(arch, member=i, skip=True), seed=i) for i in range(3)])
    loaded = [load_sae_dir(save_saelens(s, tmp_path / str(i))).eval() for i, s in enumerate(stack.unstack())]
    again = SAE.stack(loaded).eval()
    x, y = pair(20)
    torch.testing.assert_close(again(x, y).x_hat, stack.eval()(x, y).x_hat, rtol=0, atol=0)


def test_foreign_transcoder_files(tmp_path):
    """A SAELens 6.x transcoder written by SAELens (no "sae_ray" section), and what is refused."""
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g),
         "W_dec": torch.randn(D_SAE, D_OUT, generator=g), "b_dec": torch.randn(D_OUT, generator=g),
         "threshold": torch.rand(D_SAE, generator=g) + 0.5, "W_skip": torch.randn(D_OUT, D_IN, generator=g)}
    cfg = {"architecture": "jumprelu_skip_transcoder", "d_in": D_IN, "d_sae": D_SAE, "d_out": D_OUT,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"model_name": "gemma-2-2b", "hook_name": "blocks.3.ln2.hook_normalized",
                        "hook_name_out": "blocks.3.hook_mlp_out", "sae_lens_version": "6.54.12"}}

    def write(path, cfg, tensors):
        path.mkdir()
        save_file(tensors, path / WEIGHTS_FILENAME)
        (path / CFG_FILENAME).write_text(json.dumps(cfg))
        return path

    sae = load_sae_dir(write(tmp_path / "ok", cfg, t))
    assert sae.cfg.is_transcoder and sae.cfg.skip and sae.cfg.architecture == "jumprelu"
    assert sae.cfg.hook_name_out == "blocks.3.hook_mlp_out" and sae.cfg.d_out == D_OUT
    x = pair()[0]
    pre = x @ t["W_enc"] + t["b_enc"]
    f = pre.relu() * (pre > t["threshold"])  # SAELens's JumpReLUTranscoder.encode
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae.decode(sae.encode(x), x), f @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T)
    bad = [({**cfg, "apply_b_dec_to_input": True}, t, r"apply_b_dec_to_input=true on a transcoder.*accepted: false"),
           ({**cfg, "normalize_activations": "expected_average_only_in"}, t, r"normalize_activations=.*transcoder.*'none'"),
           ({k: v for k, v in cfg.items() if k != "d_out"}, t, r"missing required key 'd_out'"),
           ({**cfg, "architecture": "gated_transcoder"}, t, r"architecture='gated_transcoder' is not supported"),
           ({**cfg, "architecture": "jumprelu_transcoder"}, t, r"unexpected tensor\(s\) \['W_skip'\]"),
           (cfg, {**t, "W_skip": t["W_skip"].T.contiguous()}, r"size mismatch for W_skip.*\[8, 12\], expected \[12, 8\]")]
    for i, (c, tensors, match) in enumerate(bad):
        with pytest.raises(SAEFileError, match=match):
            load_sae_dir(write(tmp_path / str(i), c, tensors))


@pytest.mark.parametrize("arch,skip", CASES, ids=IDS)
def test_sae_lens_package_reads_our_transcoders(tmp_path, arch, skip):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_like(config(arch, skip=skip))
    save_saelens(sae, tmp_path)
    if arch in ("topk", "gated"):  # SAELens has no TopK or Gated transcoder: refused, not loaded wrong
        with pytest.raises(Exception, match=saved_name(arch, skip)):
            sae_lens.SAE.load_from_disk(str(tmp_path))
        return
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert type(theirs).__name__ == {("standard", False): "Transcoder", ("standard", True): "SkipTranscoder"}.get(
        (arch, skip), "JumpReLUSkipTranscoder" if skip else "JumpReLUTranscoder")
    x, y = pair(64)
    with torch.no_grad():
        out = sae(x, y)
        torch.testing.assert_close(theirs.encode(x), out.feature_acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), out.x_hat, rtol=1e-5, atol=1e-5)


# -- Gemma Scope params.npz --------------------------------------------------------------


def gemmascope_arrays(d_in: int, d_out: int, d_sae: int, affine: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    a = {"W_enc": rng.normal(0, 0.5, (d_in, d_sae)), "W_dec": rng.normal(0, 0.5, (d_sae, d_out)),
         "b_enc": rng.normal(0, 0.3, d_sae), "b_dec": rng.normal(0, 0.3, d_out),
         "threshold": rng.uniform(0.1, 0.6, d_sae)}
    if affine:
        a["affine_skip_connection"] = rng.normal(0, 0.3, (d_in, d_out))
    return {n: v.astype(np.float32) for n, v in a.items()}


@pytest.mark.parametrize("affine", [False, True])
def test_gemmascope_transcoder_npz_matches_its_math(tmp_path, affine):
    folder = tmp_path / "models--google--gemma-scope-2b-pt-transcoders" / "snapshots" / "abc" / "layer_3"
    folder = folder / "average_l0_12"
    folder.mkdir(parents=True)  # as the release's tree, less its width_16k folder (a small d_sae)
    a = gemmascope_arrays(16, 16, 256, affine)
    np.savez(folder / "params.npz", **a)
    sae = load_sae_path(folder)
    cfg = sae.cfg
    assert cfg.architecture == "jumprelu" and cfg.is_transcoder and cfg.d_out == 16 and cfg.skip == affine
    assert (cfg.hook_name, cfg.hook_name_out, cfg.hook_layer, cfg.hook_layer_out) == \
        ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out", 3, 3)
    assert cfg.model_name == "google/gemma-2-2b" and cfg.extra["average_l0"] == 12
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)) * 2
    t = {n: torch.from_numpy(v).double() for n, v in a.items()}
    pre = x.double() @ t["W_enc"] + t["b_enc"]  # no b_dec subtracted, nothing folded
    f = pre * (pre > t["threshold"])
    out = f @ t["W_dec"] + t["b_dec"] + (x.double() @ t["affine_skip_connection"] if affine else 0)
    with torch.no_grad():
        f_ours = sae.encode(x)
        assert (f_ours != 0).any()
        torch.testing.assert_close(f_ours.double(), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(f_ours, x).double(), out, rtol=1e-5, atol=1e-5)
    save_saelens(sae, tmp_path / "saved")  # and on into SAELens's layout
    again = load_sae_dir(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(again.decode(again.encode(x), x), sae.decode(sae.encode(x), x), rtol=0, atol=0)


def test_gemmascope_transcoder_outside_a_release_path(tmp_path):
    """No release in the path: a transcoder by W_dec's width, or by hook_name_out; else an SAE
    that computes the same function (only what it is compared with differs)."""
    np.savez(tmp_path / "wide.npz", **gemmascope_arrays(8, 12, 32))
    tc = load_gemmascope(tmp_path / "wide.npz", layer=5)
    assert tc.cfg.d_out == 12 and tc.cfg.hook_name == "blocks.5.ln2.hook_normalized"
    assert tc.cfg.hook_name_out == "blocks.5.hook_mlp_out"
    np.savez(tmp_path / "square.npz", **gemmascope_arrays(8, 8, 32))
    as_sae = load_gemmascope(tmp_path / "square.npz")
    named = load_sae_path(tmp_path / "square.npz", hook_name="blocks.1.mlp.hook_in",
                          hook_name_out="blocks.1.hook_mlp_out")
    assert not as_sae.cfg.is_transcoder and named.cfg.is_transcoder and named.cfg.d_out == 8
    assert (named.cfg.hook_name, named.cfg.hook_name_out) == ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")
    x = torch.randn(32, 8)
    with torch.no_grad():
        torch.testing.assert_close(as_sae.decode(as_sae.encode(x)), named.decode(named.encode(x), x),
                                   rtol=1e-5, atol=1e-5)
    a = gemmascope_arrays(8, 12, 32, affine=True)
    a["affine_skip_connection"] = a["affine_skip_connection"].T.copy()
    np.savez(tmp_path / "bad.npz", **a)
    with pytest.raises(SAEFileError, match=r"size mismatch for affine_skip_connection.*\[12, 8\], expected \[8, 12\]"):
        load_gemmascope(tmp_path / "bad.npz")
