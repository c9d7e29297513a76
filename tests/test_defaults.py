"""Each architecture's defaults learn: on a small known-dictionary problem, `fit_sae` with nothing
but the sparsity asked for (k, or a target L0 for the coefficient architectures) gives a sparse
SAE, at the L0 asked for, that finds most of the true features. The short-run knobs of
`sae-ray bench synthetic` (SAE_EXTRA) are not used: this is what a researcher gets.

JumpReLU's old defaults (θ_0 = ε = 0.001) fail both tests here: θ, trained as log θ, cannot
climb from 0.001 in a run this short, so L0 stays near 90 of 256 latents whatever λ is and no
true feature is found."""

from __future__ import annotations

import pytest

from sae_ray import fit_sae
from sae_ray.bench.synthetic import SyntheticActivations, SyntheticConfig, recovery
from sae_ray.eval.metrics import evaluate_sae
from sae_ray.sae import ARCHITECTURES

PROBLEM = SyntheticConfig(d=32, n_features=128, l0=3.0)
D_SAE = 256  # 2x the true features, as the synthetic benchmark
TOKENS = 200_000  # 782 steps of fit_sae's default batch (256) and lr (3e-3)

LEAST_RECOVERED = 0.5  # "most" true features found: a decoder row at cosine >= 0.9
MOST_FVU = 0.35  # topk, batchtopk, jumprelu, gated: 0.18-0.20 here

# Today's defaults miss the bar here (measured; strict, so the test says when a change fixes them):
SHORT = {
    # the L1 penalty shrinks every latent it keeps and kills most latents at an L0 this low
    "standard": "ReLU+L1: 31% of the features, FVU 0.64, 70% of latents dead",
    # the nested losses pull the early latents towards general directions
    "matryoshka": "Matryoshka: 43% of the features",
}


@pytest.fixture(scope="module")
def problem():
    data = SyntheticActivations(PROBLEM)
    return data, data.sample(TOKENS), data.fresh(16_384)


def figures(sae, data, held_out) -> dict:
    ev = evaluate_sae(sae, held_out)
    ev["recovered"] = recovery(sae.W_dec, data.dictionary)[0]
    return ev


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.xfail(reason=SHORT[a], strict=True)) if a in SHORT
                                  else a for a in sorted(ARCHITECTURES)])
def test_the_defaults_learn_a_sparse_faithful_sae(arch, problem):
    data, x, held_out = problem
    true_l0 = PROBLEM.l0
    asked = {"k": round(true_l0)} if ARCHITECTURES[arch].sparsity_param == "k" else {"target_l0": true_l0}
    sae = fit_sae(x, arch, d_sae=D_SAE, **asked)
    ev = figures(sae, data, held_out)
    print(f"{arch}: {ev}")  # pytest -s shows the figures
    assert ev["l0"] == pytest.approx(true_l0, rel=0.25), ev
    assert ev["recovered"] >= LEAST_RECOVERED, ev
    assert ev["fvu"] <= MOST_FVU, ev


def test_jumprelus_coefficient_sets_its_sparsity(problem):
    """λ is not ignored: ten times the penalty gives a far sparser SAE, and the default λ
    (`target_start`, SAELens's 1.0) an L0 near the true one."""
    data, x, held_out = problem
    l0 = {lam: figures(fit_sae(x, "jumprelu", d_sae=D_SAE, l0_coefficient=lam), data, held_out)["l0"]
          for lam in (ARCHITECTURES["jumprelu"].target_start, 10 * ARCHITECTURES["jumprelu"].target_start)}
    low, high = l0.values()
    print(f"jumprelu: L0 by λ {l0}")
    assert low < 2 * PROBLEM.l0, l0
    assert high < 0.6 * low, l0
