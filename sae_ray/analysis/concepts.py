"""Concept tests: which latents fire selectively on a concept's tokens. No Ray.

A concept is a UTF-8 text file, one example per line (`jobs/concepts/*.txt`); every non-special
token of its lines belongs to the concept. The background is held-out buffer rows (documents no
SAE trained on). For each latent, "fires" (f > 0) is scored as a detector of "the token belongs to
the concept" over the union of both sets:

    rate_in   = share of concept tokens where it fires       (recall)
    rate_out  = share of background tokens where it fires
    precision = concept tokens where it fires / all tokens where it fires
    mean_ratio = mean activation on concept tokens / mean on the background

The concept's tokens and the background are weighted as they come (background rows usually
outnumber a concept's tokens, so precision is a strict test). Latents are ranked by F1 of
precision and recall.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from sae_ray.activations.hooks import ResolvedHook, capture_activations
from sae_ray.activations.text import context_layout, special_token_mask
from sae_ray.analysis.report import ConceptHit
from sae_ray.sae import SAE


def read_concepts(paths: list[str | Path]) -> dict[str, list[str]]:
    """{concept name (file stem): its non-empty lines} from files or directories of `*.txt`.
    ValueError naming the file for one that is missing, not UTF-8, or has no text."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise ValueError(f"concept directory {str(p)!r} holds no *.txt file")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"concept file {str(p)!r} does not exist")
    out: dict[str, list[str]] = {}
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"concept file {str(f)!r} is not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"concept file {str(f)!r} is empty: give one example text per line")
        if f.stem in out:
            raise ValueError(f"concept {f.stem!r} is given twice ({str(f)!r}); concept names are file names")
        out[f.stem] = lines
    return out


@torch.no_grad()
def concept_acts(model, tokenizer, hook: ResolvedHook, sae: SAE, texts: list[str], context_size: int,
                 batch_size: int = 16) -> Tensor:
    """[n_tokens, d_sae] the SAE's activations on every non-special token of `texts`, each text one
    context framed as the producers frame theirs (`context_layout`: e.g. BOS first), so its first
    token sits where a buffer row's would, not at position 0 (which many LMs treat apart)."""
    prefix, suffix, _ = context_layout(tokenizer)
    window = context_size - len(prefix) - len(suffix)
    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(texts), batch_size):
        rows = [prefix + ids[:window] + suffix for ids in
                tokenizer(texts[start:start + batch_size], add_special_tokens=False)["input_ids"]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        x = capture_activations(model, [hook], ids.to(device), mask.to(device))[hook.name]
        keep = (mask == 1) & ~torch.from_numpy(special_token_mask(tokenizer, ids.numpy()))
        parts.append(sae.encode(x.float().cpu()[keep]))
    return torch.cat(parts)


def rank_latents(concept: Tensor, background: Tensor, top: int = 10) -> list[ConceptHit]:
    """concept [n, d_sae], background [m, d_sae] activations -> the `top` latents by F1 of "fires"."""
    on_in, on_out = (concept > 0).float(), (background > 0).float()
    fires_in, fires_out = on_in.sum(0), on_out.sum(0)
    recall = fires_in / max(len(concept), 1)
    precision = fires_in / (fires_in + fires_out).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    mean_in, mean_out = concept.mean(0), background.mean(0)
    ratio = torch.where(mean_out > 0, mean_in / mean_out.clamp(min=1e-12), torch.where(mean_in > 0, float("inf"), 1.0))
    order = f1.argsort(descending=True)[:top]
    return [ConceptHit(latent=int(i), precision=float(precision[i]), recall=float(recall[i]), rate_in=float(recall[i]),
                       rate_out=float(fires_out[i] / max(len(background), 1)), mean_ratio=float(ratio[i]))
            for i in order if fires_in[i] > 0]


def concept_table(tables: dict[str, list[ConceptHit]], rows: int = 5) -> str:
    """The ranked tables as plain text."""
    lines = []
    for name, hits in tables.items():
        lines.append(f"{name}:")
        lines.append(f"  {'latent':>7} {'precision':>9} {'recall':>7} {'rate out':>9} {'mean ratio':>10}")
        for h in hits[:rows]:
            lines.append(f"  {h.latent:>7} {h.precision:>9.3f} {h.recall:>7.3f} {h.rate_out:>9.4f} {h.mean_ratio:>10.2f}")
        if not hits:
            lines.append("  (no latent fires on it)")
    return "\n".join(lines)
