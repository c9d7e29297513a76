"""Metrics for trained SAEs."""

from sae_ray.eval.metrics import FiringTracker, evaluate_sae, fvu, l0

__all__ = ["FiringTracker", "evaluate_sae", "fvu", "l0"]
