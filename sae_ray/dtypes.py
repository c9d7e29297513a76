"""dtype names, and bfloat16 as uint16 bits: the one home for every dtype table. No Ray, no Zarr.

Configs name dtypes as strings. Models compute and buffers store in one of
`ACTIVATION_DTYPES`; SAE parameters may also be float64. numpy (and so Zarr) has no
bfloat16, so a bfloat16 tensor is stored as the uint16 bits of its values: exact both
ways, since a bfloat16 is the top half of a float32.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
"""Every dtype name sae-ray accepts -> the torch dtype."""

ActivationDtype = Literal["float32", "float16", "bfloat16"]
"""What a model computes in and a buffer stores activations in (the config fields' type)."""
ACTIVATION_DTYPES: tuple[str, ...] = get_args(ActivationDtype)

STORAGE_DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
"""Activation dtype name -> the numpy dtype a buffer stores it as (bfloat16: its bits)."""


def torch_dtype(name: str) -> torch.dtype:
    """"float32" (or SAELens's "torch.float32") -> torch.float32; ValueError naming the accepted ones."""
    key = name.removeprefix("torch.") if isinstance(name, str) else name
    if key not in TORCH_DTYPES:
        raise ValueError(f"dtype: {name!r} is not supported; accepted: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[key]


def as_storage(t: torch.Tensor, name: str) -> torch.Tensor:
    """[...] tensor -> the same shape and device in the storage dtype of `name`
    (bfloat16: reinterpreted as int16 bits, whose numpy view is uint16)."""
    t = t.to(TORCH_DTYPES[name])
    return t.view(torch.int16) if name == "bfloat16" else t


def to_numpy(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """numpy array or (any-device) torch tensor -> numpy; a bfloat16 tensor becomes its uint16 bits."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16)
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{what} must be a numpy array or torch tensor, got {type(x).__name__}")


def bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits [...] -> float32 [...] (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bits_to_bfloat16(bits: np.ndarray) -> torch.Tensor:
    """uint16 bfloat16 bits [...] -> a CPU torch.bfloat16 tensor [...] sharing the memory."""
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
