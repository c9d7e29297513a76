"""Checks that look at the world before any expensive work: model, hook points, data, buffer.

`preflight(cfg)` returns a `Plan` (hook names and widths, the grid of trials, the buffer
fingerprint) or raises `ConfigError` listing every problem it found. It loads only the
model's config and builds the model on the meta device (no weights, no compute).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from sae_ray.config import ConfigError, RunConfig, check_trials, expand_sweep


@dataclass
class Plan:
    hooks: dict[str, int]
    """hook name -> d_in."""
    hook_layers: dict[str, int]
    """hook name -> block index (-1 for a raw module path)."""
    trials: list[dict[str, Any]]
    """One dict per SAE: architecture, d_sae, expansion_factor, k or l1_coefficient, hook."""
    fingerprint: dict[str, Any]
    """What identifies the buffer's contents; a buffer with another fingerprint is not reused."""


def meta_model(name: str, revision: str | None, trust_remote_code: bool):
    """The model's architecture without weights (meta device): enough to resolve hooks and shapes."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from sae_ray.activations.model import is_causal_lm, resolve_model_path

    path = resolve_model_path(name)
    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return model.eval(), config, path


def _hook_widths(model, config, resolved) -> dict[str, int]:
    from sae_ray.activations.hooks import capture_activations

    try:
        ids = torch.zeros((1, 4), dtype=torch.long, device="meta")
        acts = capture_activations(model, resolved, ids, torch.ones_like(ids))
        return {name: int(a.shape[-1]) for name, a in acts.items()}
    except Exception:  # some models don't run on meta tensors: fall back to the residual width
        return {h.name: int(config.hidden_size) for h in resolved}


def preflight(cfg: RunConfig, check_data: bool = True, check_buffer: bool = True) -> Plan:
    from sae_ray.activations.hooks import resolve_hook

    problems: list[str] = []
    hooks: dict[str, int] = {}
    layers: dict[str, int] = {}
    fingerprint: dict[str, Any] = {}
    try:
        model, config, path = meta_model(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here is a problem with model.name
        problems.append(f"model.name: value {cfg.model.name!r}: could not load its config: {e}")
    else:
        resolved = []
        for i, h in enumerate(cfg.hooks):
            try:
                r = resolve_hook(model, h.layer, h.site, h.module)
                resolved.append(r)
                layers[r.name] = h.layer if h.layer is not None else -1
            except ValueError as e:
                problems.append(f"hooks[{i}]: value {h.model_dump(exclude_none=True)!r}: {e}")
        if resolved:
            hooks = _hook_widths(model, config, resolved)
        if hooks:
            problems += check_trials(cfg, min(hooks.values()))
        tok = getattr(config, "vocab_size", None)
        fingerprint = {
            "model": cfg.model.name,
            "revision": cfg.model.revision,
            "model_type": config.model_type,
            "vocab_size": tok,
            "hooks": sorted(hooks),
            "dataset": {k: getattr(cfg.data, k) for k in ("path", "name", "split", "text_column", "max_documents")},
            "context_size": cfg.data.context_size,
            "model_dtype": cfg.model.dtype,
            "dtype": cfg.buffer.dtype,
            "shard_rows": cfg.buffer.shard_rows,
        }

    if check_data:
        try:
            from sae_ray.activations.corpus import resolve_dataset_path
            from sae_ray.activations.text import load_documents

            d = cfg.data
            docs = load_documents(resolve_dataset_path(d.path, cfg.workdir_path()), d.text_column, d.split, d.name, streaming=d.streaming,
                                  trust_remote_code=cfg.model.trust_remote_code)
            if not list(itertools.islice(docs, 1)):
                problems.append(f"data.path: value {d.path!r}: the dataset (split {d.split!r}) holds no non-empty documents")
        except (ValueError, FileNotFoundError) as e:
            problems.append(f"data: {e}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"data.path: value {cfg.data.path!r}: could not be loaded: {e}")

    if check_buffer and fingerprint:
        problems += _buffer_problems(cfg.buffer_path(), fingerprint)

    if problems:
        raise ConfigError(problems, "preflight")
    trials = [
        {**t, "hook": hook, "hook_layer": layers[hook]}
        for hook, d_in in hooks.items()
        for t in expand_sweep(cfg.sae, d_in)
    ]
    return Plan(hooks=hooks, hook_layers=layers, trials=trials, fingerprint=fingerprint)


def _buffer_problems(path: str, fingerprint: dict) -> list[str]:
    """An existing buffer must have the same fingerprint; it is never modified here."""
    from pathlib import Path

    from sae_ray.buffer import ActivationBuffer

    p = Path(path)
    if not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return []
    try:
        existing = ActivationBuffer.open(path).fingerprint
    except Exception as e:  # noqa: BLE001
        return [f"buffer.path: value {path!r}: exists but is not a readable sae-ray buffer ({e}); choose another path"]
    existing = _jsonable(existing)
    if existing != _jsonable(fingerprint):
        diff = sorted(k for k in set(existing) | set(fingerprint) if existing.get(k) != _jsonable(fingerprint).get(k))
        shown = "; ".join(f"{k}: buffer has {existing.get(k)!r}, config wants {_jsonable(fingerprint).get(k)!r}" for k in diff)
        return [f"buffer.path: value {path!r}: holds a buffer with a different fingerprint ({shown}); "
                "nothing was changed: use another buffer.path or workdir"]
    return []


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))
