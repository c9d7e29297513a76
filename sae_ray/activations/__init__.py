"""Model loading, hook points, text streams, tokenization and capture (no Ray)."""

from sae_ray.activations.hooks import (
    SITES,
    ResolvedHook,
    capture_activations,
    find_blocks,
    resolve_hook,
    valid_hook_points,
)
from sae_ray.activations.model import is_causal_lm, load_model, resolve_model_path
from sae_ray.activations.text import (
    PackedBatch,
    context_layout,
    load_documents,
    pack_documents,
    peek_documents,
    special_token_mask,
)

__all__ = [
    "SITES",
    "PackedBatch",
    "ResolvedHook",
    "capture_activations",
    "context_layout",
    "find_blocks",
    "is_causal_lm",
    "load_documents",
    "load_model",
    "pack_documents",
    "peek_documents",
    "resolve_hook",
    "resolve_model_path",
    "special_token_mask",
    "valid_hook_points",
]
