"""Reading other projects' SAE files safely: safetensors, numpy .npz of plain arrays, JSON.

Nothing here unpickles. A file is sniffed by its first bytes before it is opened, so a
pickle (or a torch.save zip, whose data.pkl is one) is refused whatever its name says;
.npz files are read with `allow_pickle=False` and must hold plain numeric arrays only.
Every error is an `SAEFileError` (a ValueError) naming the file, the tensor or key, the
value found and what is accepted.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
"""File names that usually hold pickles (torch.save, pickle.dump): never loaded."""


class SAEFileError(ValueError):
    """A file that cannot be read as the SAE format it should be: bad bytes, a missing or
    unexpected tensor, a wrong shape, a config value that is not supported."""


def sniff(path: Path) -> str:
    """What the first bytes of `path` say it is: "safetensors", "zip" (an .npz, or a
    torch.save file), "npy", "pickle", "json" or "unknown"."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "unknown"


_WHAT = {
    "zip": "a zip archive (an .npz, or a torch.save file whose data.pkl is a pickle)",
    "npy": "a single numpy .npy array",
    "pickle": "a pickle",
    "json": "a JSON document",
    "unknown": "not a file format sae-ray reads",
}


def refuse_pickle_name(path: Path) -> None:
    """Raise SAEFileError if `path`'s name says pickle (.pt, .bin, .pkl, ...)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SAEFileError(
            f"{path}: a {path.suffix} file is a pickle (torch.save / pickle.dump), and sae-ray never "
            "unpickles a file; convert it to safetensors where it was made (accepted: a SAELens or "
            "sparsify directory of .safetensors, a Gemma Scope params.npz)"
        )


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path` (SAEFileError if it is not one)."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise SAEFileError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """{name: CPU tensor} of a safetensors file, after checking its header bytes;
    every tensor must be floating point."""
    kind = sniff(path)
    if kind != "safetensors":
        raise SAEFileError(
            f"{path}: {_WHAT[kind]}, not safetensors; only safetensors weights are read "
            "(sae-ray never unpickles a file)"
        )
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
        raise SAEFileError(f"{path}: not a valid safetensors file ({e})") from e
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise SAEFileError(f"{path}: tensor {name!r} has dtype {t.dtype}; expected a floating point dtype")
    return tensors


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """{name: array} of an .npz of plain float arrays, read with allow_pickle=False."""
    kind = sniff(path)
    if kind != "zip":
        raise SAEFileError(f"{path}: {_WHAT[kind]}, not an .npz archive of arrays")
    out: dict[str, np.ndarray] = {}
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SAEFileError(f"{path}: not a readable .npz archive ({e})") from e
    with data:
        for name in data.files:
            try:
                arr = data[name]
            except ValueError as e:  # object arrays: "Object arrays cannot be loaded when allow_pickle=False"
                raise SAEFileError(
                    f"{path}: array {name!r} cannot be read without unpickling ({e}); "
                    "expected plain float arrays"
                ) from e
            if not isinstance(arr, np.ndarray):
                raise SAEFileError(f"{path}: member {name!r} is not a .npy array; expected plain float arrays")
            if arr.dtype.kind != "f":
                raise SAEFileError(f"{path}: array {name!r} has dtype {arr.dtype}; expected a float dtype")
            out[name] = arr
    return out


def check_tensors(path: Path, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise SAEFileError naming the tensor unless `tensors` holds exactly the names of
    `shapes`, each with that shape."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise SAEFileError(
                f"{path}: missing tensor {name!r}; expected {_listing(shapes)}, found {sorted(tensors)}"
            )
        if tuple(tensors[name].shape) != shape:
            raise SAEFileError(
                f"{path}: size mismatch for {name}: the file has shape {list(tensors[name].shape)}, "
                f"expected {list(shape)}"
            )
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise SAEFileError(f"{path}: unexpected tensor(s) {unexpected}; expected {_listing(shapes)}")


def _listing(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{n} {list(s)}" for n, s in shapes.items())


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32" (SAEFileError for a dtype SAEConfig does not take)."""
    from sae_ray.dtypes import TORCH_DTYPES

    for name, d in TORCH_DTYPES.items():
        if d == dtype:
            return name
    raise SAEFileError(f"dtype {dtype} is not supported; accepted: {', '.join(TORCH_DTYPES)}")
