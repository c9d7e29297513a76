"""SAE architectures. Each module of this package registers its own; adding an
architecture is adding a file (see `base.register`)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch

from sae_ray.sae.base import ARCHITECTURES, SAE, SAEConfig, SAEOutput, create_sae, register

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEOutput", "create_sae", "load_sae_dir", "register"]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def load_sae_dir(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a SAELens directory (cfg.json + sae_weights.safetensors) as the SAE its cfg.json names."""
    return SAE.load(path, device=device)
