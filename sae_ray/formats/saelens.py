"""SAELens on-disk format: a directory with `cfg.json` and `sae_weights.safetensors`.

`save_saelens(sae, path)` writes one; `load_sae_dir(path)` reads one back as the SAE it
holds; `load_saelens(path)` gives the (config, tensors) it is built from.

Writing. cfg.json is a superset that both SAELens loaders read:
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

Transcoders (SAEConfig.d_out set) are written in SAELens's transcoder layout (sae_lens/saes/
transcoder.py, 6.x): architecture "transcoder" (standard), "jumprelu_transcoder" (jumprelu,
batchtopk, matryoshka), with a skip connection "skip_transcoder", "jumprelu_skip_transcoder";
d_out at the top level, hook_name_out and hook_head_index_out at the top level and in
`metadata` (SAELens's LLM metadata keys), hook_layer_out at the top level (SAELens's earlier
TranscoderConfig field), apply_b_dec_to_input false (SAELens refuses true for a transcoder: its
b_dec is output-space; ours does not centre the input either). SAELens has no TopK or Gated
transcoder: those are written as "topk_transcoder", "gated_transcoder" (and "..._skip_..."),
names SAELens refuses rather than load wrong; "sae_ray" holds ours, as for every file.

Weights: `SAE.saved_tensors()`, SAELens names and shapes: W_enc [d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out] (d_out = d_in for an SAE), plus `threshold`
[d_sae] (jumprelu, batchtopk, matryoshka) or b_gate, r_mag, b_mag [d_sae] in place of
b_enc (gated), and W_skip [d_out, d_in] (skip transcoders: x_hat += x @ W_skip^T); stored on CPU.

Reading: our files, SAELens 6.x files (its inference saves and its training checkpoints)
and SAELens < 6 files. Every cfg.json field that changes what the SAE computes is honoured,
by folding it into the weights (in float64, then rounded to the file's dtype), or refused
with an error that names the field and its value:

- architecture: "standard", "topk", "jumprelu", "gated", and SAELens training checkpoints of
  "batchtopk" and "matryoshka_batchtopk" (a BatchTopKSAE / MatryoshkaSAE; the checkpoint's
  scalar `topk_threshold` is its θ; k must be a whole number); transcoders "transcoder",
  "skip_transcoder" (standard), "jumprelu_transcoder", "jumprelu_skip_transcoder" (jumprelu),
  which need d_out. Anything else is refused.
- activation_fn (SAELens < 6, also "activation_fn_str"): "relu", or "topk" with
  activation_fn_kwargs.k.
- rescale_acts_by_decoder_norm (topk, batchtopk, matryoshka; SAELens's TopK training default):
  SAELens encodes pre_i = (x' @ W_enc + b_enc)_i * ||W_dec_i|| and decodes with
  f_i / ||W_dec_i||. Folded: W_enc[:, i] *= n_i, b_enc_i *= n_i, W_dec_i /= n_i (as SAELens
  itself does when it saves an inference SAE); θ acts on the rescaled pre, so it stays.
  Other architectures have no such field in SAELens, which ignores it; so do we.
- apply_b_dec_to_input false: SAELens encodes x @ W_enc + b_enc. Folded: b_enc += b_dec @ W_enc
  (gated: b_gate += b_dec @ W_enc, b_mag += (b_dec @ W_enc) * exp(r_mag)). A transcoder: false
  (the default), nothing to fold (ours encodes x @ W_enc + b_enc too); true is refused.
- normalize_activations: "none"; "expected_average_only_in" (a pre-6 `true`): the SAE was
  trained on x * s, s = sqrt(d_in) / E||x||; s comes from the `scaling_factor` argument or the
  checkpoint's activation_scaler.json and is folded as `SAE.fold_input_scale(s)`, so the loaded
  SAE takes raw x (its encode(x) is SAELens's encode(x * s)); without s the file is refused.
  "covariance_whitening" (SAELens >= 6.5x): trained on z = (x - mean) @ M, decoded back as
  z_hat @ M^-1 + mean; mean, M, M^-1 come from the checkpoint's
  activation_whitening.safetensors and are folded (W_enc <- M @ W_enc, W_dec <- W_dec @ M^-1,
  b_dec <- b_dec @ M^-1 + mean); without that file the SAE is refused.
  "constant_norm_rescale" (x * sqrt(d_in) / ||x|| per row) and "layer_norm" (per-row mean and
  std) depend on each input row, which no weights can hold: refused. A transcoder: "none" only
  (SAELens normalizes a transcoder's input and not its output).
- finetuning_scaling_factor (SAELens < 6) with a `scaling_factor` [d_sae] tensor: decode used
  f * s. Folded: W_dec_i *= s_i. A tensor of ones is dropped, as SAELens does.
- reshape_activations: "none" or "hook_z" (inputs here are already flat [B, d_in]).
- dtype: the parameters' dtype.

Folding is exact in real arithmetic; in floating point the pre-activations move by a few
units in the last place, so a latent that close to its threshold (or to the k-th largest)
may come out differently. Only safetensors and JSON are read, never pickle
(`sae_ray.formats.files`): a checkpoint's trainer_state.pt is left alone.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from sae_ray.formats.files import SAEFileError, check_tensors, read_json, read_safetensors
from sae_ray.sae import ARCHITECTURES, SAE, SAEConfig, create_sae

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SCALER_FILENAME = "activation_scaler.json"
"""SAELens training checkpoints keep the input scale factor s here: {"scaling_factor": s}."""
WHITENING_FILENAME = "activation_whitening.safetensors"
"""... and the whitening of "covariance_whitening" here: mean [d_in], matrix and inverse_matrix [d_in, d_in]."""
FORMAT_VERSION = 2

SAELENS_ARCHITECTURES = {
    "standard": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "batchtopk": "batchtopk",
    "matryoshka_batchtopk": "matryoshka",
}
"""SAELens architecture name -> ours."""

TRANSCODER_BASES = {"standard": "", "jumprelu": "jumprelu_"}
"""The architectures SAELens has a transcoder of -> the prefix of its name ("transcoder",
"jumprelu_transcoder"; with a skip connection "skip_transcoder", "jumprelu_skip_transcoder")."""

TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
"""Our architectures that SAELens runs with `k` and `rescale_acts_by_decoder_norm`."""

NORMALIZE_MODES = ("none", "expected_average_only_in", "covariance_whitening", "constant_norm_rescale", "layer_norm")
"""SAELens's normalize_activations values; the first three are supported (folded)."""

TRAINING_KNOBS = {
    "aux_loss_coefficient": "auxk_coefficient",
    "topk_threshold_lr": "topk_threshold_lr",
    "jumprelu_bandwidth": "bandwidth",
}
"""SAELens training fields -> the cfg.extra knob of ours with the same meaning (kept where the
architecture reads that knob). SAELens's AuxK decodes with b_dec, ours without: same weight,
a slightly different term."""


def transcoder_name(runs_as: str, skip: bool) -> str:
    """SAELens's architecture name for a transcoder that runs as `runs_as` ("standard" ->
    "transcoder", "jumprelu" -> "jumprelu_transcoder"; others "<arch>_transcoder", which SAELens
    does not have), with "skip_" before "transcoder" for a skip connection."""
    prefix = TRANSCODER_BASES.get(runs_as, f"{runs_as}_")
    return f"{prefix}{'skip_' if skip else ''}transcoder"


def parse_transcoder_name(name: str) -> tuple[str, bool] | None:
    """Inverse of `transcoder_name`: (the architecture it runs as, skip), or None for a name
    that is not a transcoder's."""
    if not name.endswith("transcoder"):
        return None
    stem = name.removesuffix("transcoder")  # "", "skip_", "jumprelu_", "jumprelu_skip_", ...
    skip = stem.endswith("skip_")
    stem = stem.removesuffix("skip_").removesuffix("_")
    return (stem or "standard"), skip


def to_saelens_cfg(cfg: SAEConfig, saved_as: str | None = None) -> dict[str, Any]:
    """The cfg.json dict for `cfg`; `saved_as`: the architecture SAELens should see,
    when not cfg.architecture (e.g. "jumprelu" for a batchtopk SAE). A transcoder gets its
    SAELens transcoder name (`transcoder_name`) and fields (module docstring)."""
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
    architecture = saved_as or cfg.architecture
    if cfg.is_transcoder:
        provenance.update(hook_name_out=cfg.hook_name_out, hook_head_index_out=None)
        architecture = transcoder_name(architecture, cfg.skip)
    out: dict[str, Any] = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        **({"d_out": cfg.d_out, "hook_layer_out": cfg.hook_layer_out} if cfg.is_transcoder else {}),
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": not cfg.is_transcoder,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if cfg.hook_name.endswith("hook_z") else "none",
        **provenance,
        "activation_fn_str": "topk" if topk else "relu",
        # no k here for a transcoder: SAELens's pre-6 path would then make the file a "topk" SAE
        "activation_fn_kwargs": {"k": cfg.k} if topk and not cfg.is_transcoder else {},
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


@dataclass
class SAELensMath:
    """The cfg.json fields that change the math, as read from one file."""

    apply_b_dec_to_input: bool
    """False: the encoder sees x, not x - b_dec."""
    rescale_acts_by_decoder_norm: bool
    """True (TopK family only): pre-activations scaled by decoder row norms."""
    normalize_activations: str
    """"none", "expected_average_only_in" or "covariance_whitening"."""
    finetuning_scaling_factor: bool
    """SAELens < 6: decode multiplies f by a `scaling_factor` tensor."""
    transcoder: bool = False
    """A transcoder (a SAELens "...transcoder" architecture): b_dec is output-space, never
    subtracted from the input, so apply_b_dec_to_input has nothing to fold."""


def _getter(raw: dict[str, Any]):
    """get(key, default, *old_names): the first non-null value of key (or an old name) in the
    top level of cfg.json or in its `metadata`."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}

    def get(key: str, default: Any = None, *old_names: str) -> Any:
        for name in (key, *old_names):
            for d in (raw, meta):
                if d.get(name) is not None:
                    return d[name]
        return default

    return get


def saelens_math(raw: dict[str, Any], architecture: str, source: str | Path = CFG_FILENAME) -> SAELensMath:
    """The math-changing fields of a cfg.json dict, checked; `architecture` is ours.
    SAEFileError naming the field, its value and what is accepted for the rest."""
    get = _getter(raw)
    transcoder = parse_transcoder_name(str(get("architecture", ""))) is not None
    apply_b_dec = get("apply_b_dec_to_input", not transcoder)
    if not isinstance(apply_b_dec, bool):
        raise SAEFileError(f"{source}: apply_b_dec_to_input={apply_b_dec!r}; accepted: true or false")
    if transcoder and apply_b_dec:
        raise SAEFileError(
            f"{source}: apply_b_dec_to_input=true on a transcoder ({get('architecture')!r}), whose b_dec "
            "[d_out] is output-space and cannot centre its input; accepted: false (as SAELens requires)"
        )
    rescale = get("rescale_acts_by_decoder_norm", False)
    if not isinstance(rescale, bool):
        raise SAEFileError(f"{source}: rescale_acts_by_decoder_norm={rescale!r}; accepted: true or false")
    normalize = get("normalize_activations", "none")
    if normalize is False:
        normalize = "none"
    elif normalize is True:  # SAELens < 6
        normalize = "expected_average_only_in"
    if transcoder and normalize != "none":
        raise SAEFileError(
            f"{source}: normalize_activations={normalize!r} on a transcoder is not supported (SAELens "
            "normalizes a transcoder's input and not its output); accepted: 'none'"
        )
    if normalize not in NORMALIZE_MODES[:3]:
        why = (" (it rescales each input row by its own statistics, which no weights can hold)"
               if normalize in NORMALIZE_MODES else "")
        raise SAEFileError(
            f"{source}: normalize_activations={normalize!r} is not supported{why}; "
            "accepted: 'none', 'expected_average_only_in', 'covariance_whitening'"
        )
    reshape = get("reshape_activations", "none")
    if reshape not in ("none", "hook_z"):
        raise SAEFileError(f"{source}: reshape_activations={reshape!r}; accepted: 'none', 'hook_z'")
    finetuning = get("finetuning_scaling_factor", False)
    if not isinstance(finetuning, bool):
        raise SAEFileError(f"{source}: finetuning_scaling_factor={finetuning!r}; accepted: true or false")
    return SAELensMath(apply_b_dec, rescale and architecture in TOPK_FAMILY, normalize, finetuning, transcoder)


def _architecture(raw: dict[str, Any], source: str | Path) -> str:
    """Our architecture name for a cfg.json dict (ours from its "sae_ray" section)."""
    ours = raw.get("sae_ray") or {}
    if ours.get("architecture"):
        if ours["architecture"] not in ARCHITECTURES:
            raise SAEFileError(
                f"{source}: sae_ray.architecture={ours['architecture']!r} is not an architecture of this "
                f"sae-ray; accepted: {', '.join(map(repr, sorted(ARCHITECTURES)))}"
            )
        return ours["architecture"]
    get = _getter(raw)
    name = get("architecture", "standard")
    transcoder = parse_transcoder_name(str(name))
    if transcoder is not None:
        if transcoder[0] not in TRANSCODER_BASES:
            raise SAEFileError(
                f"{source}: architecture={name!r} is not supported; accepted transcoders: "
                f"{', '.join(repr(transcoder_name(a, s)) for a in TRANSCODER_BASES for s in (False, True))}"
            )
        return transcoder[0]
    activation = get("activation_fn", None, "activation_fn_str")
    if activation is not None and activation not in ("relu", "topk"):
        raise SAEFileError(f"{source}: activation_fn={activation!r} is not supported; accepted: 'relu', 'topk'")
    if name == "standard" and activation == "topk":  # SAELens < 6 TopK
        return "topk"
    if name not in SAELENS_ARCHITECTURES:
        raise SAEFileError(
            f"{source}: architecture={name!r} is not supported; accepted: "
            f"{', '.join(map(repr, SAELENS_ARCHITECTURES))}, and the transcoders "
            f"{', '.join(repr(transcoder_name(a, s)) for a in TRANSCODER_BASES for s in (False, True))}"
        )
    return SAELENS_ARCHITECTURES[name]


def _whole(k: Any, source: str | Path) -> int | None:
    """k as an int (SAELens's BatchTopK writes it as a float such as 32.0); None stays None."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not float(k).is_integer() or k < 1:
        raise SAEFileError(f"{source}: k={k!r}; accepted: a whole number >= 1")
    return int(k)


def from_saelens_cfg(raw: dict[str, Any], source: str | Path = CFG_FILENAME) -> SAEConfig:
    """An SAEConfig from a cfg.json dict, ours or SAELens's (old flat or >= 6); also checks
    the math-changing fields (`saelens_math`). `source` names the file in errors."""
    ours = raw.get("sae_ray") or {}
    get = _getter(raw)
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise SAEFileError(f"{source}: missing required key {key!r}")
    architecture = _architecture(raw, source)
    math = saelens_math(raw, architecture, source)
    skip = False
    if math.transcoder:
        skip = parse_transcoder_name(str(get("architecture")))[1]
        if "d_out" not in raw:
            raise SAEFileError(
                f"{source}: missing required key 'd_out' (architecture {get('architecture')!r} is a transcoder)"
            )

    k = None
    if architecture in TOPK_FAMILY:
        k = ours.get("k") if ours.get("architecture") else get("k") or (get("activation_fn_kwargs") or {}).get("k")
        k = _whole(k, source)

    l1, l0 = ours.get("l1_coefficient"), ours.get("l0_coefficient")
    if not ours:  # someone else's file, for inference: the coefficient it was trained with, or 0
        l1 = get("l1_coefficient", 0.0) if architecture in ("standard", "gated") else None
        l0 = get("l0_coefficient", 0.0) if architecture == "jumprelu" else None

    extra = dict(ours.get("extra") or {})
    if not ours:
        if get("prepend_bos") is False:
            extra["prepend_bos"] = False
        knobs = ARCHITECTURES[architecture].knobs
        for theirs, mine in TRAINING_KNOBS.items():
            if mine in knobs and get(theirs) is not None:
                extra[mine] = get(theirs)
        if architecture == "matryoshka" and get("matryoshka_widths"):
            extra["matryoshka_prefixes"] = list(get("matryoshka_widths"))
        for key in ("hook_head_index", "hook_head_index_out"):  # provenance: which head of hook_z
            if get(key) is not None:
                extra[key] = get(key)
    try:
        return SAEConfig(
            architecture=architecture,
            d_in=raw["d_in"],
            d_sae=raw["d_sae"],
            d_out=raw["d_out"] if math.transcoder else None,
            skip=skip,
            k=k,
            l1_coefficient=l1,
            l0_coefficient=l0,
            model_name=get("model_name", ""),
            hook_name=get("hook_name", "", "hook_point"),
            hook_layer=get("hook_layer", -1, "hook_point_layer"),
            hook_name_out=get("hook_name_out", "") if math.transcoder else "",
            hook_layer_out=get("hook_layer_out", -1) if math.transcoder else -1,
            context_size=get("context_size", 0),
            dataset_path=get("dataset_path", ""),
            dtype=str(get("dtype", "float32")).removeprefix("torch."),
            extra=extra,
        )
    except ValueError as e:
        raise SAEFileError(f"{source}: {e}") from e


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


def _saelens_tensors(tensors: dict[str, Tensor], cfg: SAEConfig, math: SAELensMath,
                     source: Path) -> dict[str, Tensor]:
    """A weights file's tensors, checked (names, shapes), in the names our SAE loads
    (`SAE.load_saved_tensors`): threshold from log_threshold or a scalar topk_threshold,
    a finetuning `scaling_factor` [d_sae] folded into W_dec."""
    d_in, d_sae, d_out, arch = cfg.d_in, cfg.d_sae, cfg.d_target, cfg.architecture
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out),
                                          "b_dec": (d_out,)}
    if cfg.skip:
        shapes["W_skip"] = (d_out, d_in)
    if arch == "gated":
        del shapes["b_enc"]
        shapes.update(b_gate=(d_sae,), b_mag=(d_sae,), r_mag=(d_sae,))
    elif arch == "jumprelu":
        shapes["log_threshold" if "log_threshold" in tensors else "threshold"] = (d_sae,)
    elif arch in ("batchtopk", "matryoshka"):
        if "topk_threshold" in tensors:  # a SAELens training checkpoint: one scalar θ
            shapes["topk_threshold"] = ()
        else:
            shapes["threshold"] = (d_sae,)
    if "scaling_factor" in tensors:
        shapes["scaling_factor"] = (d_sae,)
    check_tensors(source, tensors, shapes)

    out = dict(tensors)
    if "log_threshold" in out:
        out["threshold"] = out.pop("log_threshold").exp()
    if "topk_threshold" in out:
        out["threshold"] = torch.full_like(out["b_enc"], float(out.pop("topk_threshold")))
    if "scaling_factor" in out:
        s = out.pop("scaling_factor")
        if not torch.allclose(s, torch.ones_like(s)):
            if not math.finetuning_scaling_factor:
                raise SAEFileError(
                    f"{source}: tensor 'scaling_factor' is not all ones, but cfg.json's "
                    "finetuning_scaling_factor is not true; accepted: a scaling_factor of ones, "
                    "or finetuning_scaling_factor: true"
                )
            out["W_dec"] = (out["W_dec"].double() * s.double().unsqueeze(-1)).to(out["W_dec"].dtype)
    return out


def fold_saelens(tensors: dict[str, Tensor], architecture: str, math: SAELensMath,
                 input_scale: float | None = None, whitening: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """SAELens's math folded into our SAE's weights (see the module docstring), in float64,
    each tensor rounded back to its dtype. tensors: our saved names (W_enc [d_in, d_sae],
    b_enc or b_gate / b_mag / r_mag [d_sae], W_dec [d_sae, d_out], b_dec [d_out], threshold
    [d_sae], W_skip [d_out, d_in]); input_scale: s of "expected_average_only_in", or None;
    whitening: mean [d_in], matrix and inverse_matrix [d_in, d_in] of "covariance_whitening", or None.
    Order: decoder norms, then b_dec, in the space the SAE was trained in; then the input
    transform SAELens applied (x * s, then whitening) is undone, innermost first."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    t = {name: v.double() for name, v in tensors.items()}
    if math.rescale_acts_by_decoder_norm:
        n = t["W_dec"].norm(dim=-1)  # [d_sae]
        t["W_enc"] = t["W_enc"] * n
        t["b_enc"] = t["b_enc"] * n
        t["W_dec"] = t["W_dec"] / torch.where(n > 0, n, 1).unsqueeze(-1)  # a zero row stays zero
    if not math.apply_b_dec_to_input and not math.transcoder:
        shift = t["b_dec"] @ t["W_enc"]  # [d_sae]
        if architecture == "gated":
            t["b_gate"] = t["b_gate"] + shift
            t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
        else:
            t["b_enc"] = t["b_enc"] + shift
    if whitening is not None:  # trained on z = (x - mean) @ M; b_enc stays (b_dec takes the mean)
        mean, M, M_inv = (whitening[n].double() for n in ("mean", "matrix", "inverse_matrix"))
        t["W_enc"] = M @ t["W_enc"]
        t["W_dec"] = t["W_dec"] @ M_inv
        t["b_dec"] = t["b_dec"] @ M_inv + mean
    if input_scale is not None:  # as SAE.fold_input_scale
        t["W_enc"] = t["W_enc"] * input_scale
        t["W_dec"] = t["W_dec"] / input_scale
        t["b_dec"] = t["b_dec"] / input_scale
    return {name: v.to(dtypes[name]) for name, v in t.items()}


def _input_transform(path: Path, math: SAELensMath, d_in: int,
                     scaling_factor: float | None) -> tuple[float | None, dict[str, Tensor] | None]:
    """(s, whitening) that SAELens applied to the inputs: s for "expected_average_only_in"
    (`scaling_factor`, else the checkpoint's activation_scaler.json), the whitening tensors
    for "covariance_whitening" (activation_whitening.safetensors); (None, None) for "none"."""
    cfg_path = path / CFG_FILENAME
    mode = math.normalize_activations
    if scaling_factor is not None and mode != "expected_average_only_in":
        raise SAEFileError(
            f"{cfg_path}: scaling_factor={scaling_factor!r} was given, but normalize_activations is "
            f"{mode!r}; give scaling_factor only for 'expected_average_only_in'"
        )
    if mode == "none":
        return None, None
    if mode == "covariance_whitening":
        file = path / WHITENING_FILENAME
        if not file.is_file():
            raise SAEFileError(
                f"{cfg_path}: normalize_activations='covariance_whitening': the SAE was trained on whitened "
                f"inputs, and this directory has no {WHITENING_FILENAME} to undo that with"
            )
        whitening = read_safetensors(file)
        check_tensors(file, whitening, {"mean": (d_in,), "matrix": (d_in, d_in), "inverse_matrix": (d_in, d_in)})
        return None, whitening
    source: Path | str = "scaling_factor"
    if scaling_factor is None:
        scaler = path / SCALER_FILENAME
        if not scaler.is_file():
            raise SAEFileError(
                f"{cfg_path}: normalize_activations='expected_average_only_in': the SAE was trained on "
                f"inputs scaled by a factor s that this directory does not hold (no {SCALER_FILENAME}); "
                "pass scaling_factor=s to fold it in (1.0 to load it as is, for inputs you scale yourself)"
            )
        scaling_factor, source = read_json(scaler).get("scaling_factor"), scaler
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, numbers.Real) or not scaling_factor > 0:
        raise SAEFileError(f"{source}: scaling_factor={scaling_factor!r}; accepted: a number > 0")
    return float(scaling_factor), None


def load_saelens(path: str | Path, scaling_factor: float | None = None) -> tuple[SAEConfig, dict[str, Tensor]]:
    """Read a SAELens directory: (config, {name: CPU tensor}), the tensors in our saved names
    with every math-changing cfg.json field folded in (module docstring), ready for
    `create_sae(config).load_saved_tensors(tensors)`. scaling_factor: s of a SAE with
    normalize_activations "expected_average_only_in" (default: its activation_scaler.json).
    Other files this reads, when cfg.json calls for them: activation_scaler.json,
    activation_whitening.safetensors (SAELens training checkpoints)."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: not found; a SAELens SAE directory holds {CFG_FILENAME} and {WEIGHTS_FILENAME}"
            )
    raw = read_json(cfg_path)
    cfg = from_saelens_cfg(raw, source=cfg_path)
    math = saelens_math(raw, cfg.architecture, cfg_path)
    tensors = _saelens_tensors(read_safetensors(weights_path), cfg, math, weights_path)
    scale, whitening = _input_transform(path, math, cfg.d_in, scaling_factor)
    return cfg, fold_saelens(tensors, cfg.architecture, math, scale, whitening)


def load_sae_dir(path: str | Path, device: str | torch.device = "cpu", sae_cls: type[SAE] = SAE,
                 scaling_factor: float | None = None) -> SAE:
    """Read a SAELens directory as the SAE its cfg.json names (our own architecture name, in its
    "sae_ray" section, when it has one), on `device`. `sae_cls`: the class it must be (or subclass);
    scaling_factor: as `load_saelens`."""
    cfg, tensors = load_saelens(path, scaling_factor=scaling_factor)
    try:
        sae = create_sae(cfg)
        if not isinstance(sae, sae_cls):
            raise ValueError(
                f"architecture {cfg.architecture!r} is a {type(sae).__name__}, "
                f"not a {sae_cls.__name__}; load it with load_sae_dir(path)"
            )
    except ValueError as e:
        raise SAEFileError(f"{Path(path) / CFG_FILENAME}: {e}") from e
    try:
        sae.load_saved_tensors(tensors)
    except (RuntimeError, ValueError) as e:
        raise SAEFileError(f"{Path(path) / WEIGHTS_FILENAME}: {e}") from e
    return sae.to(device)
