"""EleutherAI sparsify: TopK SAEs, one directory per hookpoint with `cfg.json` and `sae.safetensors`.

A sparsify run writes `<run>/config.json` (the run's config: model, dataset, ctx_len, ...) and
one `<run>/<hookpoint>/` per hooked module, e.g. `layers.6` (a block's output) or
`layers.6.mlp`. Each holds

    cfg.json          {"activation": "topk", "expansion_factor": 32, "normalize_decoder": true,
                       "num_latents": 0, "k": 32, "multi_topk": false, "skip_connection": false,
                       "transcode": false, "d_in": 768}     (num_latents 0: d_in * expansion_factor)
    sae.safetensors   encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

and the SAE computes

    pre   = ReLU((x - b_dec) @ encoder.weight^T + encoder.bias)
    f     = the k largest entries of pre per row, zeros elsewhere
    x_hat = f @ W_dec + b_dec

which is our TopKSAE with W_enc = encoder.weight^T, b_enc = encoder.bias: no folding.
`load_sparsify` reads one; activation "groupmax", skip_connection and transcode (other
computations) are refused by name. `save_sparsify` writes a TopKSAE; cfg.json also keeps our
config under "sae_ray" (sparsify drops unknown keys), which wins when we read it back.
The hook comes from the directory name (layers.L -> blocks.L.hook_resid_post, layers.L.mlp ->
blocks.L.hook_mlp_out, layers.L.self_attn / .attn / .attention -> blocks.L.hook_attn_out;
anything else is kept as a module path) unless `hook_name` is given; model, dataset and
context size from the run's config.json when there is one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae_ray.formats.files import SAEFileError, check_tensors, dtype_name, read_json, read_safetensors
from sae_ray.sae import SAE, SAEConfig, create_sae

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
RUN_CFG_FILENAME = "config.json"

_HOOKPOINT = re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)(?:\.(\w+))?$")
_SUBMODULE_SITES = {"mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out", "attention": "attn_out"}


def hook_from_hookpoint(name: str) -> tuple[str, int]:
    """A sparsify hookpoint (its directory name) -> (our hook name, layer or -1)."""
    m = _HOOKPOINT.match(name)
    if not m:
        return name, -1
    layer, sub = int(m.group(1)), m.group(2)
    if sub is None:
        return f"blocks.{layer}.hook_resid_post", layer
    if sub in _SUBMODULE_SITES:
        return f"blocks.{layer}.hook_{_SUBMODULE_SITES[sub]}", layer
    return name, layer


def _check(cfg: dict[str, Any], key: str, ok: bool, accepted: str, source: Path) -> None:
    if not ok:
        raise SAEFileError(f"{source}: {key}={cfg.get(key)!r} is not supported; accepted: {accepted}")


def load_sparsify(path: str | Path, *, hook_name: str | None = None, model_name: str | None = None,
                  device: str | torch.device = "cpu") -> SAE:
    """A sparsify hookpoint directory (cfg.json + sae.safetensors) as a TopKSAE on `device`.
    hook_name, model_name: override what the directory and the run's config.json say."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found; a sparsify SAE directory holds {CFG_FILENAME} and {WEIGHTS_FILENAME}")
    raw = read_json(cfg_path)
    tensors = read_safetensors(weights_path)

    _check(raw, "activation", raw.get("activation", "topk") == "topk", "'topk'", cfg_path)
    for key in ("skip_connection", "transcode"):
        _check(raw, key, raw.get(key, False) is False, "false", cfg_path)
    d_in, k = raw.get("d_in"), raw.get("k", 32)
    for key, value in (("d_in", d_in), ("k", k)):
        _check(raw, key, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an integer >= 1", cfg_path)
    num_latents, expansion = raw.get("num_latents", 0), raw.get("expansion_factor", 32)
    for key, value in (("num_latents", num_latents), ("expansion_factor", expansion)):
        _check(raw, key, isinstance(value, int) and not isinstance(value, bool) and value >= 0, "an integer >= 0", cfg_path)
    d_sae = num_latents or d_in * expansion
    check_tensors(weights_path, tensors, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                          "W_dec": (d_sae, d_in), "b_dec": (d_in,)})

    ours = raw.get("sae_ray")
    if isinstance(ours, dict) and ours.get("config"):  # written by save_sparsify: our config wins
        try:
            cfg = SAEConfig(**ours["config"])
        except (TypeError, ValueError) as e:
            raise SAEFileError(f"{cfg_path}: sae_ray.config: {e}") from e
        if (cfg.architecture, cfg.d_in, cfg.d_sae, cfg.k) != ("topk", d_in, d_sae, k):
            raise SAEFileError(
                f"{cfg_path}: sae_ray.config says {cfg.architecture} d_in={cfg.d_in} d_sae={cfg.d_sae} "
                f"k={cfg.k}, the sparsify keys say topk d_in={d_in} d_sae={d_sae} k={k}; expected the same SAE"
            )
    else:
        run = read_json(path.parent / RUN_CFG_FILENAME) if (path.parent / RUN_CFG_FILENAME).is_file() else {}
        hook, layer = hook_from_hookpoint(path.name)
        cfg = SAEConfig(
            "topk", d_in=d_in, d_sae=d_sae, k=k,
            model_name=run.get("model", "") if isinstance(run.get("model"), str) else "",
            hook_name=hook, hook_layer=layer,
            context_size=run.get("ctx_len", 0) if isinstance(run.get("ctx_len"), int) else 0,
            dataset_path=run.get("dataset", "") if isinstance(run.get("dataset"), str) else "",
            dtype=dtype_name(tensors["encoder.weight"].dtype),
            extra={"source": "sparsify", "sparsify_hookpoint": path.name},
        )
    if hook_name is not None:
        cfg.hook_name = hook_name
    if model_name is not None:
        cfg.model_name = model_name
    try:
        sae = create_sae(cfg)
    except ValueError as e:
        raise SAEFileError(f"{cfg_path}: {e}") from e
    sae.load_saved_tensors({"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"],
                            "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]})
    return sae.to(device)


def save_sparsify(sae: SAE, path: str | Path) -> Path:
    """Write a single TopK SAE as `path/sae.safetensors` (encoder.weight [d_sae, d_in],
    encoder.bias [d_sae], W_dec [d_sae, d_in], b_dec [d_in]) then `path/cfg.json`; returns `path`.
    Name `path` after the hookpoint (e.g. run/layers.6) for sparsify's load_many."""
    if sae.n_stack is not None:
        raise ValueError(f"save_sparsify: this is a stack of {sae.n_stack} SAEs; save each one of sae.unstack()")
    if sae.cfg.is_transcoder:
        raise ValueError(
            f"save_sparsify: this is a transcoder (SAEConfig.d_out={sae.cfg.d_out}); sae-ray writes sparsify "
            "files of SAEs only (accepted: d_out None); save it with save_saelens"
        )
    if sae.cfg.architecture != "topk":
        raise ValueError(
            f"save_sparsify: a {sae.cfg.architecture} SAE has no sparsify form; sparsify runs per-row "
            "TopK only (accepted: architecture 'topk')"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    t = {n: v.detach().cpu() for n, v in sae.saved_tensors().items()}
    save_file({"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"].contiguous(),
               "W_dec": t["W_dec"].contiguous(), "b_dec": t["b_dec"].contiguous()}, path / WEIGHTS_FILENAME)
    cfg = sae.cfg
    raw = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
        "normalize_decoder": True,
        "num_latents": cfg.d_sae,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.d_in,
        "sae_ray": {"config": dataclasses.asdict(cfg)},
    }
    (path / CFG_FILENAME).write_text(json.dumps(raw, indent=2) + "\n")
    return path
