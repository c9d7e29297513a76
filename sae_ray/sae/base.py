"""The SAE base class, its config and output, and the architecture registry.

An architecture is one file in this package: a subclass of `SAE` with a class
attribute `architecture = "name"`, decorated with `@register`. The package
imports every module in it, so the new file is all it takes.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    """"float32" (or SAELens's "torch.float32") -> torch.float32."""
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[key]


@dataclass
class SAEConfig:
    """Shape, sparsity and provenance of one SAE. Names follow SAELens where it has one."""

    architecture: str
    """Registered architecture: "standard" (ReLU + L1) or "topk" (see `ARCHITECTURES`)."""

    d_in: int
    """Width of the activations the SAE reads (d_model at `hook_name`)."""

    d_sae: int
    """Number of latents (dictionary size)."""

    k: int | None = None
    """TopK only: latents kept per row."""

    l1_coefficient: float | None = None
    """Standard only: weight of the decoder-norm-weighted L1 penalty."""

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
    """Anything else kept in cfg.json: architecture knobs (e.g. "dead_tokens_threshold",
    "k_aux", "auxk_coefficient", "decoder_init_norm", "prepend_bos") and training figures."""

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
        if self.l1_coefficient is not None:
            self.l1_coefficient = float(self.l1_coefficient)
        parse_dtype(self.dtype)


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns."""

    x_hat: Tensor
    """[B, d_in] reconstruction."""

    feature_acts: Tensor
    """[B, d_sae] latent activations (non-negative, sparse)."""

    loss: Tensor
    """Scalar training loss: mse + sum(aux.values())."""

    mse: Tensor
    """Scalar: mean over the batch of the summed squared error over d_in."""

    aux: dict[str, Tensor]
    """Named scalar loss terms, already weighted, e.g. {"l1": ...} or {"auxk": ...}."""


class SAE(nn.Module):
    """Sparse autoencoder: x ≈ decode(encode(x)).

        pre   = (x - b_dec) @ W_enc + b_enc        [B, d_sae]
        f     = activation(pre)                    [B, d_sae]   non-negative, sparse
        x_hat = f @ W_dec + b_dec                  [B, d_in]
        mse   = mean_b sum_j (x_hat - x)^2
        loss  = mse + sum(aux_losses(...).values())

    Parameters (SAELens names and shapes): W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_in], b_dec [d_in]. Init: W_dec rows random directions of norm
    `decoder_init_norm`, W_enc = W_dec^T, biases zero.

    A subclass sets `architecture`, implements `activation`, and overrides
    `aux_losses` if it has extra loss terms. `unit_norm_decoder = True` makes
    `pre_step` / `post_step` keep decoder rows on the unit sphere.

    In training mode, `forward` counts for each latent the tokens since it last
    fired (`tokens_since_fired [d_sae]`, a non-persistent buffer: not in the saved
    weights). A latent is dead once it has not fired for
    `cfg.extra["dead_tokens_threshold"]` (default 10M) tokens.
    """

    architecture: ClassVar[str]
    sparsity_param: ClassVar[str]
    """The config field a sweep varies to set sparsity: "l1_coefficient" or "k"."""
    unit_norm_decoder: ClassVar[bool] = False
    decoder_init_norm: ClassVar[float] = 1.0
    default_dead_tokens_threshold: ClassVar[int] = 10_000_000

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        dtype = parse_dtype(cfg.dtype)
        norm = float(cfg.extra.get("decoder_init_norm", self.decoder_init_norm))
        W_dec = torch.randn(cfg.d_sae, cfg.d_in)
        W_dec *= norm / W_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.tokens_since_fired: Tensor
        self.register_buffer(
            "tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long), persistent=False
        )

    # -- the math ---------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """[B, d_in] -> [B, d_sae]: (x - b_dec) @ W_enc + b_enc."""
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        """[B, d_sae] pre-activations -> [B, d_sae] latents."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """[B, d_in] -> [B, d_sae] latents."""
        return self.activation(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        """[B, d_sae] -> [B, d_in]: f @ W_dec + b_dec."""
        return f @ self.W_dec + self.b_dec

    def aux_losses(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
        """Extra weighted scalar loss terms. x, x_hat [B, d_in]; pre, f [B, d_sae]."""
        return {}

    def forward(self, x: Tensor) -> SAEOutput:
        """[B, d_in] -> SAEOutput. In training mode also updates `tokens_since_fired`."""
        x = x.to(self.W_enc.dtype)
        pre = self.pre_acts(x)
        f = self.activation(pre)
        x_hat = self.decode(f)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        aux = self.aux_losses(x, pre, f, x_hat)  # sees the dead mask from before this batch
        loss = mse + sum(aux.values())
        if self.training:
            self._count_fires(f)
        return SAEOutput(x_hat, f, loss, mse, aux)

    # -- dead latents -----------------------------------------------------

    @torch.no_grad()
    def _count_fires(self, f: Tensor) -> None:
        """f [B, d_sae]: add B to every counter, reset the latents that fired."""
        self.tokens_since_fired += f.shape[0]
        self.tokens_since_fired[(f != 0).any(dim=0)] = 0

    @property
    def dead_tokens_threshold(self) -> int:
        """Tokens without firing after which a latent counts as dead."""
        return int(self.cfg.extra.get("dead_tokens_threshold", self.default_dead_tokens_threshold))

    @property
    def dead_mask(self) -> Tensor:
        """[d_sae] bool: latents that have not fired in the last `dead_tokens_threshold` tokens."""
        return self.tokens_since_fired >= self.dead_tokens_threshold

    # -- optimizer hooks --------------------------------------------------

    @torch.no_grad()
    def pre_step(self) -> None:
        """After backward, before the optimizer step: if the decoder is kept at unit
        norm, remove from W_dec.grad [d_sae, d_in] its component along each row."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        W, g = self.W_dec, self.W_dec.grad
        along = (g * W).sum(-1, keepdim=True) / W.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
        g -= along * W

    @torch.no_grad()
    def post_step(self) -> None:
        """After the optimizer step: if the decoder is kept at unit norm, renormalise its rows."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # -- files ------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write `path/cfg.json` and `path/sae_weights.safetensors` (SAELens layout)."""
        from sae_ray.formats.saelens import save_saelens

        save_saelens(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Read a SAELens directory; the class comes from cfg.json's architecture."""
        from sae_ray.formats.saelens import load_saelens

        cfg, tensors = load_saelens(path)
        try:
            sae_cls = _lookup(cfg.architecture)
            if not issubclass(sae_cls, cls):
                raise ValueError(
                    f"architecture {cfg.architecture!r} is a {sae_cls.__name__}, "
                    f"not a {cls.__name__}; load it with SAE.load"
                )
            sae = sae_cls(cfg)
        except ValueError as e:
            raise ValueError(f"{Path(path) / 'cfg.json'}: {e}") from e
        try:
            sae.load_state_dict(tensors)
        except RuntimeError as e:
            raise ValueError(f"{Path(path) / 'sae_weights.safetensors'}: {e}") from e
        return sae.to(device)


# -- registry -------------------------------------------------------------

ARCHITECTURES: dict[str, type[SAE]] = {}
"""Architecture name -> SAE subclass, filled by `register`."""


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make `cls` available under `cls.architecture`."""
    name = getattr(cls, "architecture", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `architecture = \"name\"`")
    if getattr(cls, "sparsity_param", None) not in ("l1_coefficient", "k"):
        raise TypeError(f"{cls.__name__} needs a class attribute `sparsity_param` ('l1_coefficient' or 'k')")
    old = ARCHITECTURES.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"architecture {name!r} is already registered by {old.__module__}.{old.__qualname__}"
        )
    ARCHITECTURES[name] = cls
    return cls


def _lookup(name: str) -> type[SAE]:
    if name not in ARCHITECTURES:
        raise ValueError(
            f"architecture: unknown SAE architecture {name!r}; "
            f"valid ones: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]


def create_sae(cfg: SAEConfig) -> SAE:
    """A freshly initialised SAE of `cfg.architecture`."""
    return _lookup(cfg.architecture)(cfg)
