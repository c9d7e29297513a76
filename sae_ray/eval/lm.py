"""LM-level evaluation: what happens to the model when an SAE replaces the activation at its
hook, on held-out documents. No Ray.

`evaluate_lm(model, hook, contexts, saes)` reads like this, one batch of contexts at a time:

  1. the clean forward pass: its logits (or, for an encoder, its mean-pooled last hidden
     state), and the activation x [B, T, d] at the hook, recorded unchanged;
  2. once per hook, not per SAE: the forward passes with x zero-ablated and mean-ablated at
     every spliced position (`mean`: the mean activation, given by the caller);
  3. per SAE: x̂ = decode(encode(x)) at the spliced positions (x is the same in every pass up
     to the hook, so the clean pass's x is the SAE's input), the forward pass with x replaced
     by x̂ there, and the reconstruction and sparsity sums;
  4. the sums turned into the figures below (`_finish`).

Transcoders (`input_hook` given; `hook` is then their output hook, e.g. the MLP's output): the
clean pass also records x_in at `input_hook` (e.g. the MLP's input; it comes before `hook`, so
it is the same in every pass), and x̂ = decode(encode(x_in), x_in) replaces the activation at
`hook`: the transcoder stands in for the MLP. The ablations zero / mean-ablate `hook` (the MLP's
output), so ce_loss_score is the CE loss recovered against the MLP zero-ablated (and
ce_loss_score_mean_ablation against its output mean-ablated); the reconstruction figures compare
x̂ with the clean activation at `hook`.

Spliced positions are the real, non-special tokens (`keep`: what the buffer stores); BOS,
CLS, SEP and padding keep their clean activation. Scored positions (causal LMs): position t
predicts token t+1, scored where token t+1 is kept.

The figures, named as SAEBench's core eval names them (and SAELens's `run_evals`):

- ce_loss_without_sae, ce_loss_with_sae, ce_loss_with_ablation (zero), ce_loss_with_mean_ablation:
  mean next-token cross-entropy in nats over the scored positions;
- ce_loss_score = (CE_ablation − CE_sae) / (CE_ablation − CE_clean): **CE loss recovered**
  (1: as good as the clean model, 0: as bad as zero ablation); ce_loss_score_mean_ablation the
  same against mean ablation; delta_lm_loss = CE_sae − CE_clean;
- kl_div_with_sae, kl_div_with_ablation: mean KL(p_clean ‖ p_spliced) of the next-token
  distribution; kl_div_score = (KL_ablation − KL_sae) / KL_ablation;
- explained_variance = 1 − Σ_j Var(x − x̂)_j / Σ_j Var(x)_j (SAEBench, dictionary_learning: the
  residual's own mean does not count against it); fvu (`eval.metrics.fvu` summed over all the
  batches: Σ‖x − x̂‖² / Σ‖x − x̄‖²); mse (mean of ‖x − x̂‖²); cossim (mean cos(x, x̂)); l2_ratio (mean
  ‖x̂‖ / ‖x‖); relative_reconstruction_bias = E‖x̂‖² / E⟨x, x̂⟩ (Rajamanoharan et al. 2024, eq. 10:
  below 1 the SAE shrinks its reconstructions);
- l0 (mean active latents per token), l1; per latent its firing frequency (`frequencies`);
  dead_fraction (fired on none of the tokens: frequency 0), dense_fraction (frequency above
  0.1), freq_over_1e-1 (the same share, by SAEBench's name) and freq_under_1e-5 (fired on
  fewer than 1 in 100,000 tokens; with fewer tokens than that it is the dead share);
- masked LMs (`...ForMaskedLM`, e.g. BERT with its MLM head): the same CE and KL figures, of
  the masked tokens: 15% of the kept tokens of each context [MASK]ed (seeded, the same in every
  pass), scored on the token they hid; the SAE replaces the other kept tokens' activations;
- encoders (no LM head): no next-token distribution, so embedding_cossim_with_sae and
  embedding_cossim_with_ablation (mean cosine of the mean-pooled last hidden state, spliced vs
  clean) and embedding_score = (cos_sae − cos_ablation) / (1 − cos_ablation) take the place of
  the CE and KL figures (`metrics_for` says which apply to which model kind).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_ray.activations.hooks import ResolvedHook
from sae_ray.activations.model import is_causal_lm, is_masked_lm
from sae_ray.activations.text import pack_documents
from sae_ray.buffer.split import held_out
from sae_ray.sae import SAE

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this share of tokens counts as dense (SAEBench's freq_over_1e-1)."""
RARE_FREQUENCY = 1e-5
"""A latent firing on fewer than this share counts as (nearly) never firing (SAEBench's freq_under_1e-5)."""

CAUSAL_METRICS = ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_with_mean_ablation",
                  "ce_loss_score", "ce_loss_score_mean_ablation", "delta_lm_loss",
                  "kl_div_with_sae", "kl_div_with_ablation", "kl_div_score")
ENCODER_METRICS = ("embedding_cossim_with_sae", "embedding_cossim_with_ablation", "embedding_score")
RECONSTRUCTION_METRICS = ("explained_variance", "fvu", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias",
                          "l0", "l1", "dead_fraction", "dense_fraction", "freq_over_1e-1", "freq_under_1e-5")
HEADLINE = ("ce_loss_score", "kl_div_score", "delta_lm_loss", "kl_div_with_sae", "embedding_score", "explained_variance",
            "absorption_mean_absorption_fraction_score", "absorption_mean_full_absorption_score")
"""The figures that go into the registry tags and the sweep summary (those that apply)."""


MODEL_KINDS = ("causal", "masked", "encoder")


def metrics_for(model_kind: str) -> tuple[str, ...]:
    """The figures `evaluate_lm` gives for a model kind (`model_kind`): the CE and KL figures
    for "causal" (next token) and "masked" (masked tokens), the embedding figures for "encoder"."""
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model kind {model_kind!r}: expected one of {MODEL_KINDS}")
    return (ENCODER_METRICS if model_kind == "encoder" else CAUSAL_METRICS) + RECONSTRUCTION_METRICS


def model_kind(model: nn.Module) -> str:
    """"causal" for a next-token head (`...ForCausalLM`, `...LMHeadModel`), "masked" for a
    masked-LM head (`...ForMaskedLM`), else "encoder" (no LM head: a bare encoder)."""
    if is_causal_lm(model.config):
        return "causal"
    if is_masked_lm(model.config):
        return "masked"
    return "encoder"


@dataclass
class EvalContexts:
    """Packed held-out contexts: input_ids, attention_mask, keep [N, T]; doc_index [N, T] (-1: padding)."""

    input_ids: Tensor
    attention_mask: Tensor
    keep: Tensor
    doc_index: Tensor

    @property
    def n_tokens(self) -> int:
        """Spliced positions: the kept (real, non-special) tokens."""
        return int(self.keep.sum())


def held_out_contexts(tokenizer, documents: Iterable[str], eval_fraction: float, context_size: int,
                      n_tokens: int) -> EvalContexts:
    """Contexts packed from the held-out documents only, until they hold `n_tokens` kept tokens
    (fewer if the documents run out; ValueError if none is held out).

    documents: the dataset's documents in the order producers read them (document i of this
    stream is the buffer's doc_index i); a document is held out exactly as `buffer.split` decides,
    so no token of these contexts was ever trained on. They are packed as the producers pack
    theirs (`pack_documents`), with doc_index counting the stream.
    """
    kept = ((i, doc) for i, doc in enumerate(documents) if held_out(np.array([i]), eval_fraction)[0])
    index: list[int] = []

    def texts() -> Iterator[str]:
        for i, doc in kept:
            index.append(i)
            yield doc

    parts, have = [], 0
    for batch in pack_documents(tokenizer, texts(), context_size, batch_size=8):
        rows = {k: torch.from_numpy(np.ascontiguousarray(getattr(batch, k))) for k in ("input_ids", "attention_mask", "keep")}
        local = batch.doc_index
        rows["doc_index"] = torch.from_numpy(np.where(local >= 0, np.asarray(index + [-1])[np.clip(local, 0, None)], -1))
        parts.append(rows)
        have += int(batch.keep.sum())
        if have >= n_tokens:
            break
    if not parts:
        raise ValueError(f"no held-out document (eval_fraction {eval_fraction}) among the documents given: "
                         "nothing to evaluate on; give more documents or raise buffer.eval_fraction")
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return EvalContexts(cat["input_ids"], cat["attention_mask"], cat["keep"].bool(), cat["doc_index"])


@contextmanager
def splice(model: nn.Module, hook: ResolvedHook, fn: Callable[[Tensor], Tensor]):
    """Within the block, `fn(x)` [B, T, d] -> [B, T, d] replaces the activation x at `hook` in
    every forward pass of `model` (the module's output, or its hidden-states input for
    `capture == "input"`)."""
    module = model.get_submodule(hook.module_path)
    if hook.capture == "output":
        def on_output(mod, args, output):
            if isinstance(output, Tensor):
                return fn(output)
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            raise TypeError(f"hook {hook.name!r}: {hook.module_path!r} returns {type(output).__name__}; cannot splice it")

        handle = module.register_forward_hook(on_output)
    else:
        def on_input(mod, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _Sums:
    """Running sums of one spliced variant (an ablation or an SAE) over the batches."""

    def __init__(self):
        self.ce = self.kl = self.cos_embed = 0.0


class _SAESums(_Sums):
    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.sq_err = self.sq_dev = self.cossim = self.l2_ratio = self.hat_sq = self.dot = self.active = self.l1 = 0.0
        self.res_sum = torch.zeros(d_in, dtype=torch.float64)
        self.res_sq = torch.zeros(d_in, dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.float64)


@torch.no_grad()
def evaluate_lm(model: nn.Module, hook: ResolvedHook, contexts: EvalContexts, saes: list[SAE], mean: Tensor,
                batch_size: int = 8, log: Callable[[str], None] | None = None,
                mask_token_id: int | None = None,
                input_hook: ResolvedHook | None = None) -> tuple[dict[str, float], list[dict]]:
    """The figures of the module docstring for each SAE of `saes` (each taking the activation at
    `hook`) on `contexts`. mean [d]: the activation mean-ablation puts in (at `hook`). mask_token_id:
    the tokenizer's [MASK] (masked LMs only, which it must be given for). input_hook: for
    transcoders (every one of `saes`), the hook they read; they replace the activation at `hook`.

    Returns (reference, per_sae): reference holds what does not depend on an SAE (clean and
    ablated CE and KL, tokens, seconds of the shared passes); per_sae one dict per SAE with its
    figures, `frequencies` (a [d_sae] float tensor) and `seconds` (its own passes).
    """
    kind = model_kind(model)
    if any(s.cfg.is_transcoder != (input_hook is not None) for s in saes):
        raise ValueError("evaluate_lm: give input_hook exactly when every SAE is a transcoder "
                         f"(input_hook {None if input_hook is None else input_hook.name!r}; "
                         f"transcoders: {[s.cfg.is_transcoder for s in saes]})")
    if kind == "masked" and mask_token_id is None:
        raise ValueError("evaluate_lm: a masked LM needs mask_token_id (the tokenizer's [MASK] id)")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    d_in = mean.shape[-1]
    mean = mean.to(device, dtype)
    ablations = {"zero": _Sums(), "mean": _Sums()}
    sums = [_SAESums(d_in, s.cfg.d_sae) for s in saes]
    seconds = [0.0] * len(saes)
    shared_seconds, scored, spliced, n_contexts, clean_ce_total = 0.0, 0, 0, len(contexts.input_ids), 0.0
    x_sum, x_sq = torch.zeros(d_in, dtype=torch.float64), torch.zeros(d_in, dtype=torch.float64)
    for s in saes:
        s.eval()
    began = time.perf_counter()
    for start in range(0, n_contexts, batch_size):
        t0 = time.perf_counter()
        ids = contexts.input_ids[start:start + batch_size].to(device)
        mask = contexts.attention_mask[start:start + batch_size].to(device)
        keep = contexts.keep[start:start + batch_size].to(device)
        labels = None  # [n_scored] the token each scored position is scored on
        if kind == "causal":  # position t scored on token t+1 where that one is kept
            target = torch.zeros_like(keep)
            target[:, :-1] = keep[:, 1:]
            labels = ids[:, 1:][keep[:, 1:]]
        elif kind == "masked":  # MASKED_SHARE of the kept tokens, [MASK]ed (seeded by the batch), scored on themselves
            target = _masked_positions(keep, start)
            labels = ids[target]
            ids = ids.masked_fill(target, mask_token_id)
            keep = keep & ~target  # the SAE replaces real tokens only, never [MASK]
        recorded: dict[str, Tensor] = {}

        def record(x: Tensor, key: str = "x") -> Tensor:
            recorded[key] = x
            return x

        def run(fn: Callable[[Tensor], Tensor]) -> Tensor:
            """The model's output with `fn` at the hook: log-probs at the scored positions
            [n_scored, V] (causal, masked), or the mean-pooled last hidden state [B, h] (encoder)."""
            with splice(model, hook, fn):
                out = model(input_ids=ids, attention_mask=mask, use_cache=False) if kind == "causal" \
                    else model(input_ids=ids, attention_mask=mask)
            if kind != "encoder":
                return F.log_softmax(out.logits[target].float(), dim=-1)
            h = out.last_hidden_state.float()
            m = mask.unsqueeze(-1).float()
            return (h * m).sum(1) / m.sum(1).clamp_min(1)

        def replace_kept(x: Tensor, value: Tensor) -> Tensor:
            x = x.clone()
            x[keep] = value.to(x.dtype)
            return x

        if input_hook is None:
            clean = run(record)
        else:  # a transcoder's input, recorded in the clean pass (it comes before the hook)
            with splice(model, input_hook, lambda a: record(a, "x_in")):
                clean = run(record)
        x = recorded["x"][keep].float()  # [n, d] the SAE's input and target (a transcoder's target)
        x_in = x if input_hook is None else recorded["x_in"][keep].float()
        if kind != "encoder":
            clean_ce_total += -clean.gather(-1, labels.unsqueeze(-1)).sum().item()
            scored += len(labels)
            p_clean = clean.exp()  # once per batch: every variant's KL weighs by it
        spliced += len(x)
        x_sum += x.sum(0).double().cpu()
        x_sq += x.pow(2).sum(0).double().cpu()

        def score(out: Tensor, into: _Sums) -> None:
            if kind != "encoder":
                into.ce += -out.gather(-1, labels.unsqueeze(-1)).sum().item()
                into.kl += (p_clean * (clean - out)).sum().item()
            else:
                into.cos_embed += F.cosine_similarity(out, clean, dim=-1).sum().item()

        score(run(lambda a: replace_kept(a, torch.zeros_like(a[keep]))), ablations["zero"])
        score(run(lambda a: replace_kept(a, mean.expand(int(keep.sum()), -1))), ablations["mean"])
        shared_seconds += time.perf_counter() - t0

        for i, sae in enumerate(saes):
            t1 = time.perf_counter()
            p = next(sae.parameters())
            xi = x_in.to(p.device, p.dtype)
            f = sae.encode(xi)
            x_hat = sae.decode(f, xi).float().to(x.device)
            score(run(lambda a, v=x_hat: replace_kept(a, v)), sums[i])
            acc = sums[i]
            err = x - x_hat
            acc.sq_err += err.pow(2).sum().item()
            acc.res_sum += err.sum(0).double().cpu()
            acc.res_sq += err.pow(2).sum(0).double().cpu()
            acc.cossim += F.cosine_similarity(x_hat, x, dim=-1).sum().item()
            acc.l2_ratio += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-8)).sum().item()
            acc.hat_sq += x_hat.pow(2).sum().item()
            acc.dot += (x * x_hat).sum().item()
            active = (f != 0)
            acc.active += active.sum().item()
            acc.l1 += f.float().abs().sum().item()
            acc.fired += active.sum(0).double().cpu()
            seconds[i] += time.perf_counter() - t1
        done = min(start + batch_size, n_contexts)
        if log and (done == n_contexts or (start // batch_size + 1) % max(1, n_contexts // batch_size // 10) == 0):
            log(f"LM evaluation {done}/{n_contexts} contexts, {time.perf_counter() - began:.0f} s")

    x_mean = x_sum / spliced
    total_sq_dev = (x_sq - spliced * x_mean.pow(2)).sum().item()  # Σ‖x − x̄‖²
    reference = {"tokens": spliced, "contexts": n_contexts, "shared_seconds": shared_seconds}
    if kind != "encoder":
        reference.update(scored_tokens=scored, ce_loss_without_sae=clean_ce_total / scored,
                         ce_loss_with_ablation=ablations["zero"].ce / scored,
                         ce_loss_with_mean_ablation=ablations["mean"].ce / scored,
                         kl_div_with_ablation=ablations["zero"].kl / scored,
                         kl_div_with_mean_ablation=ablations["mean"].kl / scored)
    else:
        reference.update(embedding_cossim_with_ablation=ablations["zero"].cos_embed / n_contexts)
    per_sae = [_finish(acc, reference, kind, spliced, scored, n_contexts, total_sq_dev) | {"seconds": s}
               for acc, s in zip(sums, seconds)]
    return reference, per_sae


MASKED_SHARE = 0.15
"""Share of a masked LM's kept tokens that are [MASK]ed and scored (BERT's 15%)."""


def _masked_positions(keep: Tensor, seed: int) -> Tensor:
    """bool like keep [B, T]: MASKED_SHARE of the kept positions (at least one per row with any),
    drawn with `seed`, so every variant of one batch scores the same positions."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(keep.shape, generator=g).to(keep.device)
    u = torch.where(keep, u, torch.full_like(u, 2.0))
    n = (keep.sum(1) * MASKED_SHARE).ceil().long()  # per row
    order = u.argsort(1).argsort(1)  # rank of each position's draw in its row
    return keep & (order < n.unsqueeze(1))


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def _finish(acc: _SAESums, ref: dict, kind: str, n: int, scored: int, n_contexts: int, total_sq_dev: float) -> dict:
    """One SAE's figures from its sums (see the module docstring)."""
    res_var = (acc.res_sq - acc.res_sum.pow(2) / n).sum().item()  # Σ_j n·Var(x − x̂)_j
    frequencies = (acc.fired / n).float()
    out: dict = {
        "explained_variance": 1 - _ratio(res_var, total_sq_dev),
        "fvu": _ratio(acc.sq_err, total_sq_dev),
        "mse": acc.sq_err / n,
        "cossim": acc.cossim / n,
        "l2_ratio": acc.l2_ratio / n,
        "relative_reconstruction_bias": _ratio(acc.hat_sq, acc.dot),
        "l0": acc.active / n,
        "l1": acc.l1 / n,
        "dead_fraction": (frequencies == 0).float().mean().item(),
        "dense_fraction": (frequencies > DENSE_FREQUENCY).float().mean().item(),
        "freq_over_1e-1": (frequencies > DENSE_FREQUENCY).float().mean().item(),
        "freq_under_1e-5": (frequencies < RARE_FREQUENCY).float().mean().item(),
        "frequencies": frequencies,
    }
    if kind != "encoder":
        ce_sae, kl_sae = acc.ce / scored, acc.kl / scored
        ce_clean, ce_abl, ce_mean = ref["ce_loss_without_sae"], ref["ce_loss_with_ablation"], ref["ce_loss_with_mean_ablation"]
        out.update(ce_loss_without_sae=ce_clean, ce_loss_with_sae=ce_sae, ce_loss_with_ablation=ce_abl,
                   ce_loss_with_mean_ablation=ce_mean,
                   ce_loss_score=_ratio(ce_abl - ce_sae, ce_abl - ce_clean),
                   ce_loss_score_mean_ablation=_ratio(ce_mean - ce_sae, ce_mean - ce_clean),
                   delta_lm_loss=ce_sae - ce_clean, kl_div_with_sae=kl_sae,
                   kl_div_with_ablation=ref["kl_div_with_ablation"],
                   kl_div_score=_ratio(ref["kl_div_with_ablation"] - kl_sae, ref["kl_div_with_ablation"]))
    else:
        cos_sae, cos_abl = acc.cos_embed / n_contexts, ref["embedding_cossim_with_ablation"]
        out.update(embedding_cossim_with_sae=cos_sae, embedding_cossim_with_ablation=cos_abl,
                   embedding_score=_ratio(cos_sae - cos_abl, 1 - cos_abl))
    return out


def activation_mean(model: nn.Module, hook: ResolvedHook, contexts: EvalContexts, batch_size: int = 8) -> Tensor:
    """float32 [d]: the mean activation at `hook` over the kept positions of `contexts` (a pass
    that stops at the hook: `capture_activations`)."""
    from sae_ray.activations.hooks import capture_activations

    total, n = None, 0
    for start in range(0, len(contexts.input_ids), batch_size):
        keep = contexts.keep[start:start + batch_size]
        acts = capture_activations(model, [hook], contexts.input_ids[start:start + batch_size],
                                   contexts.attention_mask[start:start + batch_size])[hook.name]
        rows = acts[keep.to(acts.device)].float()
        total = rows.sum(0) if total is None else total + rows.sum(0)
        n += len(rows)
    return (total / max(n, 1)).cpu()


def plot_log_density(frequencies: Tensor, path, title: str = "latent firing frequency") -> None:
    """A histogram of log10 firing frequency over latents (never-firing latents in a bar at the
    left edge, labelled), saved as a PNG: the feature-density plot of SAELens and Anthropic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freq = frequencies.double().numpy()
    never = int((freq == 0).sum())
    floor = math.log10(max(freq[freq > 0].min(), 1e-8)) - 0.5 if (freq > 0).any() else -8
    logs = np.where(freq > 0, np.log10(np.clip(freq, 1e-12, None)), floor)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(logs, bins=60, color="tab:blue")
    ax.set(xlabel="log10 firing frequency", ylabel="latents", title=f"{title} ({never} never fired)")
    ax.axvline(math.log10(DENSE_FREQUENCY), linestyle=":", color="red", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
