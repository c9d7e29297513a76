"""The training loop: one SAE, batches from any iterator. Knows nothing of Ray or MLflow.

Callers pass `on_log(step, metrics)` to forward metrics wherever they go (Tune, MLflow,
a notebook's print).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sae_ray.eval.metrics import FiringTracker, fvu
from sae_ray.sae import SAE


def pick_device(device: str) -> torch.device:
    """'auto' means cuda when this process can see a GPU, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken."""
    tokens_seen: int = 0
    """Rows the SAE has been trained on."""
    seconds: float = 0.0
    """Wall time spent in the loop (including waiting for batches)."""
    dead_fraction: float = 0.0
    """Fraction of latents that had not fired for `dead_tokens` tokens when training ended."""


def train_sae(
    sae: SAE,
    batches: Iterator[torch.Tensor],
    total_tokens: int,
    lr: float = 3e-4,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    dead_tokens: int = 1_000_000,
    log_every: int = 20,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainState:
    """Train `sae` in place until `total_tokens` rows have been seen.

    batches: yields float tensors [batch, d_in] (on any device; moved to the SAE's device).
    Logged metrics: loss, mse, fvu (of the batch), l0, dead_fraction (latents silent for
    `dead_tokens` tokens), the architecture's aux terms, tokens, tokens_per_s.
    """
    device = next(sae.parameters()).device
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=adam_betas)
    tracker = FiringTracker(sae.cfg.d_sae, device=device)
    state = TrainState()
    start = time.perf_counter()
    last_log_tokens, last_log_time = 0, start
    for x in batches:
        x = x.to(device, non_blocking=True).float()
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.pre_step()
        opt.step()
        sae.post_step()
        tracker.update(out.feature_acts.detach())
        state.step += 1
        state.tokens_seen += x.shape[0]
        done = state.tokens_seen >= total_tokens
        if on_log is not None and (state.step % log_every == 0 or done):
            now = time.perf_counter()
            with torch.no_grad():
                metrics = {
                    "loss": out.loss.item(),
                    "mse": out.mse.item(),
                    "fvu": fvu(x, out.x_hat).item(),
                    "l0": (out.feature_acts > 0).float().sum(-1).mean().item(),
                    "dead_fraction": tracker.dead_fraction(dead_tokens),
                    "tokens": float(state.tokens_seen),
                    "tokens_per_s": (state.tokens_seen - last_log_tokens) / max(now - last_log_time, 1e-9),
                }
                metrics.update({k: v.item() for k, v in out.aux.items()})
            last_log_tokens, last_log_time = state.tokens_seen, now
            on_log(state.step, metrics)
        if done:
            break
    state.seconds = time.perf_counter() - start
    state.dead_fraction = tracker.dead_fraction(dead_tokens)
    return state
