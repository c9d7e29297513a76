"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries."""

from __future__ import annotations

import numbers

from torch import Tensor

from sae_ray.sae.base import SAEConfig, register
from sae_ray.sae.batchtopk import BatchTopKSAE
from sae_ray.sae.sparse import SparseLatents


def default_prefixes(d_sae: int) -> list[int]:
    """d_sae/16, /8, /4, /2 and d_sae, rounded, without repeats or zeros."""
    return sorted({max(1, round(d_sae / 2**j)) for j in range(5)})


@register
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK SAE whose first m latents must reconstruct x on their own, for each
    prefix size m (so early latents learn general features, later ones refinements).

        f      = BatchTopK as in `BatchTopKSAE` (one top k*B over the whole dictionary)
        x_hat  = f @ W_dec + b_dec                                 the full dictionary
        x_hat_m = f[:, :m] @ W_dec[:m] + b_dec                     m in prefixes, m < d_sae
        loss   = mean_b ||x_hat - x||^2 + sum_m mean_b ||x_hat_m - x||^2 + auxk

    As a transcoder (`SAE`): x_hat and every x_hat_m [B, d_out] (each + x @ W_skip^T) against
    the target y in place of x.

    That is the sum of the prefix reconstruction losses (the largest prefix is the
    whole dictionary, whose loss is `mse`), as SAELens; aux holds each smaller one as
    "mse_prefix_<m>". Prefixes: cfg.extra["matryoshka_prefixes"], strictly increasing
    sizes in [1, d_sae] (d_sae is added if missing; one list per stack); default
    d_sae/16, /8, /4, /2, d_sae. One BatchTopK over all latents, as Bussmann et al.'s
    own code. Inference, threshold θ, AuxK (on the full residual), decoder constraint
    and saving (as a SAELens "jumprelu") as BatchTopK. Adam betas (0.9, 0.999).
    """

    architecture = "matryoshka"
    knobs = (*BatchTopKSAE.knobs, "matryoshka_prefixes")

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        prefixes = cfg.extra.get("matryoshka_prefixes")
        if prefixes is None:
            return
        ok = isinstance(prefixes, (list, tuple)) and len(prefixes) > 0 and all(
            isinstance(m, numbers.Integral) and not isinstance(m, bool) and 1 <= m <= cfg.d_sae for m in prefixes
        )
        if not ok or any(a >= b for a, b in zip(prefixes, prefixes[1:])):
            raise ValueError(
                f"SAEConfig.extra['matryoshka_prefixes']: {prefixes!r}; expected strictly increasing "
                f"integers in [1, d_sae={cfg.d_sae}]"
            )

    def __init__(self, cfg: SAEConfig | list[SAEConfig]):
        super().__init__(cfg)
        prefixes = [int(m) for m in self.same_extra("matryoshka_prefixes", default_prefixes(self.cfg.d_sae))]
        if prefixes[-1] != self.cfg.d_sae:
            prefixes.append(self.cfg.d_sae)
        self.prefixes = prefixes
        """Nested dictionary sizes, increasing, the last d_sae."""

    def aux_losses(self, x: Tensor, target: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor,
                   active: SparseLatents | None = None) -> dict[str, Tensor]:
        """{"mse_prefix_<m>": ... for each prefix m < d_sae, "auxk": ...}; scalars ([K] for a stack).
        x [B, d_in]; target [B, d_out]; pre, f [(K,) B, d_sae]; x_hat [(K,) B, d_out]; active: f's
        sparse form, if this batch decoded sparsely (then each prefix decodes only its own active
        latents). Each prefix adds b_dec (and a skip transcoder's x @ W_skip^T), as x_hat does."""
        out = {}
        offset = self.offset(x)
        for m in self.prefixes[:-1]:
            if active is not None:
                x_hat_m = active.decode(self.W_dec, below=m) + offset
            elif self.cfg.skip:
                x_hat_m = f[..., :m] @ self.W_dec[..., :m, :] + offset
            else:
                x_hat_m = self.affine(f[..., :m], self.W_dec[..., :m, :], self.b_dec)
            out[f"mse_prefix_{m}"] = (x_hat_m - target).pow(2).sum(-1).mean(-1)
        out["auxk"] = self.auxk_loss(target, pre, x_hat)
        return out
