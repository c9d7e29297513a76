"""What `sae-ray analyze` leaves behind, and how the dashboard and exports read it. No Ray.

An analysis is a directory (logged under `analysis/` in the SAE's MLflow run):

    meta.json              AnalysisMeta: which SAE, model, hook and rows; the settings of the pass
    stats.safetensors      per latent i (d_sae rows):
                             frequency [d_sae] f32      share of the rows where latent i fired (f > 0)
                             mean_act [d_sae] f32       mean activation over the rows where it fired
                             max_act [d_sae] f32        largest activation (0: never fired)
                             hist_counts [d_sae, H] i64 firing rows per activation bin (hist_edges)
                             hist_edges [H + 1] f32     bin edges, log-spaced, shared by every latent
    contexts.safetensors   per latent, `top` (the k largest activations, largest first) and `sample`
                           (a uniform sample of the rows where it fired, sorted by activation):
                             <kind>_values [d_sae, n] f32   activation at the centre (NaN: empty slot)
                             <kind>_rows [d_sae, n] i64     global buffer row of the centre (-1: empty)
                             <kind>_tokens [d_sae, n, W] i32  token ids of the window (-1: outside the text)
                             <kind>_acts [d_sae, n, W] f16  the latent's activation at each token of the
                                                            window (NaN: no buffer row, e.g. a special token)
                           W = 2 * window + 1; the centre is at index `window`.
    vocab.json             {token id: its text} for every id in the contexts
    lens.safetensors       (causal LMs) logit lens: promoted_ids / promoted_values and
                           suppressed_ids / suppressed_values, [d_sae, m]
    concepts.json          (optional) `sae-ray concepts` tables: {concept: [ConceptHit as dict]}

`Analysis.open(dir)` reads it; `analysis.latent(i)` gives one latent's LatentReport, all a
dashboard page or an export needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

KINDS = ("top", "sample")
"""The context kinds of contexts.safetensors."""


@dataclass
class AnalysisMeta:
    """meta.json: what was analysed, and how."""

    sae: str
    """The reference the SAE was loaded from (models:/NAME/VERSION or a path)."""
    model: str
    """The model name or path, as in the run config."""
    hook: str
    """The hook name the SAE reads, e.g. blocks.3.hook_resid_post."""
    d_in: int
    d_sae: int
    architecture: str
    split: str
    """Which buffer rows were encoded: "eval" (the held-out documents) or "all"."""
    rows: int
    """Rows encoded."""
    top_k: int
    """Top contexts kept per latent."""
    samples: int
    """Sampled contexts kept per latent (for the quantile view)."""
    window: int
    """Tokens on each side of a context's centre."""
    run_id: str | None = None
    """The SAE's MLflow run, when it came from the registry."""
    registry: str | None = None
    """NAME/VERSION in the model registry, when it came from there."""
    tracking_uri: str | None = None
    """The MLflow store of run_id and registry."""
    model_kind: str = "causal"
    """"causal", "masked" or "encoder" (sae_ray.eval.lm): logit lens and steering need "causal"."""
    seconds: float = 0.0
    """Wall time of the pass."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AnalysisMeta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Context:
    """One context of a latent: a window of tokens around the row it is about."""

    tokens: list[str]
    """The window's token texts (tokens outside the text left out)."""
    acts: list[float | None]
    """The latent's activation at each token (None where the buffer has no row: special tokens)."""
    centre: int
    """Index in `tokens` of the row this context is about."""
    value: float
    """The activation at the centre."""
    row: int
    """The centre's global buffer row."""


@dataclass
class ConceptHit:
    """How selectively one latent fires on one concept's tokens (sae_ray.analysis.concepts)."""

    latent: int
    precision: float
    """Of the tokens where the latent fires, the share that belong to the concept."""
    recall: float
    """Of the concept's tokens, the share where the latent fires."""
    rate_in: float
    """Firing rate on the concept's tokens."""
    rate_out: float
    """Firing rate on the background's tokens."""
    mean_ratio: float
    """Mean activation on the concept's tokens over its mean on the background (inf: 0 there)."""


@dataclass
class LatentReport:
    """Everything known about one latent: what a dashboard page shows."""

    index: int
    frequency: float
    mean_act: float
    max_act: float
    hist_edges: list[float]
    hist_counts: list[int]
    top: list[Context]
    """The largest activations, largest first."""
    quantiles: list[tuple[str, list[Context]]]
    """The sample split into activation intervals, highest first: (label, contexts)."""
    promoted: list[tuple[str, float]] = field(default_factory=list)
    """Logit lens: the tokens its decoder direction raises most, with the logit change (causal LMs)."""
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    """Logit lens: the tokens it lowers most."""
    concepts: list[tuple[str, ConceptHit]] = field(default_factory=list)
    """Concepts it is among the most selective latents for: (concept name, its figures)."""


QUANTILE_BINS = 4
"""Intervals of the quantile view: the sample split by activation into this many equal-count groups."""


class Analysis:
    """An analysis directory, read. `meta`, `stats` and `contexts` hold the files' tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.path / "meta.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{self.path}: not an analysis directory (no meta.json); "
                                    "make one with sae-ray analyze")
        self.meta = AnalysisMeta.from_json(json.loads(meta.read_text()))
        self.stats = load_file(str(self.path / "stats.safetensors"))
        self.contexts = load_file(str(self.path / "contexts.safetensors"))
        self.vocab = {int(k): v for k, v in json.loads((self.path / "vocab.json").read_text()).items()}
        lens = self.path / "lens.safetensors"
        self.lens = load_file(str(lens)) if lens.is_file() else None
        concepts = self.path / "concepts.json"
        self.concepts: dict[str, list[ConceptHit]] = {}
        if concepts.is_file():
            self.concepts = {name: [ConceptHit(**h) for h in hits]
                             for name, hits in json.loads(concepts.read_text()).items()}

    @classmethod
    def open(cls, path: str | Path) -> Analysis:
        return cls(path)

    @property
    def d_sae(self) -> int:
        return self.meta.d_sae

    def check_latent(self, i: int) -> int:
        """`i` as an int in 0..d_sae-1; ValueError naming the range otherwise."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.d_sae:
            raise ValueError(f"latent {i!r} is out of range: this SAE has latents 0..{self.d_sae - 1}")
        return i

    def _contexts(self, kind: str, i: int) -> list[Context]:
        values = self.contexts[f"{kind}_values"][i]
        rows = self.contexts[f"{kind}_rows"][i]
        tokens = self.contexts[f"{kind}_tokens"][i]
        acts = self.contexts[f"{kind}_acts"][i].float()
        window = self.meta.window
        out = []
        for j in range(len(values)):
            if int(rows[j]) < 0:
                continue
            keep = [w for w in range(tokens.shape[1]) if int(tokens[j, w]) >= 0]
            out.append(Context(
                tokens=[self.vocab.get(int(tokens[j, w]), "") for w in keep],
                acts=[None if math.isnan(float(acts[j, w])) else float(acts[j, w]) for w in keep],
                centre=keep.index(window), value=float(values[j]), row=int(rows[j])))
        return out

    def latent(self, i: int) -> LatentReport:
        """The report of latent `i` (ValueError when out of range)."""
        i = self.check_latent(i)
        s = self.stats
        sample = self._contexts("sample", i)
        quantiles = []
        if sample:
            ordered = sorted(sample, key=lambda c: -c.value)
            n = len(ordered)
            for q in range(QUANTILE_BINS):
                part = ordered[q * n // QUANTILE_BINS:(q + 1) * n // QUANTILE_BINS]
                if part:
                    quantiles.append((f"interval {q + 1}/{QUANTILE_BINS}: {part[-1].value:.3g} to {part[0].value:.3g}", part))
        promoted, suppressed = [], []
        if self.lens is not None:
            promoted = [(self.vocab.get(int(t), str(int(t))), float(v))
                        for t, v in zip(self.lens["promoted_ids"][i], self.lens["promoted_values"][i])]
            suppressed = [(self.vocab.get(int(t), str(int(t))), float(v))
                          for t, v in zip(self.lens["suppressed_ids"][i], self.lens["suppressed_values"][i])]
        concepts = [(name, h) for name, hits in self.concepts.items() for h in hits if h.latent == i]
        return LatentReport(
            index=i, frequency=float(s["frequency"][i]), mean_act=float(s["mean_act"][i]),
            max_act=float(s["max_act"][i]), hist_edges=[float(v) for v in s["hist_edges"]],
            hist_counts=[int(v) for v in s["hist_counts"][i]], top=self._contexts("top", i),
            quantiles=quantiles, promoted=promoted, suppressed=suppressed, concepts=concepts)


def write_concepts(path: str | Path, tables: dict[str, list[ConceptHit]]) -> None:
    """concepts.json of an analysis directory."""
    Path(path, "concepts.json").write_text(json.dumps({k: [asdict(h) for h in v] for k, v in tables.items()}, indent=1))


def empty_contexts(d_sae: int, n: int, width: int, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of one context kind with every slot empty (what a writer fills)."""
    return {f"{kind}_values": torch.full((d_sae, n), float("nan")),
            f"{kind}_rows": torch.full((d_sae, n), -1, dtype=torch.int64),
            f"{kind}_tokens": torch.full((d_sae, n, width), -1, dtype=torch.int32),
            f"{kind}_acts": torch.full((d_sae, n, width), float("nan"), dtype=torch.float16)}


def write_analysis(path: str | Path, meta: AnalysisMeta, stats: dict[str, torch.Tensor],
                   contexts: dict[str, torch.Tensor], vocab: dict[int, str],
                   lens: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an analysis directory (the layout of this module's docstring); returns its path."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps(meta.to_json(), indent=1))
    save_file({k: v.contiguous() for k, v in stats.items()}, str(out / "stats.safetensors"))
    save_file({k: v.contiguous() for k, v in contexts.items()}, str(out / "contexts.safetensors"))
    (out / "vocab.json").write_text(json.dumps({str(k): v for k, v in sorted(vocab.items())}, ensure_ascii=False))
    if lens is not None:
        save_file({k: v.contiguous() for k, v in lens.items()}, str(out / "lens.safetensors"))
    return out
