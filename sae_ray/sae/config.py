"""SAEConfig (shape, sparsity, provenance of one SAE) and SAEOutput (what forward returns)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor

from sae_ray.dtypes import torch_dtype

SPARSITY_PARAMS = ("l1_coefficient", "l0_coefficient", "k")
"""The config fields an architecture's `sparsity_param` may name."""


@dataclass
class SAEConfig:
    """Shape, sparsity and provenance of one SAE. Names follow SAELens where it has one."""

    architecture: str
    """Registered architecture: "standard", "topk", "batchtopk", "jumprelu", "gated",
    "matryoshka" (see `ARCHITECTURES`)."""

    d_in: int
    """Width of the activations the SAE reads (d_model at `hook_name`)."""

    d_sae: int
    """Number of latents (dictionary size)."""

    k: int | None = None
    """TopK, BatchTopK, Matryoshka: latents kept per row (BatchTopK: on average over the batch)."""

    l1_coefficient: float | None = None
    """Standard, Gated: weight of the decoder-norm-weighted L1 penalty."""

    l0_coefficient: float | None = None
    """JumpReLU: weight λ of the L0 penalty."""

    model_name: str = ""
    """Model the activations came from (e.g. a Hugging Face id)."""

    hook_name: str = ""
    """Hook point, TransformerLens style, e.g. "blocks.3.hook_resid_post"."""

    hook_layer: int = -1
    """Layer of `hook_name`; -1 when unknown."""

    context_size: int = 0
    """Tokens per sequence when the activations were taken."""

    dataset_path: str = ""
    """Dataset the activations came from."""

    dtype: str = "float32"
    """Parameter dtype: "float32", "bfloat16", "float16" or "float64"."""

    extra: dict = field(default_factory=dict)
    """Anything else kept in cfg.json: architecture knobs (e.g. "k_aux", "auxk_coefficient",
    "decoder_init_norm", "bandwidth", "prepend_bos"; each architecture's `knobs` names its
    own, its docstring explains them) and training figures. Keys no architecture reads
    (e.g. "dead_tokens_threshold" in older files) are kept and ignored."""

    def __post_init__(self) -> None:
        # plain Python numbers, so that cfg.json can be written (sweeps may hand in numpy ints)
        for name in ("d_in", "d_sae", "k", "hook_layer", "context_size"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                    raise ValueError(f"SAEConfig.{name}: {value!r} is not an integer")
                setattr(self, name, int(value))
        for name in ("d_in", "d_sae"):
            if getattr(self, name) < 1:
                raise ValueError(f"SAEConfig.{name}: {getattr(self, name)} is not positive")
        for name in ("l1_coefficient", "l0_coefficient"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, numbers.Real) or isinstance(value, bool):
                    raise ValueError(f"SAEConfig.{name}: {value!r} is not a number")
                setattr(self, name, float(value))
        torch_dtype(self.dtype)


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns. A stack of K SAEs puts K in front of every shape."""

    x_hat: Tensor
    """[B, d_in] reconstruction ([K, B, d_in] for a stack)."""

    feature_acts: Tensor
    """[B, d_sae] latent activations, non-negative and sparse ([K, B, d_sae] for a stack)."""

    loss: Tensor
    """Training loss, scalar ([K] for a stack): mse + sum(aux.values())."""

    mse: Tensor
    """Mean over the batch of the summed squared error over d_in; scalar ([K] for a stack)."""

    aux: dict[str, Tensor]
    """Named loss terms, already weighted, scalar ([K] for a stack), e.g. {"l1": ...} or {"auxk": ...}."""
