"""Gemma Scope (Google DeepMind): JumpReLU SAEs on Gemma 2, one `params.npz` each.

A release is a tree `layer_{L}/width_{W}/average_l0_{N}/params.npz` (Hugging Face repos
google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}); params.npz holds plain float32 arrays

    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], threshold [d_sae]

and the SAE computes

    pre   = x @ W_enc + b_enc                     (no b_dec subtracted from the input)
    f     = 1[pre > threshold] * ReLU(pre)
    x_hat = f @ W_dec + b_dec

`load_gemmascope` reads it as a JumpReLUSAE, folding the missing input centring into the
encoder bias (b_enc += b_dec @ W_enc, in float64; exact in real arithmetic, so a latent
within rounding of its threshold may flip). The layer, width and average L0 come from the
path's names (the width must agree with d_sae), the hook from the user's arguments or, when
the path names the release (e.g. a Hugging Face cache path `...gemma-scope-2b-pt-res...`),
from its kind: res -> blocks.L.hook_resid_post, mlp -> blocks.L.hook_mlp_out,
att -> blocks.L.attn.hook_z. Nothing known: hook_name "" (unknown). The file is read with
`np.load(..., allow_pickle=False)` and must hold plain float arrays (`files.read_npz`).
Embedding SAEs (`embedding/...`) read Gemma's scaled embeddings; give their hook_name yourself.

Transcoders (google/gemma-scope-2b-pt-transcoders: JumpReLU, reading the MLP's normalised input
and reconstructing its output) use the same file, tree and math, with W_dec [d_sae, d_out] and
b_dec [d_out] in the output space; an optional `affine_skip_connection` [d_in, d_out] (Gemma
Scope 2's name; x_hat += x @ it) is a skip connection, our W_skip its transpose. One is read as
a JumpReLU transcoder (SAEConfig.d_out = W_dec's width) when the path names a transcoders
release, when hook_name_out is given, when W_dec's width differs from d_in, or when it has a
skip connection; nothing is folded (our transcoders do not centre their input either). Its hooks
default, as SAELens names them, to blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out.
(A transcoder read as an SAE would compute the same function: only its target differs.)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from sae_ray.formats.files import SAEFileError, check_tensors, dtype_name, read_npz
from sae_ray.sae import SAE, SAEConfig, create_sae

PARAMS_FILENAME = "params.npz"
KIND_SITES = {"res": "resid_post", "mlp": "mlp_out"}
"""Release kind -> our hook site (att SAEs read hook_z, the per-head outputs before o_proj)."""
SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
"""The sites `site=` takes (`sae_ray.activations.hooks.SITES`, not imported: it loads transformers)."""

_RELEASE = re.compile(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att|transcoders)")
_LAYER = re.compile(r"^layer_(\d+)$")
_WIDTH = re.compile(r"^width_(\d+)([km])$")
_L0 = re.compile(r"^average_l0_(\d+)$")


def parse_gemmascope_path(path: str | Path) -> dict:
    """What a Gemma Scope path's names say: {"layer", "width", "average_l0", "model_name",
    "kind"} (those found; width as its label, e.g. "16k")."""
    out: dict = {}
    for part in Path(path).parts:
        if m := _LAYER.match(part):
            out["layer"] = int(m.group(1))
        elif m := _WIDTH.match(part):
            out["width"] = m.group(1) + m.group(2)
        elif m := _L0.match(part):
            out["average_l0"] = int(m.group(1))
        if m := _RELEASE.search(part):
            size, variant, kind = m.groups()
            out["model_name"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
            out["kind"] = kind
    return out


def _width_matches(label: str, d_sae: int) -> bool:
    """Whether a width label ("16k" for 16384, "65k" for 65536, "1m" for 1048576) names d_sae."""
    n, unit = int(label[:-1]), label[-1]
    return d_sae // (1000 if unit == "k" else 1_000_000) == n


def load_gemmascope(path: str | Path, *, hook_name: str | None = None, site: str | None = None,
                    layer: int | None = None, model_name: str | None = None,
                    hook_name_out: str | None = None, device: str | torch.device = "cpu") -> SAE:
    """A Gemma Scope params.npz (or the directory holding it) as a JumpReLUSAE on `device`
    (a transcoder when the module docstring says so).

    hook_name: the hook, e.g. "blocks.12.hook_resid_post"; else site ("resid_post",
    "mlp_out", ...) with the layer (from `layer` or the path's layer_L); else the release
    kind in the path. hook_name_out: a transcoder's output hook (giving it makes a transcoder);
    default blocks.L.hook_mlp_out. model_name: default from the release name in the path, else "".
    Shapes: d_in and d_sae from W_enc [d_in, d_sae], d_out from W_dec [d_sae, d_out]; every other
    array is checked against them.
    """
    if site is not None and site not in SITES:
        raise ValueError(f"load_gemmascope: site={site!r}; accepted: {', '.join(SITES)} (or give hook_name)")
    path = Path(path)
    file = path / PARAMS_FILENAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found; a Gemma Scope SAE is a {PARAMS_FILENAME}")
    arrays = read_npz(file)
    arrays = {("W_" + n[2:] if n.startswith("w_") else n): a for n, a in arrays.items()}  # some copies say w_enc
    if "W_enc" not in arrays or np.ndim(arrays["W_enc"]) != 2:
        got = list(np.shape(arrays["W_enc"])) if "W_enc" in arrays else "none"
        raise SAEFileError(f"{file}: array 'W_enc' [d_in, d_sae] is needed to size the SAE; found {got}")
    d_in, d_sae = arrays["W_enc"].shape
    named = parse_gemmascope_path(file.resolve().parent)
    d_out = arrays["W_dec"].shape[-1] if np.ndim(arrays.get("W_dec")) == 2 else d_in
    skip = "affine_skip_connection" in arrays
    transcoder = named.get("kind") == "transcoders" or hook_name_out is not None or d_out != d_in or skip
    tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()}
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
              "threshold": (d_sae,)}
    if skip:
        shapes["affine_skip_connection"] = (d_in, d_out)
    check_tensors(file, tensors, shapes)

    if "width" in named and not _width_matches(named["width"], d_sae):
        raise SAEFileError(
            f"{file}: the path says width_{named['width']}, but W_enc has d_sae={d_sae}; "
            "expected a width label that names d_sae (e.g. width_16k for 16384)"
        )
    layer = layer if layer is not None else named.get("layer", -1)
    if hook_name is None and site is not None and layer < 0:
        raise ValueError(f"load_gemmascope: site={site!r} needs a layer, and {file} names none (no layer_L); give layer=")
    if hook_name is None:
        kind = named.get("kind")
        if site is None and kind in KIND_SITES:
            site = KIND_SITES[kind]
        if site is not None and layer >= 0:
            hook_name = f"blocks.{layer}.hook_{site}"
        elif kind == "att" and layer >= 0:
            hook_name = f"blocks.{layer}.attn.hook_z"
        elif transcoder and layer >= 0:
            hook_name = f"blocks.{layer}.ln2.hook_normalized"  # SAELens's name of the MLP's normalised input
        else:
            hook_name = ""
    extra = {"source": "gemma-scope"}
    if "average_l0" in named:
        extra["average_l0"] = named["average_l0"]
    if transcoder and hook_name_out is None:
        hook_name_out = f"blocks.{layer}.hook_mlp_out" if layer >= 0 else ""
    cfg = SAEConfig("jumprelu", d_in=d_in, d_sae=d_sae, l0_coefficient=0.0,
                    d_out=d_out if transcoder else None, skip=skip,
                    model_name=model_name if model_name is not None else named.get("model_name", ""),
                    hook_name=hook_name, hook_layer=layer, hook_name_out=hook_name_out or "",
                    hook_layer_out=layer if transcoder else -1, dtype=dtype_name(tensors["W_enc"].dtype),
                    extra=extra)

    if skip:
        tensors["W_skip"] = tensors.pop("affine_skip_connection").T.contiguous()  # x @ A = x @ W_skip^T
    if not transcoder:  # Gemma Scope does not centre x on b_dec; our SAEs do, our transcoders do not
        b_enc = tensors["b_enc"].double() + tensors["b_dec"].double() @ tensors["W_enc"].double()
        tensors["b_enc"] = b_enc.to(tensors["b_enc"].dtype)
    sae = create_sae(cfg)
    sae.load_saved_tensors(tensors)
    return sae.to(device)
