"""Metrics for trained SAEs."""

from sae_ray.eval.metrics import dead_fraction, dead_mask, evaluate_sae, fvu, l0, sse

__all__ = ["dead_fraction", "dead_mask", "evaluate_sae", "fvu", "l0", "sse"]
