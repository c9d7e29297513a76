"""`sae-ray analyze / dashboard / steer / concepts / export neuronpedia`: the analysis commands.

`analyze` is the pass over the buffer:

1. Check, before any pass: the buffer exists and holds the SAE's hook at the SAE's width, and
   was made from the config's model (its fingerprint), which is the model the SAE records.
2. Statistics: one Ray task per shard encodes the rows of the split (held-out by default) and
   keeps bounded per-latent statistics (`features.shard_stats`); the driver merges them.
3. Contexts: the rows of every latent's top and sampled activations are placed in their
   producer's row stream (`contexts.StreamMap`) and their windows rebuilt by replaying that
   producer's packing of the corpus (`contexts.rebuild_contexts`); the activations of the latent
   at the window's other rows are computed by one Ray task per shard touched
   (`features.latent_values`).
4. Logit lens (causal LMs): `lens.logit_lens`.
5. Write the analysis directory (`report.write_analysis`) and, for a registered SAE, log it as
   the `analysis/` artifacts of the SAE's MLflow run.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sae_ray.analysis.report import Analysis, AnalysisMeta, empty_contexts, write_analysis
from sae_ray.config import ConfigError, RunConfig

ANALYSIS_ARTIFACT = "analysis"
"""Where an SAE's MLflow run keeps its analysis directory."""


def documents(cfg: RunConfig) -> Callable[[], object]:
    """A function giving the config's documents in the producers' order (a fresh iterator per call)."""
    from sae_ray.activations.corpus import resolve_dataset_path
    from sae_ray.activations.text import load_documents

    d = cfg.data

    def docs():
        it = load_documents(resolve_dataset_path(d.path, cfg.workdir_path()), d.text_column, d.split, d.name,
                            streaming=d.streaming, trust_remote_code=cfg.model.trust_remote_code)
        return itertools.islice(it, d.max_documents)
    return docs


def open_buffer(cfg: RunConfig, sae, hook: str):
    """The config's buffer, checked against the SAE (ConfigError naming what differs)."""
    from sae_ray.buffer import ActivationBuffer

    path = cfg.buffer_path()
    if not Path(path, "zarr.json").is_file() and "://" not in path:
        raise ConfigError([f"buffer.path: no buffer at {path!r}; produce it with `sae-ray cache CONFIG`"])
    buffer = ActivationBuffer.open(path)
    problems = []
    if hook not in buffer.hooks:
        problems.append(f"hook {hook!r}: the buffer at {path!r} holds {sorted(buffer.hooks)}")
    elif buffer.hooks[hook] != sae.cfg.d_in:
        problems.append(f"the SAE reads d_in {sae.cfg.d_in}, but {hook} in the buffer at {path!r} is {buffer.hooks[hook]} wide")
    made_from = buffer.fingerprint.get("model")
    if made_from != cfg.model.name:
        problems.append(f"model.name: the config names {cfg.model.name!r}, but the buffer at {path!r} was made from {made_from!r}")
    if sae.cfg.model_name and sae.cfg.model_name != made_from:
        problems.append(f"the SAE was trained on {sae.cfg.model_name!r}, but the buffer at {path!r} was made from {made_from!r}")
    if sae.cfg.hook_name and sae.cfg.hook_name != hook:
        problems.append(f"the SAE reads {sae.cfg.hook_name!r}, not {hook!r}")
    if problems:
        raise ConfigError(problems, "sae-ray analyze")
    return buffer


def _tokens(buffer, rows: np.ndarray) -> np.ndarray:
    """[n] stored token ids of global rows."""
    out = np.zeros(len(rows), np.int64)
    shard_of = rows // buffer.shard_rows
    for s in sorted(set(shard_of.tolist())):
        at = np.flatnonzero(shard_of == s)
        out[at] = buffer.read_column("tokens", s)[rows[at] - s * buffer.shard_rows]
    return out


def analyze(cfg: RunConfig, sae, hook: str, out: str | Path, split: str = "eval", top_k: int = 20, samples: int = 40,
            window: int = 8, workers: int = 1, ref: str = "", run_id: str | None = None, registry: str | None = None,
            log: Callable[[str], None] = print) -> Path:
    """Steps 1-5 of the module docstring (step 5's logging is `analyze_ref`'s); returns the directory."""
    from transformers import AutoConfig, AutoTokenizer

    from sae_ray.activations.model import is_causal_lm, is_masked_lm, resolve_model_path
    from sae_ray.actors.analyzer import analyze_shards, values_at
    from sae_ray.analysis.contexts import StreamMap, rebuild_contexts
    from sae_ray.analysis.features import SPLITS
    from sae_ray.sweep.production import connect_ray

    if split not in SPLITS:
        raise ConfigError([f"--split: {split!r}; accepted: {', '.join(SPLITS)}"], "sae-ray analyze")
    for name, v, low in (("--top-k", top_k, 1), ("--samples", samples, 1), ("--window", window, 0), ("--workers", workers, 1)):
        if v < low:
            raise ConfigError([f"{name}: {v}; must be at least {low}"], "sae-ray analyze")
    if sae.n_stack is not None:
        raise ValueError("analyze: the SAE is a stack; analyze its members (sae.unstack())")
    buffer = open_buffer(cfg, sae, hook)
    start = time.perf_counter()
    model_path = resolve_model_path(cfg.model.name)
    config = AutoConfig.from_pretrained(model_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    connect_ray(cfg)
    sae = sae.cpu().eval()

    stats = analyze_shards(sae, buffer, hook, split, top_k, samples, workers, seed=cfg.train.seed)
    if stats.rows == 0:
        raise ValueError(f"analyze: the buffer at {buffer.path!r} has no {split} rows")
    log(f"{stats.rows:,} rows encoded; {int((stats.fired > 0).sum())} of {sae.cfg.d_sae} latents fired")

    # contexts: the centre rows of both kinds, their windows, then the window rows' activations
    kinds = {"top": (stats.top_values, stats.top_rows), "sample": (stats.sample_values, stats.sample_rows)}
    order = stats.sample_values.argsort(dim=1, descending=True)  # the sample is kept by random key: sort it by activation
    kinds["sample"] = (stats.sample_values.gather(1, order), stats.sample_rows.gather(1, order))
    width = 2 * window + 1
    contexts = {}
    centre_rows, slots = [], []
    for kind, (values, rows) in kinds.items():
        t = empty_contexts(sae.cfg.d_sae, rows.shape[1], width, kind)
        valid = rows >= 0
        t[f"{kind}_values"][valid] = values[valid].float()
        t[f"{kind}_rows"][valid] = rows[valid]
        contexts.update(t)
        latent, slot = valid.nonzero(as_tuple=True)
        centre_rows.append(rows[valid].numpy())
        slots += [(kind, int(i), int(j)) for i, j in zip(latent, slot)]
    centre = np.concatenate(centre_rows)
    world = int(buffer.production().get("producers", cfg.producers.count))
    streams = StreamMap(buffer, world, cfg.train.seed)
    try:
        rebuilt = rebuild_contexts(tokenizer, documents(cfg), streams, cfg.data.context_size, centre,
                                   _tokens(buffer, centre), window)
    except ValueError as e:  # the config's data or producers are not the buffer's: the user's to fix
        raise ConfigError([f"data: {e}"], "sae-ray analyze") from None
    latents = np.repeat(np.array([i for _, i, _ in slots], dtype=np.int64), width)
    window_rows = rebuilt.rows.reshape(-1)
    acts = np.full(len(window_rows), np.nan, dtype=np.float32)
    have = window_rows >= 0
    acts[have] = values_at(sae, buffer, hook, window_rows[have], latents[have], workers)
    acts = acts.reshape(-1, width)
    for n, (kind, i, j) in enumerate(slots):
        contexts[f"{kind}_tokens"][i, j] = torch.from_numpy(rebuilt.tokens[n])
        contexts[f"{kind}_acts"][i, j] = torch.from_numpy(acts[n]).half()
    used = sorted(set(rebuilt.tokens[rebuilt.tokens >= 0].tolist()))

    kind = "causal" if is_causal_lm(config) else "masked" if is_masked_lm(config) else "encoder"
    lens = None
    if kind == "causal":
        from sae_ray.activations.model import load_model
        from sae_ray.analysis.lens import logit_lens

        model, _ = load_model(cfg.model.name, cfg.model.revision, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
        lens = logit_lens(model, sae)
        used = sorted(set(used) | set(lens["promoted_ids"].reshape(-1).tolist()) | set(lens["suppressed_ids"].reshape(-1).tolist()))
    vocab = {i: tokenizer.decode([i]) for i in used}
    seconds = time.perf_counter() - start
    meta = AnalysisMeta(sae=ref, model=cfg.model.name, hook=hook, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae,
                        architecture=sae.cfg.architecture, split=split, rows=stats.rows, top_k=top_k, samples=samples,
                        window=window, run_id=run_id, registry=registry, tracking_uri=None, model_kind=kind, seconds=seconds)
    path = write_analysis(out, meta, stats.summary(), contexts, vocab, lens)
    log(f"analysis of {stats.rows:,} rows in {seconds:.1f} s ({stats.rows / seconds:,.0f} rows/s, {workers} worker(s)); "
        f"written to {path}")
    return path


def analyze_ref(cfg: RunConfig, ref: str, out: str | Path | None = None, tracking_uri: str | None = None,
                log: Callable[[str], None] = print, **settings) -> Path:
    """`sae-ray analyze REF`: `analyze` the SAE of REF (a path or a registered version) at its own
    hook; a registered SAE's analysis is also logged in its MLflow run (artifacts `analysis/`)."""
    from sae_ray import tracking
    from sae_ray.eval.run import load_ref

    uri = tracking_uri or cfg.tracking_uri()
    client = tracking.client_for(uri)
    sae, version, label = load_ref(client, uri, ref, "sae-ray analyze")
    hook = sae.cfg.hook_name
    if not hook:
        raise ConfigError([f"the SAE of {ref!r} names no hook (its cfg hook_name is empty)"], "sae-ray analyze")
    out = Path(out) if out else cfg.workdir_path() / "analysis" / label.replace("/", "_")
    run_id = version.run_id if version is not None else None
    registry = f"{version.name}/{version.version}" if version is not None else None
    path = analyze(cfg, sae, hook, out, ref=ref, run_id=run_id, registry=registry, log=log, **settings)
    if run_id:
        client.log_artifacts(run_id, str(path), ANALYSIS_ARTIFACT)
        log(f"logged as artifacts {ANALYSIS_ARTIFACT}/ of run {run_id}")
    return path


def find_analysis(cfg: RunConfig | None, ref: str, tracking_uri: str | None = None) -> tuple[Analysis, object | None]:
    """(the analysis of REF, its registry version or None): REF an analysis directory, or a
    registered version whose run holds `analysis/` artifacts (downloaded to a temp directory)."""
    from sae_ray import tracking

    if Path(ref, "meta.json").is_file():
        return Analysis.open(ref), None
    uri = tracking_uri or (cfg.tracking_uri() if cfg is not None else None)
    if uri is None:
        raise FileNotFoundError(f"{ref!r} is not an analysis directory; for a registered SAE give --config or --tracking-uri")
    client = tracking.client_for(uri)
    from mlflow.exceptions import MlflowException

    try:
        version = tracking.resolve_version(client, ref)
    except MlflowException:
        raise FileNotFoundError(f"{ref!r} is neither an analysis directory nor a registered version in {uri}") from None
    names = [a.path for a in client.list_artifacts(version.run_id)] if version.run_id else []
    if ANALYSIS_ARTIFACT not in names:
        raise FileNotFoundError(f"{ref!r} has no analysis in its run {version.run_id}: run `sae-ray analyze {ref} --config CONFIG` first")
    local = client.download_artifacts(version.run_id, ANALYSIS_ARTIFACT, tempfile.mkdtemp(prefix="sae-ray-analysis-"))
    return Analysis.open(local), version

