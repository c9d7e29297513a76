"""What a latent does to a causal LM's output: the logit lens and steering. No Ray.

Logit lens: latent i writes W_dec[i] [d_in] into the residual stream; read straight through the
unembedding W_U [vocab, d_in], with the elementwise weight of the model's final norm folded in
(the norm's scaling by 1/rms is the same for every token, so the ranking does not depend on it),

    logit change of token t per unit activation = sum_d W_dec[i, d] * gamma[d] * W_U[t, d]

and the tokens with the largest and smallest change are what the latent promotes and suppresses.

Steering: `steer(model, hook, direction, strength)` adds strength * direction to the activation
at the hook at every position of every forward pass inside the block (generate calls included);
with `clamp=(sae, latent, value)` instead, the latent's activation is set to `value` through the
SAE: x + (value - f_latent(x)) * W_dec[latent], which leaves the SAE's error term untouched.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sae_ray.activations.hooks import ResolvedHook
from sae_ray.eval.lm import model_kind, splice
from sae_ray.sae import SAE

FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
               "model.decoder.final_layer_norm")
"""Where causal LMs in transformers keep the norm before the unembedding (Llama/Mistral/Qwen,
GPT-2, GPT-NeoX, Phi, OPT)."""


def require_causal(model: nn.Module, what: str) -> None:
    """ValueError unless `model` has a next-token head."""
    kind = model_kind(model)
    if kind != "causal":
        raise ValueError(f"{what} needs a causal LM (a next-token head); {type(model).__name__} is a {kind} model")


def final_norm_weight(model: nn.Module) -> Tensor | None:
    """[d_model] the elementwise weight of the final norm, or None when the model has none we know."""
    for path in FINAL_NORMS:
        try:
            norm = model.get_submodule(path)
        except AttributeError:
            continue
        weight = getattr(norm, "weight", None)
        if isinstance(weight, Tensor):
            return weight.detach().float()
    return None


@torch.no_grad()
def logit_lens(model: nn.Module, sae: SAE, top: int = 10, chunk: int = 1024) -> dict[str, Tensor]:
    """Per latent the `top` promoted and suppressed token ids and their logit change per unit
    activation: promoted_ids, promoted_values, suppressed_ids, suppressed_values, each [d_sae, top]."""
    require_causal(model, "the logit lens")
    unembed = model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    if unembed.shape[1] != sae.cfg.d_target:  # the decoder's space: a transcoder's output, e.g. mlp_out
        raise ValueError(f"logit lens: the SAE's decoder width {sae.cfg.d_target} is not the model's width {unembed.shape[1]}")
    gamma = final_norm_weight(model)
    W = unembed * gamma if gamma is not None else unembed
    W_dec = sae.W_dec.detach().float().to(W.device)
    parts = {k: [] for k in ("promoted_ids", "promoted_values", "suppressed_ids", "suppressed_values")}
    for start in range(0, W_dec.shape[0], chunk):
        logits = W_dec[start:start + chunk] @ W.T  # [chunk, vocab]
        hi, lo = logits.topk(top, dim=1), logits.topk(top, dim=1, largest=False)
        parts["promoted_ids"].append(hi.indices.int())
        parts["promoted_values"].append(hi.values)
        parts["suppressed_ids"].append(lo.indices.int())
        parts["suppressed_values"].append(lo.values)
    return {k: torch.cat(v).cpu() for k, v in parts.items()}


@contextmanager
def steer(model: nn.Module, hook: ResolvedHook, direction: Tensor | None = None, strength: float = 0.0,
          clamp: tuple[SAE, int, float] | None = None):
    """Within the block, every forward pass of `model` adds strength * direction [d_in] to the
    activation at `hook` (or, with clamp=(sae, latent, value), sets that latent to value)."""
    if (direction is None) == (clamp is None):
        raise ValueError("steer: give a direction with a strength, or clamp=(sae, latent, value)")
    if clamp is None:
        add = (strength * direction.detach()).float()

        def fn(x: Tensor) -> Tensor:
            return x + add.to(x.device, x.dtype)
    else:
        sae, latent, value = clamp
        w = sae.W_dec[latent].detach().float()

        def fn(x: Tensor) -> Tensor:
            f = sae.encode(x.float().reshape(-1, x.shape[-1]))[:, latent].reshape(*x.shape[:-1], 1)
            return x + ((value - f) * w.to(x.device)).to(x.dtype)
    with splice(model, hook, fn):
        yield


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 30, seed: int = 0,
             temperature: float = 0.0) -> str:
    """The continuation of `prompt` (greedy at temperature 0, else sampled with `seed`)."""
    ids = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=sample,
                         **({"temperature": temperature} if sample else {}), pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
