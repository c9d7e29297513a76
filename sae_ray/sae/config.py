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

    d_out: int | None = None
    """Width of the activation it reconstructs; None: an SAE, which reconstructs its input
    (width d_in). Set: a transcoder, which reads x [B, d_in] (e.g. an MLP's input) and
    reconstructs another activation [B, d_out] (e.g. that MLP's output)."""

    skip: bool = False
    """Learned skip connection W_skip [d_out, d_in]: x_hat gains x @ W_skip^T (a "skip
    transcoder", Paulo et al. 2025); transcoders only."""

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

    hook_name_out: str = ""
    """Transcoders: the hook point of the activation it reconstructs, e.g. "blocks.3.hook_mlp_out"."""

    hook_layer_out: int = -1
    """Transcoders: layer of `hook_name_out`; -1 when unknown."""

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
        for name in ("d_in", "d_sae", "d_out", "k", "hook_layer", "hook_layer_out", "context_size"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                    raise ValueError(f"SAEConfig.{name}: {value!r} is not an integer")
                setattr(self, name, int(value))
        for name in ("d_in", "d_sae", "d_out"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"SAEConfig.{name}: {getattr(self, name)} is not positive")
        if not isinstance(self.skip, bool):
            raise ValueError(f"SAEConfig.skip: {self.skip!r}; expected true or false")
        if self.skip and self.d_out is None:
            raise ValueError(
                "SAEConfig.skip: True, but d_out is None; a skip connection maps the input to another "
                "activation, so it needs a transcoder (set d_out, the width of the activation it reconstructs)"
            )
        for name in ("l1_coefficient", "l0_coefficient"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, numbers.Real) or isinstance(value, bool):
                    raise ValueError(f"SAEConfig.{name}: {value!r} is not a number")
                setattr(self, name, float(value))
        torch_dtype(self.dtype)

    @property
    def is_transcoder(self) -> bool:
        """Whether it reconstructs another activation than its input (d_out is set)."""
        return self.d_out is not None

    @property
    def d_target(self) -> int:
        """Width of what it reconstructs: d_out for a transcoder, d_in for an SAE."""
        return self.d_in if self.d_out is None else self.d_out


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns. A stack of K SAEs puts K in front of every shape."""

    x_hat: Tensor
    """[B, d_out] reconstruction of the target ([K, B, d_out] for a stack); d_out = d_in for an SAE."""

    feature_acts: Tensor
    """[B, d_sae] latent activations, non-negative and sparse ([K, B, d_sae] for a stack)."""

    loss: Tensor
    """Training loss, scalar ([K] for a stack): mse + sum(aux.values())."""

    mse: Tensor
    """Mean over the batch of the summed squared error against the target (over d_out);
    scalar ([K] for a stack)."""

    aux: dict[str, Tensor]
    """Named loss terms, already weighted, scalar ([K] for a stack), e.g. {"l1": ...} or {"auxk": ...}."""
