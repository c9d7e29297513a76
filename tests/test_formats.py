"""SAE file formats: SAELens (ours, 6.x inference saves and training checkpoints, < 6),
Gemma Scope params.npz, EleutherAI sparsify; the one entry point; bad files.

Each foreign format is checked against a hand computation of that project's own math
from the raw tensors, in plain torch, on the same inputs as our loaded SAE."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_ray
from sae_ray.formats import (SAEFileError, detect_format, load_gemmascope, load_sae_dir, load_sae_path,
                             load_sparsify, save_saelens, save_sparsify)
from sae_ray.sae import ARCHITECTURES, SAEConfig, create_sae
from sae_ray.sae.batchtopk import BatchTopKSAE
from sae_ray.sae.jumprelu import JumpReLUSAE
from sae_ray.sae.matryoshka import MatryoshkaSAE
from sae_ray.sae.topk import TopKSAE

D_IN, D_SAE, K = 16, 64, 6
TOL = 1e-5
ALL = ["standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]
META = {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "model_name": "gpt2",
        "hook_name": "blocks.3.hook_resid_post", "context_size": 128, "prepend_bos": True}


def inputs(n: int = 512, d_in: int = D_IN, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def raw_tensors(seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE, gated: bool = False) -> dict[str, torch.Tensor]:
    """SAELens-named float32 tensors with decoder rows far from unit norm and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * 0.4,
        "W_dec": torch.randn(d_sae, d_in, generator=g) * (0.5 * torch.rand(d_sae, 1, generator=g) + 0.05),
        "b_dec": torch.randn(d_in, generator=g) * 0.5,
    }
    if gated:
        t.update(b_gate=torch.randn(d_sae, generator=g) * 0.5, b_mag=torch.randn(d_sae, generator=g) * 0.5,
                 r_mag=torch.randn(d_sae, generator=g) * 0.3)
    else:
        t["b_enc"] = torch.randn(d_sae, generator=g) * 0.5
    return t


def write_saelens(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, path / "sae_weights.safetensors")
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def saelens6_cfg(architecture: str, **fields) -> dict:
    """A cfg.json as SAELens 6.x writes it (cfg.to_dict(): the dataclass fields + metadata)."""
    return {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none", "metadata": dict(META),
            "architecture": architecture, **fields}


# -- SAELens's math, by hand ------------------------------------------------------------


def sl_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def sl_batchtopk(pre: torch.Tensor, k: int) -> torch.Tensor:
    flat = pre.relu().flatten()
    top = flat.topk(k * pre.shape[0])
    return torch.zeros_like(flat).scatter(-1, top.indices, top.values).view_as(pre)


def sl_encode(t: dict, x: torch.Tensor, arch: str, *, k: int = K, rescale: bool = False, apply_b_dec: bool = True,
              threshold=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens's encode and decode from raw tensors: (f [B, d_sae], x_hat [B, d_in])."""
    sae_in = x - t["b_dec"] if apply_b_dec else x
    if arch == "gated":
        gate = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
        f = gate * (sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]).relu()
        return f, f @ t["W_dec"] + t["b_dec"]
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    if rescale:
        pre = pre * norms
    if arch == "standard":
        f = pre.relu()
    elif arch == "topk":
        f = sl_topk(pre, k)
    elif arch == "batchtopk":
        f = sl_batchtopk(pre, k)
    else:  # jumprelu, or the inference form of a batchtopk
        f = pre.relu() * (pre > threshold)
    x_hat = (f / norms if rescale else f) @ t["W_dec"] + t["b_dec"]
    return f, x_hat


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """max |a - b| < 1e-5 for latents (values up to ~15 here); reconstructions (sums of up to
    d_sae terms, values up to ~100) within 1e-5 of their largest magnitude."""
    diff = (a - b).abs().max().item()
    tol = TOL * max(1.0, b.abs().max().item()) if what == "reconstruction" else TOL
    assert diff < tol, f"{what}: max abs diff {diff} (tolerance {tol})"


def ours(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = sae(x)
    return out.feature_acts, out.x_hat


# -- our own SAELens files ----------------------------------------------------------------


def make(arch: str, seed: int = 0, **meta) -> object:
    param = ARCHITECTURES[arch].sparsity_param
    cfg = SAEConfig(arch, D_IN, D_SAE, **{param: K if param == "k" else 0.1},
                    model_name="gpt2", hook_name="blocks.3.hook_resid_post", hook_layer=3, **meta)
    sae = create_sae(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.7)
    return sae.eval()


@pytest.mark.parametrize("arch", ALL)
def test_saelens_round_trip_through_the_entry_point(tmp_path, arch):
    sae = make(arch)
    save_saelens(sae, tmp_path / "sae")
    x = inputs()
    for where in (tmp_path / "sae", tmp_path / "sae" / "sae_weights.safetensors", tmp_path / "sae" / "cfg.json"):
        loaded = sae_ray.load_sae(str(where))
        assert type(loaded) is type(sae) and not loaded.training
        assert asdict(loaded.cfg) == asdict(sae.cfg)
        f, x_hat = ours(loaded, x)
        assert torch.equal(f, ours(sae, x)[0]) and torch.equal(x_hat, ours(sae, x)[1])
    assert detect_format(tmp_path / "sae") == ("saelens", tmp_path / "sae")


# -- SAELens 6.x files --------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_topk_rescale_acts_by_decoder_norm(tmp_path, training):
    """SAELens's TopK training default: pre-activations times ||W_dec_i||, decoded divided by it."""
    t = raw_tensors()
    cfg = saelens6_cfg("topk", k=K, rescale_acts_by_decoder_norm=True)
    if training:  # what a training checkpoint's cfg.json adds
        cfg.update(decoder_init_norm=0.1, use_sparse_activations=False, aux_loss_coefficient=0.5)
    sae = load_sae_dir(write_saelens(tmp_path, cfg, t)).eval()
    assert isinstance(sae, TopKSAE) and sae.cfg.k == K
    x = inputs()
    f_ref, x_hat_ref = sl_encode(t, x, "topk", rescale=True)
    f, x_hat = ours(sae, x)
    assert_close(f, f_ref, "latents")
    assert_close(x_hat, x_hat_ref, "reconstruction")
    assert (sl_encode(t, x, "topk")[0] != f_ref).any()  # the field does change the math
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))  # folded: unit rows
    if training:
        assert sae.cfg.extra["auxk_coefficient"] == 0.5
    assert sae.cfg.hook_name == META["hook_name"] and sae.cfg.model_name == "gpt2"


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_apply_b_dec_to_input_false(tmp_path, arch):
    t = raw_tensors(gated=arch == "gated")
    fields = {"k": K} if arch == "topk" else {}
    threshold = None
    if arch == "jumprelu":
        t["threshold"] = threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3))
    sae = load_sae_dir(write_saelens(tmp_path, saelens6_cfg(arch, apply_b_dec_to_input=False, **fields), t)).eval()
    x = inputs()
    f_ref, x_hat_ref = sl_encode(t, x, arch, apply_b_dec=False, threshold=threshold)
    f, x_hat = ours(sae, x)
    assert (f_ref > 0).any()
    assert_close(f, f_ref, "latents")
    assert_close(x_hat, x_hat_ref, "reconstruction")
    assert (sl_encode(t, x, arch, threshold=threshold)[0] != f_ref).any()


@pytest.mark.parametrize("source", ["activation_scaler.json", "argument"])
def test_expected_average_only_in_folds_the_scale(tmp_path, source):
    """A training checkpoint trained on x * s: the loaded SAE takes raw x."""
    s = 0.37
    t = raw_tensors()
    t["threshold"] = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3))
    path = write_saelens(tmp_path, saelens6_cfg("jumprelu", normalize_activations="expected_average_only_in"), t)
    if source == "activation_scaler.json":
        (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
        sae = load_sae_path(path).eval()
    else:
        sae = load_sae_path(path, scaling_factor=s).eval()
    x = inputs()
    f_ref, x_hat_scaled = sl_encode(t, x * s, "jumprelu", threshold=t["threshold"])
    f, x_hat = ours(sae, x)
    assert_close(f, f_ref, "latents")
    assert_close(x_hat, x_hat_scaled / s, "reconstruction")


def test_expected_average_only_in_without_a_factor_is_refused(tmp_path):
    path = write_saelens(tmp_path, saelens6_cfg("standard", normalize_activations="expected_average_only_in"),
                         raw_tensors())
    with pytest.raises(SAEFileError, match="cfg.json.*normalize_activations='expected_average_only_in'.*scaling_factor"):
        load_sae_dir(path)
    (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None}))
    with pytest.raises(SAEFileError, match="activation_scaler.json: scaling_factor=None"):
        load_sae_dir(path)
    none = write_saelens(tmp_path / "none", saelens6_cfg("standard"), raw_tensors())
    with pytest.raises(SAEFileError, match="scaling_factor=2.0 was given, but normalize_activations is 'none'"):
        load_sae_path(none, scaling_factor=2.0)


def test_pre6_normalize_true_is_expected_average(tmp_path):
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "architecture": "standard", "activation_fn_str": "relu",
           "normalize_activations": True, "hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2}
    path = write_saelens(tmp_path, cfg, raw_tensors())
    with pytest.raises(SAEFileError, match="expected_average_only_in"):
        load_sae_dir(path)
    sae = load_sae_dir(path, scaling_factor=2.0)
    assert sae.cfg.hook_name == "blocks.2.hook_resid_pre" and sae.cfg.hook_layer == 2


def test_covariance_whitening_with_rescaled_topk(tmp_path):
    """SAELens >= 6.5x: trained on z = (x - mean) @ M; decoded back with M^-1 and the mean."""
    g = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))
    M = (q * (0.5 + 0.5 * torch.rand(D_IN, generator=g, dtype=torch.float64))).float().contiguous()
    mean = torch.randn(D_IN, generator=g)
    t = raw_tensors()
    cfg = saelens6_cfg("topk", k=K, rescale_acts_by_decoder_norm=True, normalize_activations="covariance_whitening")
    path = write_saelens(tmp_path, cfg, t)
    with pytest.raises(SAEFileError, match="covariance_whitening.*activation_whitening.safetensors"):
        load_sae_dir(path)
    save_file({"mean": mean, "matrix": M, "inverse_matrix": torch.linalg.inv(M.double()).float().contiguous()},
              path / "activation_whitening.safetensors")
    sae = load_sae_dir(path).eval()
    x = inputs()
    z = (x - mean) @ M
    f_ref, z_hat = sl_encode(t, z, "topk", rescale=True)
    f, x_hat = ours(sae, x)
    assert_close(f, f_ref, "latents")
    assert_close(x_hat, z_hat @ torch.linalg.inv(M.double()).float() + mean, "reconstruction")


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm", "whatever"])
def test_per_row_normalisations_are_refused(tmp_path, mode):
    path = write_saelens(tmp_path, saelens6_cfg("standard", normalize_activations=mode), raw_tensors())
    with pytest.raises(SAEFileError, match=f"cfg.json: normalize_activations='{mode}' is not supported.*accepted"):
        load_sae_dir(path)


def test_batchtopk_training_checkpoint(tmp_path):
    t = raw_tensors()
    theta = 0.8
    cfg = saelens6_cfg("batchtopk", k=float(K), rescale_acts_by_decoder_norm=True, topk_threshold_lr=0.02,
                       aux_loss_coefficient=1.0, decoder_init_norm=0.1, use_sparse_activations=False)
    sae = load_sae_path(write_saelens(tmp_path, cfg, {**t, "topk_threshold": torch.tensor(theta, dtype=torch.float64)}))
    assert type(sae) is BatchTopKSAE and sae.cfg.k == K and sae.cfg.extra["topk_threshold_lr"] == 0.02
    assert sae.topk_threshold.item() == pytest.approx(theta)
    x = inputs()
    with torch.no_grad():
        f_train = sae.encode(x)  # training mode: the batch-wide top k*B, as SAELens's training SAE
    assert_close(f_train, sl_encode(t, x, "batchtopk", rescale=True)[0], "training latents")
    sae.eval()  # inference: SAELens saves it as a JumpReLU with threshold θ on the rescaled pre-activations
    f_ref, x_hat_ref = sl_encode(t, x, "jumprelu", rescale=True, threshold=torch.full((D_SAE,), theta))
    f, x_hat = ours(sae, x)
    assert (f_ref > 0).any()
    assert_close(f, f_ref, "latents")
    assert_close(x_hat, x_hat_ref, "reconstruction")
    cfg["k"] = 6.5
    write_saelens(tmp_path, cfg, {**t, "topk_threshold": torch.tensor(theta, dtype=torch.float64)})
    with pytest.raises(SAEFileError, match="cfg.json: k=6.5; accepted: a whole number"):
        load_sae_dir(tmp_path)


def test_matryoshka_training_checkpoint(tmp_path):
    t = raw_tensors()
    cfg = saelens6_cfg("matryoshka_batchtopk", k=float(K), rescale_acts_by_decoder_norm=True,
                       matryoshka_widths=[8, 32, D_SAE], use_matryoshka_aux_loss=False, topk_threshold_lr=0.01)
    sae = load_sae_path(write_saelens(tmp_path, cfg, {**t, "topk_threshold": torch.tensor(0.5, dtype=torch.float64)}))
    assert type(sae) is MatryoshkaSAE and sae.prefixes == [8, 32, D_SAE]
    x = inputs()
    with torch.no_grad():
        assert_close(sae.encode(x), sl_encode(t, x, "batchtopk", rescale=True)[0], "training latents")
    f_ref, x_hat_ref = sl_encode(t, x, "jumprelu", rescale=True, threshold=torch.full((D_SAE,), 0.5))
    f, x_hat = ours(sae.eval(), x)
    assert_close(f, f_ref, "latents")
    assert_close(x_hat, x_hat_ref, "reconstruction")


def test_pre6_finetuning_scaling_factor(tmp_path):
    """SAELens < 6 decoded (f * scaling_factor) @ W_dec + b_dec when finetuning_scaling_factor."""
    t = raw_tensors()
    s = 0.5 + torch.rand(D_SAE, generator=torch.Generator().manual_seed(4))
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "architecture": "standard", "activation_fn_str": "relu",
           "apply_b_dec_to_input": True, "finetuning_scaling_factor": True, "dtype": "torch.float32"}
    sae = load_sae_dir(write_saelens(tmp_path, cfg, {**t, "scaling_factor": s}))
    x = inputs()
    f_ref = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
    f, x_hat = ours(sae, x)
    assert_close(f, f_ref, "latents")
    assert_close(x_hat, (f_ref * s) @ t["W_dec"] + t["b_dec"], "reconstruction")
    load_sae_dir(write_saelens(tmp_path / "ones", {**cfg, "finetuning_scaling_factor": False},
                               {**t, "scaling_factor": torch.ones(D_SAE)}))  # ones: dropped
    write_saelens(tmp_path, {**cfg, "finetuning_scaling_factor": False}, {**t, "scaling_factor": s})
    with pytest.raises(SAEFileError, match="'scaling_factor' is not all ones.*finetuning_scaling_factor"):
        load_sae_dir(tmp_path)


@pytest.mark.parametrize("field, value", [("architecture", "topk_transcoder"), ("architecture", "abstopk"), ("architecture", "mystery"),
                                          ("activation_fn", "tanh-relu"), ("reshape_activations", "hook_q"),
                                          ("apply_b_dec_to_input", "yes")])
def test_unsupported_fields_are_refused_by_name(tmp_path, field, value):
    cfg = saelens6_cfg("standard")
    cfg[field] = value
    with pytest.raises(SAEFileError, match=f"cfg.json: {field}={value!r}.*accepted"):
        load_sae_dir(write_saelens(tmp_path, cfg, raw_tensors()))


def test_unknown_architecture_in_our_section(tmp_path):
    save_saelens(make("topk"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["sae_ray"]["architecture"] = "mystery"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFileError, match="cfg.json: sae_ray.architecture='mystery' is not an architecture.*accepted: 'batchtopk'"):
        load_sae_path(tmp_path)


# -- Gemma Scope --------------------------------------------------------------------------


def gemma_arrays(d_in: int = D_IN, d_sae: int = 4096, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"W_enc": (g.standard_normal((d_in, d_sae)) * 0.4).astype(np.float32),
            "W_dec": (g.standard_normal((d_sae, d_in)) * 0.3).astype(np.float32),
            "b_enc": (g.standard_normal(d_sae) * 0.3).astype(np.float32),
            "b_dec": (g.standard_normal(d_in) * 0.5).astype(np.float32),
            "threshold": (g.random(d_sae) * 1.5).astype(np.float32)}


def gemma_path(root: Path, release: str = "", layer: int = 12, width: str = "4k") -> Path:
    path = root / release / f"layer_{layer}" / f"width_{width}" / "average_l0_82" / "params.npz"
    path.parent.mkdir(parents=True)
    return path


def test_gemmascope_matches_its_math(tmp_path):
    a = gemma_arrays()
    path = gemma_path(tmp_path, "models--google--gemma-scope-2b-pt-res/snapshots/abc")
    np.savez(path, **a)
    sae = load_sae_path(path.parent).eval()
    assert type(sae) is JumpReLUSAE and (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, 4096)
    assert sae.cfg.hook_name == "blocks.12.hook_resid_post" and sae.cfg.hook_layer == 12
    assert sae.cfg.model_name == "google/gemma-2-2b" and sae.cfg.extra["average_l0"] == 82
    t = {n: torch.from_numpy(v) for n, v in a.items()}
    x = inputs()
    pre = x @ t["W_enc"] + t["b_enc"]  # Gemma Scope: no b_dec subtracted
    f_ref = (pre > t["threshold"]) * pre.relu()
    f, x_hat = ours(sae, x)
    assert (f_ref > 0).any()
    assert_close(f, f_ref, "latents")
    assert_close(x_hat, f_ref @ t["W_dec"] + t["b_dec"], "reconstruction")

    save_saelens(sae, tmp_path / "as_saelens")  # round trip through our files
    again = sae_ray.load_sae(str(tmp_path / "as_saelens"))
    assert asdict(again.cfg) == asdict(sae.cfg) and torch.equal(ours(again, x)[0], f)


def test_gemmascope_hook_from_arguments(tmp_path):
    path = gemma_path(tmp_path, layer=5)
    np.savez(path, **gemma_arrays())
    assert load_gemmascope(path).cfg.hook_name == ""  # nothing says which hook
    assert load_gemmascope(path, site="mlp_out").cfg.hook_name == "blocks.5.hook_mlp_out"
    sae = load_sae_path(path, hook_name="blocks.5.hook_resid_post", model_name="google/gemma-2-9b")
    assert (sae.cfg.hook_name, sae.cfg.model_name, sae.cfg.hook_layer) == ("blocks.5.hook_resid_post", "google/gemma-2-9b", 5)
    att = gemma_path(tmp_path, "gemma-scope-9b-it-att", layer=7)
    np.savez(att, **gemma_arrays())
    sae = load_sae_path(att)
    assert (sae.cfg.hook_name, sae.cfg.model_name) == ("blocks.7.attn.hook_z", "google/gemma-2-9b-it")
    with pytest.raises(ValueError, match="gemmascope SAE, which takes no scaling_factor"):
        load_sae_path(att, scaling_factor=2.0)
    with pytest.raises(ValueError, match="site='resid'; accepted: resid_pre, resid_post, mlp_out, attn_out"):
        load_sae_path(att, site="resid")


def test_gemmascope_width_must_name_d_sae(tmp_path):
    path = gemma_path(tmp_path, width="16k")
    np.savez(path, **gemma_arrays())
    with pytest.raises(SAEFileError, match="params.npz: the path says width_16k, but W_enc has d_sae=4096"):
        load_gemmascope(path)


def test_gemmascope_bad_arrays(tmp_path):
    a = gemma_arrays(d_sae=64)
    np.savez(tmp_path / "missing.npz", **{n: v for n, v in a.items() if n != "threshold"})
    with pytest.raises(SAEFileError, match="missing.npz: missing tensor 'threshold'"):
        load_sae_path(tmp_path / "missing.npz")
    np.savez(tmp_path / "shape.npz", **{**a, "b_dec": a["b_dec"][:-1]})
    with pytest.raises(SAEFileError, match=r"shape.npz: size mismatch for b_dec: the file has shape \[15\], expected \[16\]"):
        load_sae_path(tmp_path / "shape.npz")
    np.savez(tmp_path / "ints.npz", **{**a, "threshold": np.arange(64)})
    with pytest.raises(SAEFileError, match="ints.npz: array 'threshold' has dtype int64"):
        load_sae_path(tmp_path / "ints.npz")
    np.savez(tmp_path / "extra.npz", **a, scaling=np.ones(3, dtype=np.float32))
    with pytest.raises(SAEFileError, match=r"extra.npz: unexpected tensor\(s\) \['scaling'\]"):
        load_sae_path(tmp_path / "extra.npz")


# -- sparsify -----------------------------------------------------------------------------


def test_sparsify_round_trip_and_layout(tmp_path):
    sae = make("topk", context_size=256)
    save_sparsify(sae, tmp_path / "layers.3")
    raw = json.loads((tmp_path / "layers.3" / "cfg.json").read_text())
    for key, value in {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": D_SAE,
                       "k": K, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}.items():
        assert raw[key] == value, key
    weights = load_file(tmp_path / "layers.3" / "sae.safetensors")
    assert {n: tuple(t.shape) for n, t in weights.items()} == {
        "encoder.weight": (D_SAE, D_IN), "encoder.bias": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    assert torch.equal(weights["encoder.weight"], sae.W_enc.detach().T)
    loaded = sae_ray.load_sae(str(tmp_path / "layers.3"))
    assert type(loaded) is TopKSAE and asdict(loaded.cfg) == asdict(sae.cfg)
    x = inputs()
    assert torch.equal(ours(loaded, x)[0], ours(sae, x)[0]) and torch.equal(ours(loaded, x)[1], ours(sae, x)[1])
    assert detect_format(tmp_path / "layers.3" / "sae.safetensors") == ("sparsify", tmp_path / "layers.3")
    for other in ("batchtopk", "standard"):
        with pytest.raises(ValueError, match=f"save_sparsify: a {other} SAE has no sparsify form"):
            save_sparsify(make(other), tmp_path / other)


def write_sparsify(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "sae.safetensors")
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def sparsify_files(d_in: int = D_IN, expansion: int = 4, k: int = K, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d_sae = d_in * expansion
    W_dec = torch.randn(d_sae, d_in, generator=g)
    cfg = {"activation": "topk", "expansion_factor": expansion, "normalize_decoder": True, "num_latents": 0,
           "k": k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in}
    tensors = {"encoder.weight": torch.randn(d_sae, d_in, generator=g) * 0.4,
               "encoder.bias": torch.randn(d_sae, generator=g) * 0.3,
               "W_dec": W_dec / W_dec.norm(dim=-1, keepdim=True), "b_dec": torch.randn(d_in, generator=g) * 0.5}
    return cfg, tensors


def test_sparsify_import_matches_its_math(tmp_path):
    cfg, t = sparsify_files()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "dataset": "pile",
                                                              "ctx_len": 2048, "sae": cfg}))
    path = write_sparsify(tmp_path / "run" / "layers.4.mlp", cfg, t)
    sae = load_sparsify(path)
    assert (sae.cfg.hook_name, sae.cfg.hook_layer, sae.cfg.model_name, sae.cfg.context_size) == (
        "blocks.4.hook_mlp_out", 4, "EleutherAI/pythia-70m", 2048)
    x = inputs()
    pre = ((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]).relu()  # sparsify: ReLU, then top k
    top = pre.topk(K, dim=-1)
    f_ref = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    f, x_hat = ours(sae.eval(), x)
    assert_close(f, f_ref, "latents")
    assert_close(x_hat, f_ref @ t["W_dec"] + t["b_dec"], "reconstruction")
    with pytest.raises(SAEFileError, match=r"run: no SAE found.*subdirectories.*\['layers.4.mlp'\]"):
        load_sae_path(tmp_path / "run")
    assert load_sae_path(path, hook_name="blocks.4.hook_resid_post").cfg.hook_name == "blocks.4.hook_resid_post"


@pytest.mark.parametrize("key, value", [("activation", "groupmax"), ("skip_connection", True), ("transcode", True),
                                        ("k", 0), ("d_in", "16")])
def test_sparsify_other_computations_are_refused(tmp_path, key, value):
    cfg, t = sparsify_files()
    cfg[key] = value
    with pytest.raises(SAEFileError, match=f"cfg.json: {key}={value!r} is not supported; accepted"):
        load_sparsify(write_sparsify(tmp_path, cfg, t))


def test_sparsify_bad_tensors(tmp_path):
    cfg, t = sparsify_files()
    write_sparsify(tmp_path, cfg, {n: v for n, v in t.items() if n != "encoder.bias"})
    with pytest.raises(SAEFileError, match="sae.safetensors: missing tensor 'encoder.bias'"):
        load_sae_path(tmp_path)
    write_sparsify(tmp_path, cfg, {**t, "W_dec": t["W_dec"].T.contiguous()})
    with pytest.raises(SAEFileError, match="sae.safetensors: size mismatch for W_dec"):
        load_sae_path(tmp_path)
    write_sparsify(tmp_path, cfg, {**t, "W_skip": torch.zeros(D_IN, D_IN)})
    with pytest.raises(SAEFileError, match=r"unexpected tensor\(s\) \['W_skip'\]"):
        load_sae_path(tmp_path)


# -- bad files ----------------------------------------------------------------------------


class Trap:
    """Unpickling this creates a file: the tests check that it never appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_never_loaded_whatever_their_name(tmp_path):
    marker = tmp_path / "UNPICKLED"
    payload = {"W_enc": Trap(marker)}
    good = write_saelens(tmp_path / "sl", saelens6_cfg("standard"), raw_tensors())
    torch.save(payload, good / "trainer_state.pt")  # SAELens checkpoints hold this pickle: left alone
    assert type(load_sae_path(good)).__name__ == "StandardSAE"

    (good / "sae_weights.safetensors").write_bytes(pickle.dumps(payload))  # a pickle named .safetensors
    with pytest.raises(SAEFileError, match="sae_weights.safetensors: a pickle, not safetensors"):
        load_sae_path(good)
    torch.save(payload, good / "sae_weights.safetensors")  # torch.save's zip named .safetensors
    with pytest.raises(SAEFileError, match="sae_weights.safetensors: a zip archive.*not safetensors"):
        sae_ray.load_sae(str(good))

    for name in ("sae.pt", "weights.bin", "sae.pkl", "model.pth"):
        torch.save(payload, tmp_path / name)
        with pytest.raises(SAEFileError, match=f"{name}: a .* file is a pickle.*never unpickles"):
            load_sae_path(tmp_path / name)
    only = tmp_path / "only_pickles"
    only.mkdir()
    torch.save(payload, only / "sae.pt")
    with pytest.raises(SAEFileError, match=r"only_pickles: no SAE found.*\['sae.pt'\]: pickles"):
        load_sae_path(only)

    np.savez(tmp_path / "params.npz", W_enc=np.array([Trap(marker)], dtype=object))  # an object array
    with pytest.raises(SAEFileError, match="params.npz: array 'W_enc' cannot be read without unpickling"):
        load_sae_path(tmp_path / "params.npz")
    (tmp_path / "pickled.npz").write_bytes(pickle.dumps(payload))
    with pytest.raises(SAEFileError, match="pickled.npz: a pickle, not an .npz"):
        load_gemmascope(tmp_path / "pickled.npz")
    torch.save(payload, tmp_path / "torch.npz")  # a zip, but of a pickle
    with pytest.raises(SAEFileError, match="torch.npz: member .*data.pkl.* is not a .npy array"):
        load_gemmascope(tmp_path / "torch.npz")

    cfg, t = sparsify_files()
    sp = write_sparsify(tmp_path / "sp", cfg, t)
    (sp / "sae.safetensors").write_bytes(pickle.dumps(payload))
    with pytest.raises(SAEFileError, match="sae.safetensors: a pickle"):
        load_sae_path(sp)
    assert not marker.exists()


def test_saelens_bad_tensors(tmp_path):
    t = raw_tensors()
    cases = {
        "missing": ({n: v for n, v in t.items() if n != "b_dec"}, "missing tensor 'b_dec'"),
        "shape": ({**t, "W_enc": t["W_enc"][:, :-1].contiguous()}, r"size mismatch for W_enc: the file has shape \[16, 63\], expected \[16, 64\]"),
        "extra": ({**t, "W_skip": torch.zeros(3)}, r"unexpected tensor\(s\) \['W_skip'\]"),
        "ints": ({**t, "b_enc": torch.zeros(D_SAE, dtype=torch.int32)}, "tensor 'b_enc' has dtype torch.int32"),
    }
    for name, (tensors, message) in cases.items():
        path = write_saelens(tmp_path / name, saelens6_cfg("standard"), tensors)
        with pytest.raises(SAEFileError, match=f"{name}/sae_weights.safetensors: {message}"):
            load_sae_path(path)
    jump = write_saelens(tmp_path / "jump", saelens6_cfg("jumprelu"), t)
    with pytest.raises(SAEFileError, match="missing tensor 'threshold'"):
        load_sae_path(jump)
    damaged = write_saelens(tmp_path / "damaged", saelens6_cfg("standard"), t)
    data = (damaged / "sae_weights.safetensors").read_bytes()
    (damaged / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFileError, match="sae_weights.safetensors: not a valid safetensors file"):
        load_sae_path(damaged)
    (damaged / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFileError, match="cfg.json: not valid JSON"):
        load_sae_path(damaged)


def test_entry_point_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a models:/ URI nor an existing path"):
        sae_ray.load_sae(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SAEFileError, match="notes.txt: not a file of a format sae-ray reads; accepted"):
        load_sae_path(tmp_path / "notes.txt")
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(SAEFileError, match="no SAE found.*has a cfg.json but neither"):
        load_sae_path(tmp_path)
    path = write_saelens(tmp_path / "sl", saelens6_cfg("standard"), raw_tensors())
    with pytest.raises(ValueError, match="saelens SAE, which takes no site; accepted hints: scaling_factor"):
        load_sae_path(path, site="resid_post")


# -- the real sae-lens package (skipped unless it is installed: pip install "sae-lens==6.54.12") --


@pytest.mark.parametrize("arch", ALL)
def test_sae_lens_package_reads_our_files(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    sae = make(arch)
    save_saelens(sae, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = inputs()
    f, x_hat = ours(sae, x)
    with torch.no_grad():
        f_theirs = theirs.encode(x)
        assert_close(f_theirs, f, "latents")
        assert_close(theirs.decode(f_theirs), x_hat, "reconstruction")


@pytest.mark.parametrize("arch, fields", [
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("batchtopk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("matryoshka_batchtopk", {"k": K, "rescale_acts_by_decoder_norm": True, "matryoshka_widths": [16, D_SAE]}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
    ("gated", {"apply_b_dec_to_input": False}),
    ("standard", {"apply_b_dec_to_input": False}),
])
def test_we_read_sae_lens_training_checkpoints(tmp_path, arch, fields):
    pytest.importorskip("sae_lens")
    from sae_lens.registry import get_sae_training_class

    sae_cls, cfg_cls = get_sae_training_class(arch)
    theirs = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **fields))
    t = raw_tensors(gated=arch == "gated")
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(t[name] if name in t else torch.rand(p.shape) + 0.5)  # threshold: positive
        if hasattr(theirs, "topk_threshold"):
            theirs.topk_threshold = torch.tensor(0.8, dtype=torch.float64)
    theirs.save_model(str(tmp_path))
    sae = load_sae_path(tmp_path)
    x = inputs()
    with torch.no_grad():  # a training SAE encodes as in training: BatchTopK over the whole batch
        f_theirs = theirs.encode(x)
        f, x_hat = ours(sae.train(arch in ("batchtopk", "matryoshka_batchtopk")), x)
        assert_close(f, f_theirs, "latents")
        assert_close(x_hat, theirs.decode(f_theirs), "reconstruction")
