"""BatchTopK SAE (Bussmann et al. 2024): top k*B latents over the whole batch; a JumpReLU at inference."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_ray.sae.base import SAEConfig, register
from sae_ray.sae.sparse import SparseLatents, pays, top_k
from sae_ray.sae.topk import TopKSAE


@register
class BatchTopKSAE(TopKSAE):
    """Keep the k*B largest latents of the whole batch; one threshold θ for inference.

        pre   = (x - b_dec) @ W_enc + b_enc              [B, d_sae]
        train: f = ReLU(TopK_{k*B}(pre over all B*d_sae entries))   k latents per row on average
        eval:  f = pre * 1[pre > θ]                      a JumpReLU with one threshold
        after each training batch:  m = min(f[f > 0]),  θ <- (1 - r) θ + r m   (the first batch sets θ = m)
        loss  = mean_b ||x_hat - x||^2 + auxk            (AuxK, decoder and init as TopK)

    θ (buffer `topk_threshold`, float32 or wider, scalar; [K] for a stack) estimates the
    smallest activation BatchTopK keeps, so eval-mode L0 tracks k without needing a batch
    (the running minimum as in dictionary_learning; r = cfg.extra["topk_threshold_lr"],
    default 0.01 as SAELens). Before any training batch θ = 0 and eval is a plain ReLU.
    Saved as a SAELens "jumprelu" (threshold [d_sae] filled with θ, which runs as this
    SAE's eval mode); cfg.json's "sae_ray" section keeps "batchtopk" and k, and `load_sae_dir`
    gives back a BatchTopKSAE. Adam betas (0.9, 0.999). As a transcoder (`SAE`): pre = x @ W_enc
    + b_enc, x_hat [B, d_out] (+ x @ W_skip^T) against the target y; saved as SAELens's
    "jumprelu_transcoder" ("jumprelu_skip_transcoder").
    """

    architecture = "batchtopk"
    saved_architecture = "jumprelu"
    knobs = (*TopKSAE.knobs, "topk_threshold_lr")

    def __init__(self, cfg: SAEConfig | list[SAEConfig]):
        super().__init__(cfg)
        self.hyper("topk_threshold_lr", [float(v) for v in self.each_extra("topk_threshold_lr", 0.01)])
        dtype = torch.promote_types(self.W_dec.dtype, torch.float32)  # EMA steps vanish in bf16
        self.topk_threshold: Tensor
        self.register_buffer("topk_threshold", torch.zeros(self.shape(), dtype=dtype))

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        lr = cfg.extra.get("topk_threshold_lr", 0.01)
        if not 0 < lr <= 1:
            raise ValueError(f"SAEConfig.extra['topk_threshold_lr']: {lr!r}; expected a number in (0, 1]")

    def activation(self, pre: Tensor) -> Tensor:
        """[(K,) B, d_sae] -> same. Training: BatchTopK; eval: pre * 1[pre > θ]."""
        if not self.training:
            return self.jump(pre)
        indices, values = self._batch_top(pre)
        flat = pre.new_zeros(*pre.shape[:-2], pre.shape[-2] * pre.shape[-1])  # [(K,) B * d_sae]
        return flat.scatter_(-1, indices, values).view_as(pre)

    def _batch_top(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """[(K,) B, d_sae] -> (indices, values) [(K,) k_max * B] of the k * B largest entries of the
        flattened batch [(K,) B * d_sae] (`sparse.top_k`; a stack mixing k keeps each member's own)."""
        n = pre.shape[-2]
        k = self.k * n if isinstance(self.k, int) else (self.k * n).unsqueeze(-1)
        return top_k(pre.flatten(-2), k, self.k_max * n)

    def sparse_activation(self, pre: Tensor) -> SparseLatents | None:
        """Training: the same latents as `activation`, in flat form [(K,) k_max * B]; eval: None
        (the JumpReLU keeps a varying number per row, so it decodes densely); None too where k_max
        is too large a share of d_sae for sparse decoding to pay (`sparse.pays`)."""
        if not self.training or not pays(self.k_max, self.cfg.d_sae):
            return None
        indices, values = self._batch_top(pre)
        indices, order = indices.sort(dim=-1)
        return SparseLatents(indices, values.gather(-1, order), pre.shape)

    def jump(self, pre: Tensor) -> Tensor:
        """[(K,) B, d_sae] -> same: pre * 1[pre > θ], θ in the parameters' dtype (as when saved)."""
        theta = self.per_row(self.topk_threshold.to(pre.dtype))
        return pre * (pre > theta)

    @torch.no_grad()
    def observe(self, pre: Tensor, f: Tensor) -> None:
        """Count firing, then move θ towards the smallest kept activation of this batch."""
        super().observe(pre, f)
        smallest = torch.where(f > 0, f, torch.inf).flatten(-2).amin(-1).to(self.topk_threshold.dtype)
        theta = self.topk_threshold
        moved = torch.where(theta > 0, theta + self.topk_threshold_lr * (smallest - theta), smallest)
        theta.copy_(torch.where(smallest.isfinite(), moved, theta))

    def saved_tensors(self) -> dict[str, Tensor]:
        """The state_dict with θ as a JumpReLU's threshold [d_sae] (W_dec's dtype)."""
        tensors = dict(self.state_dict())
        theta = tensors.pop("topk_threshold")
        tensors["threshold"] = theta.to(self.W_dec.dtype).expand(self.cfg.d_sae).clone()
        return tensors

    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `saved_tensors`: `threshold` [d_sae] must hold one value."""
        tensors = dict(tensors)
        threshold = tensors.pop("threshold", None)
        if threshold is None:
            raise ValueError("missing tensor 'threshold' (a saved batchtopk SAE holds its θ there)")
        if threshold.dim() != 1 or not (threshold == threshold[0]).all():
            raise ValueError(
                f"threshold: a {self.architecture} SAE has one threshold, this file has "
                f"{tuple(threshold.shape)} values that differ; load it as architecture 'jumprelu'"
            )
        tensors["topk_threshold"] = threshold[0].to(self.topk_threshold.dtype)
        self.load_state_dict(tensors)
