"""JumpReLU SAE (Rajamanoharan et al. 2024, Gemma Scope): learned thresholds, L0 penalty."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from sae_ray.sae.base import SAE, SAEConfig, check_extra_number, register

BANDWIDTH = 0.05
"""Default bandwidth ε (cfg.extra["bandwidth"]), for inputs scaled as the training loop scales
them (E||x||^2 = d_in, SAELens's "expected_average_only_in"): SAELens's default
`jumprelu_bandwidth`. Gemma Scope's 0.001 is for inputs of unit mean squared norm (JumpReLU
paper; SAELens issue #494), i.e. 0.001 sqrt(d_in) in our scale: 0.048 for Gemma 2 2B (d_in 2304)."""

THRESHOLD_INIT = 1.0
"""Default initial threshold θ_0 (cfg.extra["threshold_init"]): the scale of a pre-activation at
init in our input scale (E||x||^2 = d_in and unit-norm encoder directions give E z^2 ~ 1), the
value `sae-ray bench synthetic` had measured best. θ trains as log θ (Gemma Scope's
parameterization) and Adam moves a parameter by about lr per step, so θ moves by about lr
*relative* per step and must start within a few e-folds of where it ends. The literature's
values start lower, for runs of many more steps: Gemma Scope's 0.001 (0.001 sqrt(d_in) in our
scale), Anthropic's 0.1 (January 2025 update: log θ as ours, inputs scaled as ours) and SAELens's
0.01 (our scale; a threshold trained directly since SAELens 6.48, PR #718, which moves about lr
per step in absolute terms, because from 0.01 a log threshold hardly moved)."""

AUXK_COEFFICIENT = 1 / 32
"""Default weight of the AuxK dead-latent loss (cfg.extra["auxk_coefficient"]): TopK's, Gao et al.
2024's α. Gemma Scope trains JumpReLU with no dead-latent loss (its runs are billions of tokens
long); in short runs latents whose θ outgrows their z die and stay dead: on the synthetic problem
of issue 14 (2M tokens, train.dead_tokens 10,000, target L0 7) AuxK took the true features found
from 48% to 94%, where Anthropic's pre-activation loss at its 3e-6 changed nothing (48%)."""


def rectangle(u: Tensor) -> Tensor:
    """The kernel K(u) = 1[|u| < 1/2], in u's dtype."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """f = z * H(z - θ). Backward: ∂f/∂z = H(z - θ); ∂f/∂θ = -(θ/ε) K((z - θ)/ε).
    z [..., n]; θ and ε broadcastable to z (θ's gradient is summed back to its shape)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, eps: float | Tensor) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        d_theta = -(theta / ctx.eps) * rectangle((z - theta) / ctx.eps) * grad
        return (z > theta) * grad, d_theta.sum_to_size(theta.shape), None


class StepFunction(torch.autograd.Function):
    """H(z - θ). Backward: no gradient to z; ∂H/∂θ = -(1/ε) K((z - θ)/ε).
    z [..., n]; θ and ε broadcastable to z (θ's gradient is summed back to its shape)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, eps: float | Tensor) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        z, theta = ctx.saved_tensors
        d_theta = -(1.0 / ctx.eps) * rectangle((z - theta) / ctx.eps) * grad
        return None, d_theta.sum_to_size(theta.shape), None


@register
class JumpReLUSAE(SAE):
    """ReLU replaced by a jump at a learned per-latent threshold θ > 0; L0 penalty.

        z     = (x - b_dec) @ W_enc + b_enc                 [B, d_sae]
        f     = z * H(z - θ)                                [B, d_sae]   θ = exp(log_threshold)
        x_hat = f @ W_dec + b_dec                           [B, d_in]
        l0    = mean_b sum_i H(z_i - θ_i)
        p_act = c * mean_b sum_{i dead} ReLU(θ_i - z_i) * ||W_dec_i||     c = pre_act_coefficient
        loss  = mean_b ||x_hat - x||^2 + sparsity_scale * λ * l0 + p_act + auxk    λ = l0_coefficient
           or   mean_b ||x_hat - x||^2 + sparsity_scale * λ * (l0 / l0_target - 1)^2 + p_act + auxk

    H has no useful derivative, so θ learns through straight-through estimators with
    the rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth ε:
        ∂f/∂θ = -(θ/ε) K((z - θ)/ε),   ∂H/∂θ = -(1/ε) K((z - θ)/ε),
    ∂f/∂z = H(z - θ) and no L0 gradient to z. They are the exact derivatives of the
    objective with the jump smoothed over a window of width ε around θ.

    A latent whose z never reaches θ gets no gradient at all, so it stays dead. Two
    dead-latent losses: TopK's AuxK (`SAE.auxk_loss`), on by default (`AUXK_COEFFICIENT`),
    which trains the dead latents (`SAE.dead_mask`) to explain the residual; and the
    pre-activation loss p_act above (Anthropic, "Circuits Updates", January 2025; SAELens's
    `pre_act_loss_coefficient`), off by default as in Gemma Scope, which pulls the z of dead
    latents up to θ until they fire again.

    Knobs in `cfg.extra`: "bandwidth" ε (default `BANDWIDTH`, 0.05), "threshold_init" θ_0
    (default `THRESHOLD_INIT`, 1.0), "l0_target" (optional; all members of a stack or none),
    "pre_act_coefficient" c (default 0: off, as Gemma Scope; Anthropic's January 2025 update
    uses 3e-6), "auxk_coefficient" (default `AUXK_COEFFICIENT`, 1/32) and "k_aux" (default
    d_in // 2, as TopK). The ε and θ_0 defaults are for inputs
    scaled as the training loop scales them (E||x||^2 = d_in), where a pre-activation is of
    order 1; `BANDWIDTH` and `THRESHOLD_INIT` say where they come from. θ moves by about lr
    (relative) per Adam step, so θ_0 must not start many e-folds from where θ ends. θ stays in
    float32 (or wider) inside the estimators; under bf16 autocast z itself is rounded to ~0.4%
    of |z|, well inside ε = 0.05 at |z| ~ 1 (with a bandwidth of 0.001 the kernel would catch
    few points). Unit-norm decoder rows
    (gradient along them removed, as the GDM recipe); init: W_dec rows random unit
    vectors, W_enc = W_dec^T, biases zero. Adam betas (0, 0.999) as Gemma Scope.
    Saved with SAELens's `threshold` [d_sae] (= exp(log_threshold)). As a transcoder (`SAE`):
    z = x @ W_enc + b_enc, x_hat [B, d_out] (+ x @ W_skip^T) against the target y; saved as
    SAELens's "jumprelu_transcoder" ("jumprelu_skip_transcoder"), Gemma Scope's transcoders.
    """

    architecture = "jumprelu"
    sparsity_param = "l0_coefficient"
    target_start = 1.0  # SAELens's default l0_coefficient; near where the synthetic problem of the tests lands
    unit_norm_decoder = True
    adam_betas = (0.0, 0.999)
    knobs = (*SAE.knobs, "bandwidth", "threshold_init", "l0_target", "pre_act_coefficient", "k_aux", "auxk_coefficient")

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.l0_coefficient is None or cfg.l0_coefficient < 0:
            raise ValueError(
                f"SAEConfig.l0_coefficient: {cfg.l0_coefficient!r}; the jumprelu architecture needs a number >= 0"
            )
        for key, default in (("bandwidth", BANDWIDTH), ("threshold_init", THRESHOLD_INIT), ("l0_target", 1.0)):
            check_extra_number(cfg, key, default, positive=True)
        check_extra_number(cfg, "pre_act_coefficient", 0.0)
        cls.check_auxk_config(cfg)

    def __init__(self, cfg: SAEConfig | list[SAEConfig]):
        super().__init__(cfg)
        inits = [math.log(v) for v in self.each_extra("threshold_init", THRESHOLD_INIT)]
        log_threshold = torch.tensor(inits, dtype=self.W_dec.dtype).unsqueeze(-1).expand(-1, self.cfg.d_sae)
        self.log_threshold = nn.Parameter(log_threshold[0].clone() if self.n_stack is None else log_threshold.clone())
        self.hyper("l0_coefficient", [c.l0_coefficient for c in self.cfgs])
        self.hyper("bandwidth", [float(v) for v in self.each_extra("bandwidth", BANDWIDTH)])
        self.init_auxk(default_coefficient=AUXK_COEFFICIENT)
        pre_act = [float(v) for v in self.each_extra("pre_act_coefficient", 0.0)]
        self.pre_act_on = any(v > 0 for v in pre_act)
        self.hyper("pre_act_coefficient", pre_act)
        targets = self.each_extra("l0_target", None)
        if len({t is None for t in targets}) > 1:
            raise ValueError(
                f"SAEConfig.extra['l0_target']: {targets!r}; give it to every member of a stack or to none"
            )
        if targets[0] is None:
            self.l0_target = None
        else:
            self.hyper("l0_target", [float(t) for t in targets])

    @property
    def threshold(self) -> Tensor:
        """[d_sae] ([K, d_sae] for a stack): θ = exp(log_threshold)."""
        return self.log_threshold.exp()

    def _theta_eps(self) -> tuple[Tensor, float | Tensor]:
        """θ and ε shaped to broadcast against [(K,) B, d_sae]."""
        if self.n_stack is None:
            return self.threshold, self.bandwidth
        return self.threshold.unsqueeze(-2), self.per_row(self.bandwidth)

    def activation(self, pre: Tensor) -> Tensor:
        """[(K,) B, d_sae] -> same: pre * H(pre - θ)."""
        theta, eps = self._theta_eps()
        return JumpReLUFunction.apply(pre, theta, eps)

    def aux_losses(self, x: Tensor, target: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor,
                   active=None) -> dict[str, Tensor]:
        """{"l0": the weighted L0 penalty, "pre_act" and "auxk": the dead-latent losses (each
        only when its coefficient is set)}; pre [(K,) B, d_sae]; each scalar ([K] for a stack)."""
        theta, eps = self._theta_eps()
        l0 = StepFunction.apply(pre, theta, eps).sum(-1).mean(-1)
        if self.l0_target is not None:
            l0 = (l0 / self.l0_target - 1).pow(2)
        losses = {"l0": self.sparsity_scale * self.l0_coefficient * l0}
        if self.pre_act_on:
            # weight [(K,) 1, d_sae]: ||W_dec_i|| for dead latents, 0 for live ones
            weight = (self.W_dec.norm(dim=-1) * self.dead_mask).unsqueeze(-2)
            below = (theta - pre).relu()
            losses["pre_act"] = self.pre_act_coefficient * (below * weight).sum(-1).mean(-1)
        if self.auxk_on:
            losses["auxk"] = self.auxk_loss(target, pre, x_hat)
        return losses

    def saved_tensors(self) -> dict[str, Tensor]:
        """The state_dict with `threshold` = exp(log_threshold) in place of log_threshold."""
        tensors = dict(self.state_dict())
        tensors["threshold"] = tensors.pop("log_threshold").exp()
        return tensors

    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `saved_tensors` (a threshold <= 0 acts as 0: f = ReLU(z))."""
        tensors = dict(tensors)
        if "threshold" in tensors:
            tensors["log_threshold"] = tensors.pop("threshold").clamp_min(0).log()
        self.load_state_dict(tensors)
