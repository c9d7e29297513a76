"""Import and export of SAEs in other projects' formats.

- SAELens (`saelens`): a directory of cfg.json + sae_weights.safetensors (SAEs and transcoders);
  read and written.
- sparsify (`sparsify`): a directory of cfg.json + sae.safetensors; read and written (TopK).
- Gemma Scope (`gemmascope`): a params.npz (an SAE or a transcoder); read.

`load_sae_path(path, **hints)` tells them apart by their files and loads any of them. Only
safetensors and .npz of plain arrays are read; a pickle, under any name, is refused
(`files.SAEFileError`, a ValueError, as every error about a file's content here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_ray.formats.files import PICKLE_SUFFIXES, SAEFileError, refuse_pickle_name
from sae_ray.formats.gemmascope import PARAMS_FILENAME, load_gemmascope
from sae_ray.formats.saelens import load_sae_dir, load_saelens, save_saelens
from sae_ray.formats.sparsify import load_sparsify, save_sparsify
from sae_ray.sae import SAE

__all__ = ["SAEFileError", "detect_format", "load_gemmascope", "load_sae_dir", "load_sae_path",
           "load_saelens", "load_sparsify", "save_saelens", "save_sparsify"]

_FILES = {  # a file's name -> (format, the path that format's loader takes)
    "sae_weights.safetensors": "saelens",
    "sae.safetensors": "sparsify",
    PARAMS_FILENAME: "gemmascope",
}


def detect_format(path: str | Path) -> tuple[str, Path]:
    """(format, path to load) of a local path: a SAELens or sparsify directory (or its
    cfg.json / weights file), a Gemma Scope params.npz (or its directory).
    FileNotFoundError if there is nothing there; SAEFileError for a pickle or an unknown layout."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        refuse_pickle_name(path)
        if path.name in _FILES:
            fmt = _FILES[path.name]
            return fmt, path if fmt == "gemmascope" else path.parent
        if path.suffix == ".npz":
            return "gemmascope", path
        if path.name == "cfg.json":
            return detect_format(path.parent)
        raise SAEFileError(
            f"{path}: not a file of a format sae-ray reads; accepted: a SAELens directory "
            "(cfg.json + sae_weights.safetensors), a sparsify directory (cfg.json + sae.safetensors), "
            "a Gemma Scope params.npz"
        )
    names = {p.name for p in path.iterdir()}
    if "cfg.json" in names and "sae_weights.safetensors" in names:
        return "saelens", path
    if "cfg.json" in names and "sae.safetensors" in names:
        return "sparsify", path
    if PARAMS_FILENAME in names:
        return "gemmascope", path / PARAMS_FILENAME
    pickles = sorted(n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES)
    inside = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "cfg.json").is_file())
    hint = ""
    if pickles:
        hint = f"; it holds {pickles}: pickles, which sae-ray never loads"
    elif inside:
        hint = f"; these subdirectories hold an SAE each, load one of them: {inside[:10]}"
    elif "cfg.json" in names:
        hint = "; it has a cfg.json but neither sae_weights.safetensors (SAELens) nor sae.safetensors (sparsify)"
    raise SAEFileError(
        f"{path}: no SAE found; accepted: a SAELens directory (cfg.json + sae_weights.safetensors), "
        f"a sparsify directory (cfg.json + sae.safetensors), a Gemma Scope params.npz{hint}"
    )


def load_sae_path(path: str | Path, device: str | torch.device = "cpu", **hints) -> SAE:
    """The SAE at a local path, in whichever format it is (`detect_format`), on `device`, in
    training mode as built (call .eval() for inference: BatchTopK-style SAEs then use their
    threshold).

    hints, passed to the format's loader: SAELens: scaling_factor (s of normalize_activations
    "expected_average_only_in"); sparsify: hook_name, model_name; Gemma Scope: hook_name, site,
    layer, model_name, hook_name_out (a transcoder's). A hint the format does not take is an error.
    """
    fmt, target = detect_format(path)
    loaders = {"saelens": (load_sae_dir, {"scaling_factor"}),
               "sparsify": (load_sparsify, {"hook_name", "model_name"}),
               "gemmascope": (load_gemmascope, {"hook_name", "site", "layer", "model_name", "hook_name_out"})}
    loader, takes = loaders[fmt]
    unknown = sorted(set(hints) - takes)
    if unknown:
        raise ValueError(
            f"load_sae_path: {path} is a {fmt} SAE, which takes no {', '.join(unknown)}; "
            f"accepted hints: {', '.join(sorted(takes)) or 'none'}"
        )
    return loader(target, device=device, **hints)
