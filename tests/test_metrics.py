"""fvu, l0, dead latents, evaluate_sae."""

from __future__ import annotations

import pytest
import torch

from sae_ray.eval import dead_fraction, evaluate_sae, fvu, l0
from sae_ray.sae import SAEConfig, create_sae


def test_fvu_perfect_and_mean():
    torch.manual_seed(0)
    x = torch.randn(50, 6) * 3 + 2
    assert fvu(x, x).item() == 0
    torch.testing.assert_close(fvu(x, x.mean(0).expand_as(x)), torch.tensor(1.0))
    # halfway to the truth from the mean explains 3/4 of the variance
    half = (x + x.mean(0)) / 2
    torch.testing.assert_close(fvu(x, half), torch.tensor(0.25))
    # a stack: one FVU per member, against the shared x
    torch.testing.assert_close(fvu(x, torch.stack([x, half])), torch.tensor([0.0, 0.25]))


def test_fvu_is_pooled_not_per_dimension():
    x = torch.tensor([[0.0, 0.0], [10.0, 1.0]])  # variance 50 + 0.5
    x_hat = torch.tensor([[0.0, 0.5], [10.0, 0.5]])  # error only in the small dimension
    torch.testing.assert_close(fvu(x, x_hat), torch.tensor(0.5 / 50.5))


def test_l0():
    f = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert l0(f).item() == pytest.approx(1.0)
    assert l0(torch.stack([f, torch.zeros_like(f)])).tolist() == [1.0, 0.0]  # one per stack member


def test_dead_fraction_of_firing_counts():
    sae = create_sae(SAEConfig("topk", 6, 4, k=1))
    for f in (torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]]), torch.tensor([[1.0, 0, 0, 0]] * 3)):
        sae.observe(f, f)  # 0, 1 fire; then 0 fires again
    t = sae.tokens_since_fired
    assert t.tolist() == [0, 3, 5, 5]
    assert dead_fraction(t, 5).item() == 0.5  # latents 2 and 3 never fired in 5 tokens
    assert dead_fraction(t, 3).item() == 0.75  # latent 1 has been silent for 3
    assert dead_fraction(t, 6).item() == 0.0
    assert dead_fraction(torch.stack([t, torch.zeros_like(t)]), 5).tolist() == [0.5, 0.0]
    assert not sae.dead_mask.any()  # no threshold set (the training loop sets it): nothing is dead
    sae.dead_tokens = 5
    assert sae.dead_mask.tolist() == [False, False, True, True]


def _sae(arch: str = "standard"):
    torch.manual_seed(0)
    kw = {"k": 3} if arch == "topk" else {"l1_coefficient": 0.1}
    sae = create_sae(SAEConfig(arch, 6, 16, **kw))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.b_enc[:4] = -1e4  # latents 0..3 can never fire
    return sae


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_evaluate_sae_matches_direct_computation(arch):
    sae = _sae(arch)
    torch.manual_seed(1)
    x = torch.randn(1000, 6) * torch.arange(1, 7) + 5  # uneven scales, far from 0
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    got = evaluate_sae(sae, x, batch_size=300)  # 300, 300, 300, 100
    assert got.keys() == {"mse", "fvu", "l0", "dead_fraction"}
    assert got["fvu"] == pytest.approx(fvu(x, x_hat).item(), rel=1e-5)
    assert got["mse"] == pytest.approx((x - x_hat).pow(2).sum(1).mean().item(), rel=1e-5)
    assert got["l0"] == pytest.approx(l0(f).item(), rel=1e-6)
    never = ~(f != 0).any(0)
    assert never[:4].all()
    assert got["dead_fraction"] == pytest.approx(never.float().mean().item())
    # not the mean of per-batch FVUs
    per_batch = sum(fvu(a, b).item() for a, b in zip(x.split(300), x_hat.split(300))) / 4
    assert abs(per_batch - got["fvu"]) > 1e-4


def test_evaluate_sae_leaves_sae_as_it_was():
    sae = _sae("topk")
    sae.train()
    evaluate_sae(sae, torch.randn(20, 6), batch_size=7)
    assert sae.training
    assert (sae.tokens_since_fired == 0).all()
    assert all(p.grad is None for p in sae.parameters())
