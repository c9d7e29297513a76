"""Standard SAE: ReLU latents, L1 penalty weighted by decoder row norms."""

from __future__ import annotations

from torch import Tensor

from sae_ray.sae.base import SAE, SAEConfig, register


@register
class StandardSAE(SAE):
    """ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, April 2024 update).

        f     = ReLU((x - b_dec) @ W_enc + b_enc)                  [B, d_sae]
        x_hat = f @ W_dec + b_dec                                  [B, d_in]
        l1    = sparsity_scale * λ * mean_b sum_i f_i ||W_dec[i]||  λ = l1_coefficient
        loss  = mean_b ||x_hat - x||^2 + l1

    As a transcoder (`SAE`): f = ReLU(x @ W_enc + b_enc), x_hat [B, d_out] (+ x @ W_skip^T)
    against the target y in place of x; saved as SAELens's "transcoder" ("skip_transcoder").

    Weighting f_i by ||W_dec[i]|| means shrinking f_i while growing W_dec[i]
    cannot lower the penalty, so the decoder needs no norm constraint
    (`pre_step` / `post_step` do nothing). Init, simplified from that update:
    W_dec rows random directions of norm 0.1 (`cfg.extra["decoder_init_norm"]`),
    W_enc = W_dec^T, biases zero. Adam betas (0.9, 0.999).
    """

    architecture = "standard"
    sparsity_param = "l1_coefficient"
    target_start = 5.0  # λ = 5 of the Anthropic April 2024 update, whose inputs are scaled as ours (E||x||^2 = d_in)
    decoder_init_norm = 0.1

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.l1_coefficient is None or cfg.l1_coefficient < 0:
            raise ValueError(
                f"SAEConfig.l1_coefficient: {cfg.l1_coefficient!r}; the {cls.architecture} "
                "architecture needs a number >= 0"
            )

    def __init__(self, cfg: SAEConfig | list[SAEConfig]):
        super().__init__(cfg)
        self.hyper("l1_coefficient", [c.l1_coefficient for c in self.cfgs])

    def activation(self, pre: Tensor) -> Tensor:
        """[(K,) B, d_sae] -> same: ReLU."""
        return pre.relu()

    def aux_losses(self, x: Tensor, target: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor,
                   active=None) -> dict[str, Tensor]:
        """{"l1": sparsity_scale * λ * mean_b sum_i f_i ||W_dec[i]||}; f [(K,) B, d_sae]."""
        l1 = (f @ self.W_dec.norm(dim=-1).unsqueeze(-1)).squeeze(-1).mean(-1)  # sum_i f_i ||W_dec[i]||
        return {"l1": self.sparsity_scale * self.l1_coefficient * l1}
