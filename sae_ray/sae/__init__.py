"""SAE architectures. Each module of this package registers its own; adding an
architecture is adding a file (see `base.register`). Files: `sae_ray.formats`."""

from __future__ import annotations

import importlib
import pkgutil

from sae_ray.sae.base import ARCHITECTURES, SAE, SAEConfig, SAEOutput, create_sae, register

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEOutput", "create_sae", "register"]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
