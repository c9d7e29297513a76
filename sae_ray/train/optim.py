"""Adam with a learning rate per stack member, per-member gradient clipping, and the schedules.

A stack of K SAEs has a leading K on every parameter; member k owns the slice p[k].
Adam's moments are elementwise, so they are already per member; only the learning
rate and the clipping norm need to know about the members.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from sae_ray.config import TrainConfig
from sae_ray.sae.base import member_views


class Adam:
    """Adam (Kingma & Ba 2015) computed exactly as `torch.optim.Adam` (no weight decay, no amsgrad).

        m = beta1 m + (1 - beta1) g
        v = beta2 v + (1 - beta2) g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    For a stack of K, every parameter is p [K, ...] and member k owns p[k]. `lr` is a float,
    or a list of K floats (member k steps with lr[k]); the loop sets it before each step.
    n_stack: K, so that a stack on CPU is stepped member by member (see `member_views`).
    """

    def __init__(self, params: Iterable[Tensor], lr: float | list[float], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, n_stack: int | None = None):
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"adam_betas: {tuple(betas)!r}; need two numbers in [0, 1)")
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self.n_stack = len(lr) if isinstance(lr, list) else n_stack
        self.steps = [0] * len(self.params)
        """Steps taken by each parameter (one that had no gradient was skipped, as in torch)."""
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, (p, m, v) in enumerate(zip(self.params, self.exp_avg, self.exp_avg_sq)):
            if p.grad is None:
                continue
            self.steps[i] += 1
            if isinstance(self.lr, list):  # one lr per member: step them one by one
                for k, lr in enumerate(self.lr):
                    self._update(p[k], p.grad[k], m[k], v[k], lr, self.steps[i])
            else:
                for views in member_views(self.n_stack, p, p.grad, m, v):
                    self._update(*views, self.lr, self.steps[i])

    def _update(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, lr: float, t: int) -> None:
        """One Adam step, in place, of p with gradient g and moments m, v (same shapes); t counts from 1."""
        beta1, beta2 = self.betas
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().div_(math.sqrt(1 - beta2**t)).add_(self.eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state["steps"])
        for mine, theirs in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(theirs)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float, n_stack: int | None = None) -> Tensor:
    """Scale gradients in place so that their L2 norm is at most `max_norm`; returns the norms before.

    n_stack None: one norm over all gradients, as `torch.nn.utils.clip_grad_norm_`; returns a scalar.
    n_stack K: member k's norm is over the slices g[k] of every gradient g [K, ...], and each
    member is scaled on its own; returns [K].
    """
    params = list(params)
    if n_stack is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(n_stack)
    # vector_norm reduces without a [K, ...] temporary (g.pow(2) would make one per gradient)
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(n_stack, -1), dim=1, dtype=torch.float32)
                         for g in grads]).pow(2).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.reshape(-1, *[1] * (g.dim() - 1)).to(g.dtype))
    return norms


def warmup_steps(total_steps: int, train: TrainConfig) -> int:
    """Steps of linear lr warmup: `train.lr_warmup_steps`, capped at 10% of the run."""
    return min(train.lr_warmup_steps, total_steps // 10)


def lr_factor(step: int, total_steps: int, train: TrainConfig) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) of a `total_steps` run.

    Warmup: (step + 1) / W over the first W = `warmup_steps` steps (no step at lr 0).
    "linear": 1, then from step D = total_steps - lr_decay_fraction * total_steps down along
    a line that reaches lr_end_factor at total_steps (the last step is just above it).
    "cosine": half a cosine from 1 at the end of warmup to lr_end_factor at total_steps.
    "none": 1 after warmup.
    """
    warmup = warmup_steps(total_steps, train)
    if step < warmup:
        return (step + 1) / warmup
    end = train.lr_end_factor
    if train.lr_decay == "linear":
        start = max(total_steps - round(train.lr_decay_fraction * total_steps), warmup)
        if step >= start and total_steps > start:
            return 1.0 - (1.0 - end) * min((step - start) / (total_steps - start), 1.0)
    elif train.lr_decay == "cosine" and total_steps > warmup:
        progress = min((step - warmup) / (total_steps - warmup), 1.0)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def sparsity_factor(step: int, total_steps: int, train: TrainConfig) -> float:
    """`sae.sparsity_scale` at step `step`: step / S over the first S = sparsity_warmup_fraction *
    total_steps steps (0 at the first step), then 1."""
    ramp = round(train.sparsity_warmup_fraction * total_steps)
    return min(step / ramp, 1.0) if ramp > 0 else 1.0
