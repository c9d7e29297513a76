"""SAELens on-disk format: a directory with `cfg.json` and `sae_weights.safetensors`.

`save_saelens(sae, path)` writes one; `load_sae_dir(path)` reads one back as the SAE it
holds; `load_saelens(path)` gives the raw (config, tensors).

cfg.json is a superset that both SAELens loaders read:
- SAELens < 6 reads the flat keys (model_name, hook_name, activation_fn_str, ...);
- SAELens >= 6 reads d_in, d_sae, dtype, device, apply_b_dec_to_input,
  normalize_activations, reshape_activations, architecture, k and `metadata`.
  We write no `sae_lens_version`, so it converts the file through its
  pre-6 path, which handles these keys (k from activation_fn_kwargs for topk).
  Old loaders know no "topk" architecture: they load standard SAEs only.
The architecture is the one SAELens should run: "standard", "topk", "jumprelu",
"gated"; BatchTopK and Matryoshka SAEs are saved as "jumprelu" (their inference
form). What SAELens has no key for (our own architecture name, k of those,
l1/l0 coefficients, extra) lives under "sae_ray", and wins when we read it back.

Weights: `SAE.saved_tensors()`, SAELens names and shapes: W_enc [d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus `threshold` [d_sae]
(jumprelu, batchtopk, matryoshka) or b_gate, r_mag, b_mag [d_sae] in place of
b_enc (gated); stored on CPU. Only safetensors is read, never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_ray.sae import SAE, SAEConfig, create_sae

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
FORMAT_VERSION = 2


def to_saelens_cfg(cfg: SAEConfig, saved_as: str | None = None) -> dict[str, Any]:
    """The cfg.json dict for `cfg`; `saved_as`: the architecture SAELens should see,
    when not cfg.architecture (e.g. "jumprelu" for a batchtopk SAE)."""
    topk = cfg.architecture == "topk"
    provenance = {
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": cfg.hook_layer,
        "hook_head_index": None,
        "context_size": cfg.context_size,
        "dataset_path": cfg.dataset_path,
        "prepend_bos": bool(cfg.extra.get("prepend_bos", True)),
        "model_from_pretrained_kwargs": {},
    }
    out: dict[str, Any] = {
        "architecture": saved_as or cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if cfg.hook_name.endswith("hook_z") else "none",
        **provenance,
        "activation_fn_str": "topk" if topk else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if topk else {},
        "finetuning_scaling_factor": False,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "metadata": provenance,
        "sae_ray": {
            "format_version": FORMAT_VERSION,
            "architecture": cfg.architecture,
            "k": cfg.k,
            "l1_coefficient": cfg.l1_coefficient,
            "l0_coefficient": cfg.l0_coefficient,
            "extra": cfg.extra,
        },
    }
    if topk:
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    return out


def from_saelens_cfg(raw: dict[str, Any], source: str | Path = CFG_FILENAME) -> SAEConfig:
    """An SAEConfig from a cfg.json dict, ours or SAELens's (old flat or >= 6).
    `source` names the file in errors."""
    ours = raw.get("sae_ray") or {}
    meta = raw.get("metadata") or {}

    def get(key: str, default: Any = None, *old_names: str) -> Any:
        for name in (key, *old_names):
            for d in (raw, meta):
                if d.get(name) is not None:
                    return d[name]
        return default

    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise ValueError(f"{source}: missing required key {key!r}")
    apply_b_dec = get("apply_b_dec_to_input", True)
    if apply_b_dec is not True:
        raise ValueError(
            f"{source}: apply_b_dec_to_input={apply_b_dec!r} is not supported; "
            "sae_ray SAEs always subtract b_dec from the input (accepted: true)"
        )
    normalize = get("normalize_activations", "none")
    if normalize not in ("none", False):
        raise ValueError(
            f"{source}: normalize_activations={normalize!r} is not supported; "
            "fold the scaling into the weights first (accepted: 'none')"
        )

    activation_fn = get("activation_fn_str", "relu", "activation_fn")
    architecture = get("architecture", "standard")
    if architecture == "standard" and activation_fn == "topk":  # SAELens < 6 TopK
        architecture = "topk"
    k = get("k") or (get("activation_fn_kwargs") or {}).get("k")
    if architecture != "topk":
        k = None
    if ours.get("architecture"):  # ours (format 2): e.g. batchtopk saved as jumprelu
        architecture, k = ours["architecture"], ours.get("k")

    l1, l0 = ours.get("l1_coefficient"), ours.get("l0_coefficient")
    if not ours:  # someone else's file, for inference: the coefficient it was trained with, or 0
        l1 = get("l1_coefficient", 0.0) if architecture in ("standard", "gated") else None
        l0 = get("l0_coefficient", 0.0) if architecture == "jumprelu" else None

    extra = dict(ours.get("extra") or {})
    if not ours and get("prepend_bos") is False:
        extra["prepend_bos"] = False
    try:
        return SAEConfig(
            architecture=architecture,
            d_in=raw["d_in"],
            d_sae=raw["d_sae"],
            k=int(k) if k is not None else None,
            l1_coefficient=l1,
            l0_coefficient=l0,
            model_name=get("model_name", ""),
            hook_name=get("hook_name", "", "hook_point"),
            hook_layer=get("hook_layer", -1, "hook_point_layer"),
            context_size=get("context_size", 0),
            dataset_path=get("dataset_path", ""),
            dtype=get("dtype", "float32").removeprefix("torch."),
            extra=extra,
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def save_saelens(sae: SAE, path: str | Path) -> Path:
    """Write `path/sae_weights.safetensors` then `path/cfg.json` of a single SAE; returns `path`."""
    if sae.n_stack is not None:
        raise ValueError(
            f"save_saelens: this is a stack of {sae.n_stack} SAEs; save each one of sae.unstack() to its own directory"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.saved_tensors().items()}
    save_file(tensors, path / WEIGHTS_FILENAME)
    cfg = to_saelens_cfg(sae.cfg, saved_as=sae.saved_architecture)
    (path / CFG_FILENAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def load_saelens(path: str | Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    """Read a SAELens directory: (config, {name: CPU tensor})."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: not found; a SAELens SAE directory holds {CFG_FILENAME} and {WEIGHTS_FILENAME}"
            )
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
    return from_saelens_cfg(raw, source=cfg_path), load_file(weights_path)


def load_sae_dir(path: str | Path, device: str | torch.device = "cpu", sae_cls: type[SAE] = SAE) -> SAE:
    """Read a SAELens directory as the SAE its cfg.json names (our own architecture name, in its
    "sae_ray" section, when it has one), on `device`. `sae_cls`: the class it must be (or subclass)."""
    cfg, tensors = load_saelens(path)
    try:
        sae = create_sae(cfg)
        if not isinstance(sae, sae_cls):
            raise ValueError(
                f"architecture {cfg.architecture!r} is a {type(sae).__name__}, "
                f"not a {sae_cls.__name__}; load it with load_sae_dir(path)"
            )
    except ValueError as e:
        raise ValueError(f"{Path(path) / CFG_FILENAME}: {e}") from e
    try:
        sae.load_saved_tensors(tensors)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{Path(path) / WEIGHTS_FILENAME}: {e}") from e
    return sae.to(device)
