"""SAE architectures, registry and SAELens format."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from sae_ray.eval import evaluate_sae
from sae_ray.formats import load_sae_dir, load_saelens, save_saelens
from sae_ray.formats.saelens import CFG_FILENAME, WEIGHTS_FILENAME
from sae_ray.sae import (
    ARCHITECTURES,
    SAE,
    SAEConfig,
    SAEOutput,
    create_sae,
    register,
)
from sae_ray.sae.standard import StandardSAE
from sae_ray.sae.topk import TopKSAE
from sparse_rows import sparse_data



def make(architecture: str, d_in: int = 8, d_sae: int = 32, **kw) -> SAE:
    if architecture == "topk":
        kw.setdefault("k", 4)
    else:
        kw.setdefault("l1_coefficient", 0.1)
    return create_sae(SAEConfig(architecture, d_in, d_sae, **kw))


def perturb(sae: SAE, seed: int = 0) -> SAE:
    """Random values everywhere, so tests do not lean on the init (zero biases, tied weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


# -- shapes and signs ------------------------------------------------------

shapes = st.tuples(
    st.sampled_from(["standard", "topk"]),
    st.integers(1, 6),  # batch
    st.integers(1, 8),  # d_in
    st.integers(1, 16),  # d_sae
    st.integers(0, 2**16),  # seed
)


@settings(max_examples=40, deadline=None)
@given(shapes, st.data())
def test_shapes_and_nonnegative_latents(shape, data):
    arch, b, d_in, d_sae, seed = shape
    k = data.draw(st.integers(1, d_sae)) if arch == "topk" else None
    torch.manual_seed(seed)
    sae = perturb(make(arch, d_in, d_sae, k=k), seed)
    x = torch.randn(b, d_in) * 3
    f = sae.encode(x)
    assert f.shape == (b, d_sae)
    assert (f >= 0).all()
    assert sae.decode(f).shape == (b, d_in)
    out = sae(x)
    assert isinstance(out, SAEOutput)
    assert out.x_hat.shape == (b, d_in) and out.feature_acts.shape == (b, d_sae)
    assert out.loss.shape == () and out.mse.shape == ()
    assert all(v.shape == () for v in out.aux.values())
    torch.testing.assert_close(out.feature_acts, f)
    if arch == "topk":
        assert ((f != 0).sum(-1) <= k).all()


def test_param_names_and_shapes():
    for arch in ("standard", "topk"):
        sae = make(arch, d_in=8, d_sae=32)
        shapes = {n: tuple(p.shape) for n, p in sae.named_parameters()}
        assert shapes == {"W_enc": (8, 32), "b_enc": (32,), "W_dec": (32, 8), "b_dec": (8,)}


def test_init_tied_weights_and_decoder_norms():
    topk, std = make("topk"), make("standard")
    for sae in (topk, std):
        torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
        assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()
    torch.testing.assert_close(topk.W_dec.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(std.W_dec.norm(dim=1), torch.full((32,), 0.1))


def test_dtype_from_config():
    sae = make("topk", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in sae.parameters())
    out = sae(torch.randn(3, 8))
    assert out.x_hat.dtype == torch.bfloat16


# -- TopK ------------------------------------------------------------------


def test_topk_exactly_k_active():
    torch.manual_seed(0)
    sae = make("topk", d_in=16, d_sae=64, k=8)
    f = sae.encode(torch.randn(100, 16))
    assert ((f != 0).sum(-1) == 8).all()
    # the kept ones are the k largest pre-activations
    pre = sae.pre_acts(torch.randn(5, 16))
    f = sae.activation(pre)
    kth = pre.topk(8, dim=-1).values[:, -1:]
    assert ((f != 0) == (pre >= kth)).all()


def test_topk_rejects_bad_k():
    for k in (None, 0, 33):
        with pytest.raises(ValueError, match="SAEConfig.k"):
            make("topk", d_sae=32, k=k)


def test_topk_unit_norm_after_post_step():
    sae = perturb(make("topk"))
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32))
    sae.post_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_topk_pre_step_removes_parallel_gradient():
    torch.manual_seed(0)
    sae = perturb(make("topk"))
    sae(torch.randn(64, 8) * 3).loss.backward()
    before = sae.W_dec.grad.clone()
    assert (before * sae.W_dec).sum(-1).abs().max() > 1e-3
    sae.pre_step()
    rows = before.norm(dim=-1) > 0  # latents that fired on this batch
    assert rows.sum() > 16
    g, W = sae.W_dec.grad[rows], sae.W_dec[rows]
    cosine = (g * W).sum(-1) / (g.norm(dim=-1) * W.norm(dim=-1))
    assert cosine.abs().max() < 1e-5
    # only the parallel part went: the removed part is parallel to the rows
    removed = before[rows] - g
    cosine = (removed * W).sum(-1) / (removed.norm(dim=-1) * W.norm(dim=-1))
    torch.testing.assert_close(cosine.abs(), torch.ones(len(W)))


def test_firing_counts_only_in_training():
    sae = make("topk", d_sae=32, k=2)
    x = torch.randn(10, 8)
    sae.eval()
    sae(x)
    assert (sae.tokens_since_fired == 0).all()
    sae.train()
    f = sae(x).feature_acts
    fired = (f != 0).any(0)
    assert (sae.tokens_since_fired[fired] == 0).all()
    assert (sae.tokens_since_fired[~fired] == 10).all()
    sae(x[:3])
    assert (sae.tokens_since_fired[~fired] == 13).all()


def test_auxk_revives_dead_latents():
    torch.manual_seed(0)
    sae = make("topk", d_sae=32, k=2, extra={"k_aux": 4})
    sae.dead_tokens = 5
    x = torch.randn(16, 8)
    out = sae(x)
    assert out.aux["auxk"] == 0  # nothing dead yet
    sae.tokens_since_fired[:] = 100  # now all are dead
    sae.zero_grad()
    out = sae(x)
    assert out.aux["auxk"] > 0
    torch.testing.assert_close(out.loss, out.mse + out.aux["auxk"])
    out.aux["auxk"].backward()
    # the gradient reaches encoder columns of latents that the top-k left out
    live = (out.feature_acts != 0).any(0)
    assert (sae.W_enc.grad[:, ~live].abs().sum(0) > 0).any()


# -- standard --------------------------------------------------------------


def test_standard_loss_matches_formula():
    torch.manual_seed(0)
    sae = perturb(make("standard", l1_coefficient=0.3))
    x = torch.randn(7, 8)
    out = sae(x)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = ((x_hat - x) ** 2).sum(1).mean()
    l1 = 0.3 * (f * sae.W_dec.norm(dim=1)).sum(1).mean()
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.aux["l1"], l1)
    torch.testing.assert_close(out.loss, mse + l1)


def test_standard_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    sae = perturb(make("standard"))
    sae(torch.randn(32, 8)).loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_standard_l1_cannot_be_dodged_by_decoder_scale():
    torch.manual_seed(0)
    sae = perturb(make("standard"))
    x = torch.randn(16, 8)
    out = sae(x)
    c = 10.0
    with torch.no_grad():  # same function, latents c times smaller, decoder c times larger
        sae.W_enc /= c
        sae.b_enc /= c
        sae.W_dec *= c
    out2 = sae(x)
    torch.testing.assert_close(out2.x_hat, out.x_hat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out2.aux["l1"], out.aux["l1"], rtol=1e-4, atol=1e-6)
    # a plain L1 on f would have dropped c-fold
    assert out2.feature_acts.sum() < out.feature_acts.sum() / (c / 2)
    # and growing the decoder alone only adds to the penalty
    with torch.no_grad():
        sae.W_dec *= 2
    assert sae(x).aux["l1"] > out.aux["l1"] * 1.5


def test_standard_hooks_leave_decoder_alone():
    sae = perturb(make("standard"))
    sae(torch.randn(4, 8)).loss.backward()
    W, g = sae.W_dec.detach().clone(), sae.W_dec.grad.clone()
    sae.pre_step()
    sae.post_step()
    assert torch.equal(sae.W_dec, W) and torch.equal(sae.W_dec.grad, g)


def test_standard_needs_l1_coefficient():
    with pytest.raises(ValueError, match="l1_coefficient"):
        create_sae(SAEConfig("standard", 8, 32))


# -- training --------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,kw", [("topk", {"k": 4}), ("standard", {"l1_coefficient": 1.0})]
)
def test_training_reduces_fvu(arch, kw):
    torch.manual_seed(0)
    x, x_test = sparse_data(256 * 300, seed=0), sparse_data(2000, seed=1)
    sae = create_sae(SAEConfig(arch, 32, 64, **kw))
    with torch.no_grad():
        sae.b_dec.copy_(x[:2000].mean(0))
    start = evaluate_sae(sae, x_test)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for xb in x.split(256):
        out = sae(xb)
        opt.zero_grad()
        out.loss.backward()
        sae.pre_step()
        opt.step()
        sae.post_step()
    end = evaluate_sae(sae, x_test)
    assert start["fvu"] > 0.5
    assert end["fvu"] < 0.15
    assert end["l0"] < 10
    if arch == "topk":
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


# -- registry --------------------------------------------------------------


def test_registry_lists_architectures():
    assert ARCHITECTURES["standard"] is StandardSAE
    assert ARCHITECTURES["topk"] is TopKSAE


def test_unknown_architecture_lists_valid_ones():
    with pytest.raises(ValueError, match="nope") as e:
        create_sae(SAEConfig("nope", 8, 32))
    assert "standard" in str(e.value) and "topk" in str(e.value)


def test_register_new_architecture():
    @register
    class Dense(SAE):
        architecture = "test-dense"
        sparsity_param = "l1_coefficient"

        def activation(self, pre):
            return pre.relu()

    try:
        assert isinstance(create_sae(SAEConfig("test-dense", 4, 8)), Dense)
        with pytest.raises(ValueError, match="already registered"):

            @register
            class Other(SAE):
                architecture = "test-dense"
                sparsity_param = "k"
    finally:
        del ARCHITECTURES["test-dense"]


def test_config_validation():
    with pytest.raises(ValueError, match="d_sae"):
        SAEConfig("topk", 8, 0, k=1)
    with pytest.raises(ValueError, match="dtype"):
        SAEConfig("topk", 8, 8, k=1, dtype="int8")


# -- SAELens format --------------------------------------------------------

META = dict(
    model_name="gpt2",
    hook_name="blocks.3.hook_resid_post",
    hook_layer=3,
    context_size=128,
    dataset_path="NeelNanda/pile-10k",
    extra={"dead_tokens_threshold": 1000, "figures": {"fvu": 0.1}},  # an old knob: still loads
)


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_saelens_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    sae = perturb(make(arch, d_in=8, d_sae=32, **META))
    save_saelens(sae, tmp_path / "sae")
    loaded = load_sae_dir(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert asdict(loaded.cfg) == asdict(sae.cfg)
    assert loaded.state_dict().keys() == sae.state_dict().keys()
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    x = torch.randn(9, 8)
    a, b = sae.eval()(x), loaded.eval()(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.feature_acts, b.feature_acts)
    assert type(load_sae_dir(tmp_path / "sae", sae_cls=SAE)) is type(sae)


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_saelens_files(tmp_path, arch):
    sae = make(arch, d_in=8, d_sae=32, **META)
    save_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / CFG_FILENAME).read_text())
    saelens_keys = """architecture d_in d_sae dtype device apply_b_dec_to_input
        normalize_activations model_name hook_name hook_layer context_size dataset_path
        prepend_bos activation_fn_str activation_fn_kwargs metadata""".split()
    for key in saelens_keys:
        assert key in cfg, key
    assert cfg["architecture"] == arch
    assert (cfg["d_in"], cfg["d_sae"]) == (8, 32)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["hook_layer"] == 3
    assert "sae_lens_version" not in cfg and "sae_lens_version" not in cfg["metadata"]
    if arch == "topk":
        assert cfg["activation_fn_str"] == "topk" and cfg["activation_fn_kwargs"] == {"k": 4}
        assert cfg["k"] == 4
    else:
        assert cfg["activation_fn_str"] == "relu"
        assert cfg["sae_ray"]["l1_coefficient"] == 0.1
    weights = load_file(tmp_path / WEIGHTS_FILENAME)
    shapes = {n: tuple(t.shape) for n, t in weights.items()}
    assert shapes == {"W_enc": (8, 32), "b_enc": (32,), "W_dec": (32, 8), "b_dec": (8,)}


def test_load_old_style_saelens_topk(tmp_path):
    """SAELens < 6 wrote TopK SAEs as architecture "standard" + activation_fn_str "topk"."""
    sae = perturb(make("topk", k=3, **META))
    save_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / CFG_FILENAME).read_text())
    for key in ("sae_ray", "metadata", "k", "reshape_activations"):
        del cfg[key]
    cfg["architecture"] = "standard"
    cfg["dtype"] = "torch.float32"
    (tmp_path / CFG_FILENAME).write_text(json.dumps(cfg))
    loaded = load_sae_dir(tmp_path)
    assert isinstance(loaded, TopKSAE) and loaded.cfg.k == 3
    assert loaded.cfg.hook_name == META["hook_name"] and loaded.cfg.dtype == "float32"
    x = torch.randn(4, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_saelens(tmp_path)
    save_saelens(make("topk"), tmp_path)
    (tmp_path / WEIGHTS_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load_saelens(tmp_path)
    save_saelens(make("topk"), tmp_path)
    cfg = json.loads((tmp_path / CFG_FILENAME).read_text())
    cfg["normalize_activations"] = "layer_norm"  # per-row: cannot be folded into the weights
    (tmp_path / CFG_FILENAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cfg.json.*normalize_activations"):
        load_saelens(tmp_path)


def test_load_as_wrong_subclass(tmp_path):
    save_saelens(make("standard"), tmp_path)
    with pytest.raises(ValueError, match="cfg.json.*StandardSAE, not a TopKSAE"):
        load_sae_dir(tmp_path, sae_cls=TopKSAE)


def test_load_weights_of_wrong_shape(tmp_path):
    save_saelens(make("topk", d_sae=32), tmp_path)
    save_saelens(make("topk", d_sae=16), tmp_path / "small")
    (tmp_path / "small" / WEIGHTS_FILENAME).replace(tmp_path / WEIGHTS_FILENAME)
    with pytest.raises(ValueError, match="(?s)sae_weights.safetensors.*size mismatch for W_enc"):
        load_sae_dir(tmp_path)


def test_config_takes_numpy_numbers(tmp_path):
    import numpy as np
    cfg = SAEConfig("topk", np.int64(8), np.int64(32), k=np.int64(4))
    assert type(cfg.d_sae) is int and type(cfg.k) is int
    save_saelens(create_sae(cfg), tmp_path)  # json can write it
