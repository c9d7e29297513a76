"""The SAE base class and the architecture registry (configs and outputs: `config.py`).

An architecture is one file in this package: a subclass of `SAE` with a class
attribute `architecture = "name"`, decorated with `@register`. The package
imports every module in it, so the new file is all it takes.

Every architecture can also be a stack: K SAEs of the same architecture and shape,
each with its own sparsity, held in tensors with a leading K and trained on the
same batch with batched matmuls (`SAE([cfg_1, ..., cfg_K])` or `SAE.stack(saes)`).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae_ray.eval import metrics
from sae_ray.dtypes import torch_dtype
from sae_ray.sae.config import SPARSITY_PARAMS, SAEConfig, SAEOutput
from sae_ray.sae.sparse import SparseLatents, pays

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEOutput", "create_sae", "member_views",
           "register"]


class SAE(nn.Module):
    """Sparse autoencoder: x ≈ decode(encode(x)); or a transcoder: y ≈ decode(encode(x), x).

        SAE (cfg.d_out None)                          transcoder (cfg.d_out set)
        pre   = (x - b_dec) @ W_enc + b_enc           pre   = x @ W_enc + b_enc         [B, d_sae]
        f     = activation(pre)                       f     = activation(pre)           [B, d_sae]
        x_hat = f @ W_dec + b_dec                     x_hat = f @ W_dec + b_dec         [B, d_out]
                                                              (+ x @ W_skip^T with cfg.skip)
        mse   = mean_b sum_j (x_hat - x)^2            mse   = mean_b sum_j (x_hat - y)^2
        loss  = mse + sum(aux_losses(...).values())

    x [B, d_in] is the input; y [B, d_out] the target (`forward(x, target)`), for an SAE x
    itself (d_out = d_in). A transcoder reads one activation (e.g. an MLP's input) and
    reconstructs another (that MLP's output); its b_dec lives in the output space, so the input
    is not centred by it (as SAELens's Transcoder), and the aux losses (AuxK, Gated's aux,
    Matryoshka's prefixes) reconstruct y too. `cfg.skip` adds a learned linear map of the
    input, W_skip (a skip transcoder, Paulo et al. 2025), which every reconstruction includes.

    Parameters (SAELens names and shapes): W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_out], b_dec [d_out], W_skip [d_out, d_in] (skip only); d_out = d_in for an
    SAE. Init: W_dec rows random directions of norm `decoder_init_norm`; W_enc = W_dec^T for an
    SAE, for a transcoder columns of random directions of the same norm (its input and output
    spaces differ, so there is nothing to tie); W_skip and biases zero.

    Stack: `SAE([cfg_1, ..., cfg_K])` holds K SAEs of one architecture and shape
    (`n_stack = K`). Every parameter and buffer gets a leading K (W_enc [K, d_in, d_sae],
    b_enc [K, d_sae], W_dec [K, d_sae, d_out], b_dec [K, d_out], tokens_since_fired
    [K, d_sae], ...); x [B, d_in] and the target are shared and every output gains a leading K.
    Members have their own hyperparameters (as [K] tensors) and never interact: the gradient of
    `loss.sum()` gives each the gradient it would get alone. A single SAE
    (`SAE(cfg)`, `n_stack = None`) keeps SAELens's shapes and scalar losses.

    A subclass sets `architecture` and `sparsity_param`, implements `activation`,
    and overrides `aux_losses` if it has extra loss terms and `check_config` to
    validate its config. `unit_norm_decoder = True` makes `pre_step` / `post_step`
    keep decoder rows on the unit sphere. `sparsity_scale` (default 1) multiplies
    the sparsity penalty (not AuxK, not reconstruction): the training loop sets it
    to warm the penalty up.

    In training mode, `forward` counts for each latent the tokens since it last
    fired (`tokens_since_fired`, a non-persistent buffer: not in the saved weights).
    A latent is dead once it has not fired for `dead_tokens` tokens (`dead_mask`); the
    training loop sets `dead_tokens` from `train.dead_tokens`, so the dead-latent losses
    and the reported dead fraction use the same threshold. While it is None no latent is dead.
    Files (SAELens layout): `sae_ray.formats.save_saelens` and `load_sae_dir`.
    """

    architecture: ClassVar[str]
    sparsity_param: ClassVar[str]
    """The config field a sweep varies to set sparsity: "l1_coefficient", "l0_coefficient" or "k"."""
    unit_norm_decoder: ClassVar[bool] = False
    decoder_init_norm: ClassVar[float] = 1.0
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    """Adam betas the training loop uses for this architecture unless told otherwise."""
    knobs: ClassVar[tuple[str, ...]] = ("decoder_init_norm",)
    """The cfg.extra keys this architecture reads (a sweep's `sae.extra` may set only these)."""
    target_start: ClassVar[float] = 1.0
    """Coefficient architectures: the λ a target-L0 run starts from; the L0 controller
    (`sae_ray.train.target`) moves it during training."""
    saved_architecture: ClassVar[str | None] = None
    """The architecture cfg.json names for SAELens when it is not `architecture`
    (BatchTopK is saved as "jumprelu"); our own name is kept in cfg.json's "sae_ray"."""

    def __init__(self, cfg: SAEConfig | list[SAEConfig]):
        super().__init__()
        self.cfgs = _check_stack(cfg, type(self))
        """One config per member (one for a single SAE)."""
        self.cfg = self.cfgs[0]
        """The config of a single SAE; a stack's first member."""
        self.n_stack: int | None = len(self.cfgs) if isinstance(cfg, (list, tuple)) else None
        """K for a stack; None for a single SAE."""
        self.sparsity_scale = 1.0
        """Multiplies the sparsity penalty; set by the training loop for warmup."""
        self.sparse_decoding = True
        """Decode from the active latents alone where the architecture has a sparse form
        (`sparse_activation`: TopK, BatchTopK, Matryoshka, and every AuxK loss) and it pays
        (`sae_ray.sae.sparse.pays`: k <= d_sae / 16); False: the dense f @ W_dec everywhere,
        the reference the sparse path is tested against."""
        self.dead_tokens: int | None = None
        """Tokens without firing after which a latent is dead (one value for a stack); set by
        the training loop from `train.dead_tokens`. None: no latent is dead."""

        d_in, d_sae, dtype = self.cfg.d_in, self.cfg.d_sae, torch_dtype(self.cfg.dtype)
        d_out = self.cfg.d_target
        norm = torch.tensor(self.each_extra("decoder_init_norm", self.decoder_init_norm), dtype=torch.float32)
        W_dec = torch.randn(len(self.cfgs), d_sae, d_out)
        W_dec *= norm.view(-1, 1, 1) / W_dec.norm(dim=-1, keepdim=True)
        if self.cfg.is_transcoder:  # columns of random directions [K, d_in, d_sae], as long as W_dec's rows
            W_enc = torch.randn(len(self.cfgs), d_in, d_sae)
            W_enc *= norm.view(-1, 1, 1) / W_enc.norm(dim=-2, keepdim=True)
        else:
            W_enc = W_dec.transpose(-1, -2)
        if self.n_stack is None:
            W_dec, W_enc = W_dec[0], W_enc[0]
        self.W_enc = nn.Parameter(W_enc.contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(self.shape(d_sae), dtype=dtype))
        self.W_dec = nn.Parameter(W_dec.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.shape(d_out), dtype=dtype))
        if self.cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.shape(d_out, d_in), dtype=dtype))
        self.tokens_since_fired: Tensor
        self.register_buffer("tokens_since_fired", torch.zeros(self.shape(d_sae), dtype=torch.long), persistent=False)

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise ValueError, naming the field, if `cfg` does not suit this architecture."""

    # -- per-member settings ------------------------------------------------

    def shape(self, *dims: int) -> tuple[int, ...]:
        """`dims` with the stack's K in front (as is for a single SAE)."""
        return dims if self.n_stack is None else (self.n_stack, *dims)

    def each_extra(self, key: str, default: Any) -> list[Any]:
        """cfg.extra[key] (or `default`) of every member."""
        return [c.extra.get(key, default) for c in self.cfgs]

    def same_extra(self, key: str, default: Any) -> Any:
        """cfg.extra[key] (or `default`), which must be the same for every member of a stack."""
        values = self.each_extra(key, default)
        for i, v in enumerate(values[1:], 1):
            if v != values[0]:
                raise ValueError(
                    f"SAEConfig.extra[{key!r}]: stack member {i} has {v!r}, member 0 has {values[0]!r}; "
                    "it sets the shape of the computation, so a stack needs one value"
                )
        return values[0]

    def hyper(self, name: str, values: list, dtype: torch.dtype | None = None) -> None:
        """Set `self.<name>` to one hyperparameter per member: the plain value for a single
        SAE, a [K] tensor (non-persistent buffer, so it follows .to(device)) for a stack."""
        if self.n_stack is None:
            setattr(self, name, values[0])
        else:
            dtype = dtype or torch.promote_types(self.W_dec.dtype, torch.float32)
            self.register_buffer(name, torch.tensor(values, dtype=dtype), persistent=False)

    def set_coefficients(self, values: list[float]) -> None:
        """Set each member's sparsity coefficient (the `sparsity_param`, not k), in the module and
        in its config, so that stacking, unstacking and saving keep it (the L0 controller does)."""
        for cfg, v in zip(self.cfgs, values):
            setattr(cfg, self.sparsity_param, float(v))
        if self.n_stack is None:
            setattr(self, self.sparsity_param, float(values[0]))
        else:
            getattr(self, self.sparsity_param).copy_(torch.tensor(values))

    def per_row(self, value: float | Tensor) -> float | Tensor:
        """A per-member value shaped to broadcast against [B, n] ([K, B, n] for a stack)."""
        return value if self.n_stack is None else value.view(-1, 1, 1)

    # -- the math ---------------------------------------------------------

    def affine(self, x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        """x @ W + b. Single: x [B, n], W [n, m], b [m] -> [B, m] (one addmm).
        Stack: x [K, B, n] or shared [B, n], W [K, n, m], b [K, m] -> [K, B, m] (one baddbmm)."""
        if self.n_stack is None:
            return torch.addmm(b, x, W) if x.dim() == 2 else x @ W + b
        if x.dim() == 2:
            x = x.expand(self.n_stack, *x.shape)
        return torch.baddbmm(b.unsqueeze(-2), x, W)

    def centred_encode(self, x: Tensor, b: Tensor | None) -> Tensor:
        """(x - b_dec) @ W_enc + b: x [B, d_in], b [(K,) d_sae] or None (no bias) -> [(K,) B, d_sae].
        A transcoder: x @ W_enc + b (its b_dec is output-space; the input is not centred).

        b_dec's gradient through this, -(sum_b dpre) @ W_enc^T, is computed as a vector product.
        Autograd through (x - b_dec) would spend a full [B, d_sae] @ [d_sae, d_in] matmul on it, a
        sixth of a dense training step. The value is the same: b_dec - b_dec.detach() is exactly 0."""
        if self.cfg.is_transcoder:
            x = x.to(self.W_enc.dtype)
            return x @ self.W_enc if b is None else self.affine(x, self.W_enc, b)
        fixed = self.b_dec.detach()
        shift = ((self.b_dec - fixed).unsqueeze(-2) @ self.W_enc).squeeze(-2)  # zeros [(K,) d_sae]
        x = x.to(self.W_enc.dtype)
        centred = x - (fixed if self.n_stack is None else fixed.unsqueeze(-2))
        return self.affine(centred, self.W_enc, -shift if b is None else b - shift)

    def pre_acts(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> [B, d_sae] ([K, B, d_sae] for a stack): (x - b_dec) @ W_enc + b_enc
        (a transcoder: x @ W_enc + b_enc)."""
        return self.centred_encode(x, self.b_enc)

    def activation(self, pre: Tensor) -> Tensor:
        """[B, d_sae] pre-activations -> [B, d_sae] latents (with a leading K for a stack)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> latents [B, d_sae] ([K, B, d_sae] for a stack)."""
        return self.activation(self.pre_acts(x))

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """f [B, d_sae] ([K, B, d_sae] for a stack) -> [B, d_out] ([K, B, d_out]): f @ W_dec + b_dec,
        plus x @ W_skip^T for a skip transcoder, which needs its input x [B, d_in] (shared, or
        [K, B, d_in]); without a skip connection x is not needed (and not read)."""
        x_hat = self.affine(f, self.W_dec, self.b_dec)
        return x_hat if not self.cfg.skip else x_hat + self.skip_out(x)

    def skip_out(self, x: Tensor | None) -> Tensor:
        """The skip connection's part of x_hat: x [B, d_in] (shared, or [K, B, d_in]) ->
        x @ W_skip^T [(K,) B, d_out]. Only for a skip transcoder (cfg.skip)."""
        if x is None:
            raise ValueError(
                "decode: this transcoder has a skip connection (SAEConfig.skip=True), whose part of the "
                "reconstruction is x @ W_skip^T; pass its input: decode(f, x) with x [B, d_in]"
            )
        return x.to(self.W_skip.dtype) @ self.W_skip.transpose(-1, -2)

    def offset(self, x: Tensor) -> Tensor:
        """What every reconstruction adds to its f @ W_dec: b_dec, plus x @ W_skip^T for a skip
        transcoder. x [B, d_in] -> broadcastable to [(K,) B, d_out]: b_dec [d_out] ([K, 1, d_out]
        for a stack), with skip [(K,) B, d_out]."""
        b_dec = self.b_dec if self.n_stack is None else self.b_dec.unsqueeze(-2)
        return b_dec if not self.cfg.skip else b_dec + self.skip_out(x)

    def sparse_activation(self, pre: Tensor) -> SparseLatents | None:
        """[(K,) B, d_sae] pre-activations -> the active latents as (indices, values), for the
        sparse decoder; the same latents as `activation`. None (the default): no sparse form."""
        return None

    def aux_losses(self, x: Tensor, target: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor,
                   active: SparseLatents | None = None) -> dict[str, Tensor]:
        """Extra weighted loss terms, scalar ([K] for a stack). x [B, d_in] the input; target
        [B, d_out] what x_hat reconstructs (x for an SAE); pre, f [B, d_sae]; x_hat [B, d_out]
        (pre, f, x_hat with a leading K for a stack); active: f's active latents when this batch
        decoded sparsely, else None."""
        return {}

    def check_batch(self, x: Tensor, target: Tensor | None) -> Tensor:
        """The target of a forward pass: `target` [B, d_out] checked against x [B, d_in] and the
        config, or x itself for an SAE. ValueError naming the field and the shape otherwise."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE.forward: x has shape {list(x.shape)}; expected [B, d_in={self.cfg.d_in}]")
        if target is None:
            if self.cfg.is_transcoder:
                raise ValueError(
                    f"SAE.forward: this is a transcoder (SAEConfig.d_out={self.cfg.d_out}), which reconstructs "
                    "another activation than its input; pass it: forward(x, target) with target [B, d_out]"
                )
            return x
        name = "d_out" if self.cfg.is_transcoder else "d_in (an SAE reconstructs its input; d_out is None)"
        if target.shape[-1] != self.cfg.d_target or target.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"SAE.forward: target has shape {list(target.shape)}; expected [B={x.shape[0]}, "
                f"{name}={self.cfg.d_target}], one row per row of x {list(x.shape)}"
            )
        return target.to(self.W_enc.dtype)

    def forward(self, x: Tensor, target: Tensor | None = None) -> SAEOutput:
        """x [B, d_in], target [B, d_out] (default: x, for an SAE; a transcoder needs it) -> SAEOutput.
        The losses compare x_hat with the target. In training mode also calls `observe` (firing
        counts). With `sparse_decoding` on and a sparse form of the latents (`sparse_activation`),
        x_hat is decoded from it (`SparseLatents.decode`); otherwise as the dense `decode(f, x)`."""
        x = x.to(self.W_enc.dtype)
        target = self.check_batch(x, target)
        pre = self.pre_acts(x)
        active = self.sparse_activation(pre) if self.sparse_decoding else None
        if active is None:
            f = self.activation(pre)
            x_hat = self.decode(f, x)
        else:
            f = active.dense()
            x_hat = active.decode(self.W_dec) + self.offset(x)
        mse = (x_hat - target).pow(2).sum(-1).mean(-1)
        aux = self.aux_losses(x, target, pre, f, x_hat, active)  # sees the dead mask from before this batch
        loss = mse + sum(aux.values())
        if self.training:
            self.observe(pre, f)
        return SAEOutput(x_hat, f, loss, mse, aux)

    @torch.no_grad()
    def observe(self, pre: Tensor, f: Tensor) -> None:
        """After a training forward pass: pre, f [B, d_sae] ([K, B, d_sae] for a stack).
        Counts firing; subclasses add their running statistics."""
        self.tokens_since_fired += f.shape[-2]
        # two reductions instead of (f != 0).any(-2): no [(K,) B, d_sae] bool temporary
        fired = (f.amax(dim=-2) > 0) | (f.amin(dim=-2) < 0)
        self.tokens_since_fired.masked_fill_(fired, 0)

    # -- dead latents -----------------------------------------------------

    @property
    def dead_mask(self) -> Tensor:
        """[d_sae] bool ([K, d_sae] for a stack): latents that have not fired in the last
        `dead_tokens` tokens (`metrics.dead_mask`); all False while `dead_tokens` is None."""
        if self.dead_tokens is None:
            return torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
        return metrics.dead_mask(self.tokens_since_fired, self.dead_tokens)

    @staticmethod
    def check_auxk_config(cfg: SAEConfig) -> None:
        """Raise ValueError, naming the key, if cfg.extra's "k_aux" or "auxk_coefficient" is bad."""
        k_aux = cfg.extra.get("k_aux", 1)
        if not isinstance(k_aux, int) or isinstance(k_aux, bool) or k_aux < 1:
            raise ValueError(f"SAEConfig.extra['k_aux']: {k_aux!r}; expected an integer >= 1")
        check_extra_number(cfg, "auxk_coefficient", 0.0)

    def init_auxk(self, default_coefficient: float) -> None:
        """Set up the AuxK dead-latent loss (`auxk_loss`) from cfg.extra: "k_aux" (default half the
        width of the reconstruction, d_in // 2 (d_out // 2 for a transcoder), one value per stack)
        and "auxk_coefficient" (per member; 0 turns it off)."""
        self.k_aux = max(1, int(self.same_extra("k_aux", self.cfg.d_target // 2)))
        coefficients = [float(v) for v in self.each_extra("auxk_coefficient", default_coefficient)]
        self.auxk_on = any(v > 0 for v in coefficients)
        self.hyper("auxk_coefficient", coefficients)

    def auxk_loss(self, target: Tensor, pre: Tensor, x_hat: Tensor) -> Tensor:
        """Weighted AuxK (Gao et al. 2024), scalar ([K] for a stack); zero while no latent is dead.

            e     = target - x_hat                                (detached; target = x for an SAE)
            z     = TopK_{k_aux}(pre restricted to dead latents)  [(K,) B, d_sae]
            auxk  = auxk_coefficient * min(n_dead / k_aux, 1) * mean_b ||z @ W_dec - e||^2

        The dead latents learn to explain what the live ones miss; it uses their raw
        pre-activations, so latents stuck below zero (or below a threshold) still get a
        gradient. Zero, without the work, when every member's coefficient is 0.
        target [B, d_out]; pre [(K,) B, d_sae]; x_hat [(K,) B, d_out]. Needs `init_auxk`.
        """
        if not self.auxk_on:
            return x_hat.new_zeros(self.shape())
        dead = self.dead_mask.unsqueeze(-2)  # [(K,) 1, d_sae]
        n_dead = dead.sum((-2, -1))  # [(K,)]
        most = int(n_dead.max())
        if most == 0:
            return x_hat.new_zeros(self.shape())
        top = pre.masked_fill(~dead, -torch.inf).topk(min(self.k_aux, most), dim=-1, sorted=False)
        # a member with fewer dead latents than that picked some live ones (at -inf): drop them
        values = top.values.masked_fill(top.values == -torch.inf, 0)
        if self.sparse_decoding and pays(self.k_aux, self.cfg.d_sae):
            z_dec = SparseLatents(top.indices, values, pre.shape).decode(self.W_dec)
        else:
            z_dec = torch.zeros_like(pre).scatter_(-1, top.indices, values) @ self.W_dec
        e = (target - x_hat).detach()
        auxk = (z_dec - e).pow(2).sum(-1).mean(-1)
        scale = (n_dead.to(auxk.dtype) / self.k_aux).clamp(max=1.0)
        return self.auxk_coefficient * scale * auxk

    # -- optimizer hooks --------------------------------------------------

    @torch.no_grad()
    def pre_step(self) -> None:
        """After backward, before the optimizer step: if the decoder is kept at unit
        norm, remove from W_dec.grad [(K,) d_sae, d_out] its component along each row."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        for W, g in member_views(self.n_stack, self.W_dec, self.W_dec.grad):
            along = (g * W).sum(-1, keepdim=True) / W.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
            g -= along * W

    @torch.no_grad()
    def post_step(self) -> None:
        """After the optimizer step: if the decoder is kept at unit norm, renormalise its rows."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_input_scale(self, s: float, s_out: float | None = None) -> None:
        """The SAE was trained on x * s (a transcoder: on x * s against targets y * s_out); change
        it in place to take raw x and return raw-scale x_hat with the same latents:
        W_enc *= s, W_dec /= s_out, b_dec /= s_out, W_skip *= s / s_out. s_out defaults to s, which
        is what it is for an SAE (its target is its input). Pre-activations are unchanged (an SAE
        centres x on b_dec / s), so thresholds and encoder biases are too. Run it after training:
        decoder rows are no longer unit norm."""
        s = float(s)
        s_out = s if s_out is None else float(s_out)
        for name, v in (("s", s), ("s_out", s_out)):
            if not v > 0:
                raise ValueError(f"fold_input_scale: {name}={v!r}; expected a number > 0")
        if not self.cfg.is_transcoder and s_out != s:
            raise ValueError(
                f"fold_input_scale: s_out={s_out!r} differs from s={s!r}, but an SAE's target is its own "
                "input (SAEConfig.d_out is None), scaled by s; give s_out only for a transcoder"
            )
        self.W_enc *= s
        self.W_dec /= s_out
        self.b_dec /= s_out
        if self.cfg.skip:
            self.W_skip *= s / s_out

    # -- stacks -----------------------------------------------------------

    @classmethod
    def stack(cls, saes: list[SAE]) -> SAE:
        """One stack of K = len(saes) from single SAEs of one architecture and shape:
        copies of their weights, buffers (tokens_since_fired, ...) and configs. Placed on
        the first one's device, in its train/eval mode, with its sparsity_scale and dead_tokens."""
        if not saes:
            raise ValueError("SAE.stack: no SAEs given")
        first = saes[0]
        for i, sae in enumerate(saes):
            if not isinstance(sae, cls) or type(sae) is not type(first):
                raise ValueError(
                    f"SAE.stack: SAE {i} is a {type(sae).__name__}, SAE 0 a {type(first).__name__}; "
                    "a stack holds one architecture"
                )
            if sae.n_stack is not None:
                raise ValueError(f"SAE.stack: SAE {i} is already a stack of {sae.n_stack}; unstack it first")
        out = type(first)([copy.deepcopy(s.cfg) for s in saes]).to(next(first.parameters()).device)
        states = [_state_tensors(s) for s in saes]
        with torch.no_grad():
            for name in states[0]:
                getattr(out, name).copy_(torch.stack([state[name] for state in states]))
        out.train(first.training)
        out.sparsity_scale, out.dead_tokens = first.sparsity_scale, first.dead_tokens
        return out

    def unstack(self) -> list[SAE]:
        """The members of a stack as single SAEs: copies of their weights and buffers,
        each with its own config, on this stack's device and in its mode."""
        if self.n_stack is None:
            raise ValueError("unstack: this is a single SAE, not a stack")
        device = next(self.parameters()).device
        saes = []
        for i, cfg in enumerate(self.cfgs):
            sae = type(self)(copy.deepcopy(cfg)).to(device)
            with torch.no_grad():
                for name, t in _state_tensors(sae).items():
                    t.copy_(getattr(self, name)[i])
            sae.train(self.training)
            sae.sparsity_scale, sae.dead_tokens = self.sparsity_scale, self.dead_tokens
            saes.append(sae)
        return saes

    # -- files ------------------------------------------------------------

    def saved_tensors(self) -> dict[str, Tensor]:
        """The tensors `save_saelens` writes, with SAELens names and shapes. Default: the state_dict."""
        return dict(self.state_dict())

    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `saved_tensors`. Default: a strict load_state_dict."""
        self.load_state_dict(tensors)


def check_extra_number(cfg: SAEConfig, key: str, default: float, positive: bool = False) -> None:
    """Raise ValueError, naming the key, unless cfg.extra[key] (or `default`) is a number
    >= 0 (> 0 with `positive`)."""
    value = cfg.extra.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value > 0 if positive else value >= 0):
        raise ValueError(f"SAEConfig.extra[{key!r}]: {value!r}; expected a number {'> 0' if positive else '>= 0'}")


def member_views(n_stack: int | None, *tensors: Tensor):
    """The tensors of a stack member by member on CPU: tuples (t[0], ...), (t[1], ...), ... of
    views, so in-place work on them changes the stack. Anywhere else (a GPU, a single SAE):
    the one tuple `tensors`.

    Why: elementwise work on a whole [K, ...] tensor makes [K, ...] temporaries. On CPU those are
    big enough that glibc maps them fresh from the kernel, which zeroes every page, on each step;
    member-sized ones are what a single SAE makes and malloc hands the same memory back.
    """
    if n_stack is None or tensors[0].device.type != "cpu":
        return [tensors]
    return zip(*(t.unbind(0) for t in tensors))


def _check_stack(cfg: SAEConfig | list[SAEConfig], sae_cls: type[SAE]) -> list[SAEConfig]:
    """The configs as a list, checked: one architecture (sae_cls's) and one shape."""
    stacked = isinstance(cfg, (list, tuple))
    cfgs = list(cfg) if stacked else [cfg]
    if not cfgs:
        raise ValueError("a stack needs at least one SAEConfig")
    for i, c in enumerate(cfgs):
        if not isinstance(c, SAEConfig):
            raise TypeError(f"stack member {i}: expected an SAEConfig, got {type(c).__name__}")
    first = cfgs[0]
    for i, c in enumerate(cfgs[1:], 1):
        for name in ("architecture", "d_in", "d_sae", "d_out", "skip", "dtype"):
            if getattr(c, name) != getattr(first, name):
                raise ValueError(
                    f"SAEConfig.{name}: stack member {i} has {getattr(c, name)!r}, member 0 has "
                    f"{getattr(first, name)!r}; the SAEs of a stack share architecture, d_in, d_sae, "
                    "d_out, skip and dtype"
                )
    if not hasattr(sae_cls, "architecture"):
        raise TypeError(f"{sae_cls.__name__} has no architecture; build an SAE with create_sae(cfg)")
    if first.architecture != sae_cls.architecture:
        raise ValueError(
            f"SAEConfig.architecture: {first.architecture!r}, but {sae_cls.__name__} is {sae_cls.architecture!r}"
        )
    for i, c in enumerate(cfgs):
        try:
            sae_cls.check_config(c)
        except ValueError as e:
            raise ValueError(f"stack member {i}: {e}" if stacked else str(e)) from None
    return cfgs


def _state_tensors(sae: SAE) -> dict[str, Tensor]:
    """Parameters and buffers of a single SAE, by name (what stack/unstack copy)."""
    return {**dict(sae.named_parameters()), **dict(sae.named_buffers())}


# -- registry -------------------------------------------------------------

ARCHITECTURES: dict[str, type[SAE]] = {}
"""Architecture name -> SAE subclass, filled by `register`."""


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make `cls` available under `cls.architecture`."""
    name = getattr(cls, "architecture", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `architecture = \"name\"`")
    if getattr(cls, "sparsity_param", None) not in SPARSITY_PARAMS:
        raise TypeError(
            f"{cls.__name__} needs a class attribute `sparsity_param` (one of {', '.join(map(repr, SPARSITY_PARAMS))})"
        )
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


def create_sae(cfg: SAEConfig | list[SAEConfig]) -> SAE:
    """A freshly initialised SAE of `cfg.architecture` (a stack for a list of configs)."""
    first = cfg[0] if isinstance(cfg, (list, tuple)) and cfg else cfg
    if not isinstance(first, SAEConfig):
        raise TypeError(f"create_sae: expected an SAEConfig or a list of them, got {cfg!r}")
    return _lookup(first.architecture)(cfg)
