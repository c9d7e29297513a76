"""The sparse decoder (sae_ray.sae.sparse) against the dense reference: the same outputs and the
same gradients, for every k-sparse architecture, single and stacked, with AuxK at work."""

import copy

import pytest
import torch

from sae_ray.sae import SAEConfig, create_sae
from sae_ray.sae.sparse import SparseLatents, top_k

D_IN, D_SAE, B = 24, 128, 40  # k <= 8 and k_aux 8 decode sparsely (sparse.pays)


def _configs(arch: str, ks: list[int]) -> list[SAEConfig]:
    extra = {"k_aux": 8}
    if arch == "matryoshka":
        extra["matryoshka_prefixes"] = [6, 24, 48]
    if arch == "jumprelu":
        return [SAEConfig(arch, D_IN, D_SAE, l0_coefficient=1.0, extra={**extra, "auxk_coefficient": 0.1})
                for _ in ks]
    return [SAEConfig(arch, D_IN, D_SAE, k=k, extra=extra) for k in ks]


def _pair(arch: str, ks: list[int] | None, seed: int):
    """(sparse, dense) copies of one SAE (a stack when ks has several values), with a third of the
    latents dead so that AuxK runs, and the dense one decoding densely."""
    torch.manual_seed(seed)
    cfgs = _configs(arch, ks or [5])
    sae = create_sae(cfgs if len(ks or []) > 1 else cfgs[0])
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.dead_tokens = 1000
        sae.tokens_since_fired[..., : D_SAE // 3] = 5000
    dense = copy.deepcopy(sae)
    dense.sparse_decoding = False
    return sae, dense


def _grads(sae) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


CASES = [(arch, ks) for arch in ("topk", "batchtopk", "matryoshka") for ks in (None, [3, 3, 3], [2, 7, 4])]
CASES += [("jumprelu", None), ("jumprelu", [1, 1])]  # AuxK alone


@pytest.mark.parametrize(("arch", "ks"), CASES)
def test_sparse_decoder_matches_dense_outputs_and_gradients(arch, ks):
    sparse, dense = _pair(arch, ks, seed=len(ks or []) + len(arch))
    x = torch.randn(B, D_IN) * 2
    outs = []
    for sae in (sparse, dense):
        out = sae(x)
        out.loss.sum().backward()
        outs.append(out)
    a, b = outs
    assert "auxk" in a.aux and float(a.aux["auxk"].detach().abs().sum()) > 0  # AuxK took part
    if arch != "jumprelu":  # the sparse path was taken
        assert sparse.sparse_activation(sparse.pre_acts(x)) is not None
    torch.testing.assert_close(a.x_hat, b.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.feature_acts, b.feature_acts)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    assert a.aux.keys() == b.aux.keys()
    for name in a.aux:
        torch.testing.assert_close(a.aux[name], b.aux[name], rtol=1e-5, atol=1e-5)
    ga, gb = _grads(sparse), _grads(dense)
    assert ga.keys() == gb.keys() and {"W_dec", "W_enc", "b_enc", "b_dec"} <= ga.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-5, msg=name)
    # the buffers the forward pass updates (firing counts, BatchTopK's θ) agree too
    for (name, ta), (_, tb) in zip(sparse.named_buffers(), dense.named_buffers()):
        torch.testing.assert_close(ta, tb, msg=name)


def test_eval_mode_topk_decodes_sparsely_and_batchtopk_densely():
    topk, dense = _pair("topk", None, seed=0)
    x = torch.randn(B, D_IN)
    topk.eval(), dense.eval()
    assert topk.sparse_activation(topk.pre_acts(x)) is not None
    torch.testing.assert_close(topk(x).x_hat, dense(x).x_hat, rtol=1e-5, atol=1e-5)
    btk, _ = _pair("batchtopk", None, seed=0)
    btk.eval()
    assert btk.sparse_activation(btk.pre_acts(x)) is None


def test_sparse_latents_forms_decode_the_dense_product():
    """Both forms against f @ W_dec directly, with `below` keeping only the first latents."""
    torch.manual_seed(0)
    W = torch.randn(3, D_SAE, D_IN)
    pre = torch.randn(3, B, D_SAE)
    idx, val = top_k(pre, 5, 5)
    rows = SparseLatents(idx, val, pre.shape)
    flat_idx, flat_val = top_k(pre.flatten(-2), 5 * B, 5 * B)
    flat_idx, order = flat_idx.sort(-1)
    flat = SparseLatents(flat_idx, flat_val.gather(-1, order), pre.shape)
    assert not rows.flat and flat.flat
    for lat in (rows, flat):
        f = lat.dense()
        assert int((f != 0).sum()) == 3 * B * 5
        torch.testing.assert_close(lat.decode(W), f @ W, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lat.decode(W, below=10), f[..., :10] @ W[:, :10], rtol=1e-5, atol=1e-5)
    # a row without entries (flat form) decodes to zero
    empty = SparseLatents(torch.tensor([[0, 1]]), torch.tensor([[1.0, 2.0]]), torch.Size([1, 2, D_SAE]))
    out = empty.decode(W[:1])
    torch.testing.assert_close(out[0, 0], W[0, 0] + 2 * W[0, 1])
    assert out[0, 1].abs().max() == 0


def test_dense_where_sparse_would_not_pay():
    """k above d_sae / 16 (and a large k_aux) take the dense path, with the same results."""
    torch.manual_seed(0)
    sae = create_sae(SAEConfig("topk", D_IN, D_SAE, k=D_SAE // 8))
    x = torch.randn(B, D_IN)
    assert sae.sparse_activation(sae.pre_acts(x)) is None
    assert create_sae(SAEConfig("topk", D_IN, D_SAE, k=D_SAE // 16)).sparse_activation(sae.pre_acts(x)) is not None


def test_b_dec_gradient_through_the_encoder_equals_autograds():
    """`centred_encode` computes b_dec's encoder gradient as a vector product; it must equal
    autograd's through (x - b_dec), single and stacked."""
    for cfg in (SAEConfig("standard", D_IN, D_SAE, l1_coefficient=1.0),
                [SAEConfig("standard", D_IN, D_SAE, l1_coefficient=1.0)] * 2):
        torch.manual_seed(0)
        sae = create_sae(cfg)
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_()
        x = torch.randn(B, D_IN)
        w = torch.randn(sae.shape(B, D_SAE))
        fast_pre = sae.pre_acts(x)
        (fast_pre * w).sum().backward()
        fast = [p.grad.clone() for p in (sae.b_dec, sae.W_enc, sae.b_enc)]
        sae.zero_grad()
        b_dec, b_enc = (sae.b_dec, sae.b_enc) if sae.n_stack is None else (sae.b_dec.unsqueeze(-2), sae.b_enc.unsqueeze(-2))
        pre = (x - b_dec) @ sae.W_enc + b_enc
        torch.testing.assert_close(fast_pre, pre, rtol=1e-5, atol=1e-5)
        (pre * w).sum().backward()
        for a, b in zip(fast, (sae.b_dec.grad, sae.W_enc.grad, sae.b_enc.grad)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert fast[0].abs().sum() > 0
