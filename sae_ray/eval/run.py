"""LM-level evaluation of a set of SAEs of one hook, from a run config: the model, the held-out
documents, the figures, and what goes into MLflow. No Ray (`sae_ray.actors.evaluator` fans it
out, one task per hook; `sae-ray eval` calls it directly).

`evaluate_hook(cfg, hook_name, saes)`:
  1. load the model (`model.*`) and resolve the hook (by its config entry, so `blocks.L.hook_site`
     names and raw module paths both work);
  2. read the config's documents in the producers' order and pack the held-out ones
     (`buffer.eval_fraction`: the documents no training reader returns) into contexts of
     `data.context_size`, `eval.tokens` kept tokens in all (`lm.held_out_contexts`);
  3. the mean activation over those tokens (for mean ablation; a pass that stops at the hook);
  4. `lm.evaluate_lm`: clean and ablated passes once, one spliced pass per SAE.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from sae_ray.config import ConfigError, RunConfig
from sae_ray.eval.lm import HEADLINE, activation_mean, evaluate_lm, held_out_contexts, model_kind, plot_log_density
from sae_ray.sae import SAE

EVAL_ARTIFACT_PATH = "lm_eval"
"""Where an SAE's run keeps its evaluation files: result.json (SAEBench-style), frequencies.safetensors, density.png."""
EVAL_TYPE_ID = "core"
"""SAEBench's eval_type_id of the figures `evaluate_lm` gives (its core eval)."""


def hook_entry(cfg: RunConfig, hook_name: str):
    """The `hooks:` entry of the config that resolves to hook_name (ConfigError naming both)."""
    from sae_ray.activations.hooks import hook_name as name_of

    names = {h.module or name_of(h.layer, h.site): h for h in cfg.hooks}
    if hook_name not in names:
        raise ConfigError([f"hooks: {hook_name!r} is not among the config's hooks {sorted(names)}; "
                           "evaluate with a config that captures it, or give --hook"])
    return names[hook_name]


def evaluate_hook(cfg: RunConfig, hook_name: str, saes: list[SAE], device: str = "cpu",
                  log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(reference, per-SAE figures) of `lm.evaluate_lm` for SAEs that read `hook_name`, as the
    module docstring lists; the reference also holds model_kind, eval_tokens, eval_contexts,
    and setup_seconds (model load, contexts and mean)."""
    from sae_ray.activations.corpus import resolve_dataset_path
    from sae_ray.activations.hooks import resolve_hook
    from sae_ray.activations.model import load_model
    from sae_ray.activations.text import load_documents

    for i, sae in enumerate(saes):
        if sae.n_stack is not None:
            raise ValueError(f"evaluate_hook: SAE {i} is a stack; evaluate its members (sae.unstack())")
    outs = {s.cfg.hook_name_out if s.cfg.is_transcoder else None for s in saes}
    if len(outs) > 1:
        raise ValueError(f"evaluate_hook: the SAEs reconstruct different hooks {sorted(map(str, outs))}; evaluate "
                         "SAEs and transcoders of each output hook apart")
    out_name = outs.pop() if outs else None
    if out_name == "":
        raise ConfigError([f"a transcoder read at {hook_name!r} names no output hook (cfg.json hook_name_out); "
                           "it cannot be spliced in"])
    start = time.perf_counter()
    h = hook_entry(cfg, hook_name)
    h_out = None if out_name is None else hook_entry(cfg, out_name)
    model, tokenizer = load_model(cfg.model.name, cfg.model.revision, cfg.model.dtype, device, cfg.model.trust_remote_code)
    input_hook = resolve_hook(model, h.layer, h.site, h.module)
    # a transcoder replaces the activation at its output hook, computed from its input hook
    hook = input_hook if h_out is None else resolve_hook(model, h_out.layer, h_out.site, h_out.module)
    if cfg.eval.absorption and model_kind(model) != "causal":  # before any pass over the data
        raise ConfigError([f"eval.absorption: {cfg.model.name} has no next-token head; the first-letter "
                           "absorption metric is for causal LMs (set eval.absorption: false)"])
    d = cfg.data
    docs = load_documents(resolve_dataset_path(d.path, cfg.workdir_path()), d.text_column, d.split, d.name,
                          streaming=d.streaming, trust_remote_code=cfg.model.trust_remote_code)
    docs = itertools.islice(docs, d.max_documents)
    contexts = held_out_contexts(tokenizer, docs, cfg.buffer.eval_fraction, d.context_size, cfg.eval.tokens)
    mean = activation_mean(model, hook, contexts, cfg.eval.batch_size)
    for i, sae in enumerate(saes):
        if sae.cfg.d_target != mean.shape[0]:
            what = "d_out" if sae.cfg.is_transcoder else "d_in"
            raise ConfigError([f"SAE {i} ({sae.cfg.architecture}, d_sae {sae.cfg.d_sae}): {what} {sae.cfg.d_target}, but "
                               f"{hook.name} of {cfg.model.name} is {mean.shape[0]} wide; evaluate it at a hook of that width"])
    setup = time.perf_counter() - start
    ref, rows = evaluate_lm(model, hook, contexts, [s.to(device) for s in saes], mean, cfg.eval.batch_size, log=log,
                            mask_token_id=tokenizer.mask_token_id, input_hook=None if h_out is None else input_hook)
    ref.update(model_kind=model_kind(model), eval_tokens=contexts.n_tokens, eval_contexts=len(contexts.input_ids),
               setup_seconds=setup, hook=input_hook.name, model=cfg.model.name,
               **({} if h_out is None else {"hook_out": hook.name}))
    if cfg.eval.absorption and h_out is not None and log is not None:
        log("eval.absorption: skipped for transcoders (the first-letter probe reads one activation)")
    elif cfg.eval.absorption:
        for row, figures in zip(rows, absorption(cfg, model, tokenizer, hook_name, saes)):
            row.update(figures)
    return ref, rows


def absorption(cfg: RunConfig, model, tokenizer, hook_name: str, saes: list[SAE]) -> list[dict[str, float]]:
    """Per SAE, SAEBench's first-letter absorption figures as absorption_<name>: the words'
    activations and the letter probe once for the hook, then each SAE (`eval.absorption`)."""
    import numpy as np

    from sae_ray.eval.absorption import AbsorptionConfig, alpha_words, first_letter_absorption, letter_activations, \
        train_letter_probe

    acfg = AbsorptionConfig()
    words = alpha_words(tokenizer, acfg.min_length)
    if cfg.eval.absorption_words is not None and len(words) > cfg.eval.absorption_words:
        pick = np.random.default_rng(acfg.seed).choice(len(words), cfg.eval.absorption_words, replace=False)
        words = [words[i] for i in sorted(pick)]
    start = time.perf_counter()
    data = letter_activations(model, tokenizer, hook_name, acfg, words=words)
    probe = train_letter_probe(data.x[data.train], data.labels[data.train], acfg)
    shared = time.perf_counter() - start
    out = []
    for sae in saes:
        t0 = time.perf_counter()
        result = first_letter_absorption(sae.cpu(), data.x, data.labels, data.train, probe, acfg)
        out.append({**result.summary(prefix="absorption_"), "absorption_words": float(len(data.labels)),
                    "absorption_seconds": time.perf_counter() - t0 + shared / len(saes)})
    return out


def headline(row: dict[str, Any]) -> dict[str, float]:
    """The figures of `lm.HEADLINE` that `row` has (registry tags, the summary)."""
    return {k: row[k] for k in HEADLINE if k in row}


def result_json(cfg: RunConfig, ref: dict[str, Any], row: dict[str, Any], sae: SAE) -> dict[str, Any]:
    """A SAEBench-style result file: eval_type_id, eval_config, eval_id, datetime_epoch_millis,
    eval_result_metrics (grouped as SAEBench's core eval groups them), eval_result_details,
    sae_bench_commit_hash (None: not run by SAEBench), sae_lens_id/release (None), sae_cfg_dict."""
    groups = {
        "model_behavior_preservation": ["kl_div_score", "kl_div_with_ablation", "kl_div_with_sae",
                                        "embedding_score", "embedding_cossim_with_ablation", "embedding_cossim_with_sae"],
        "model_performance_preservation": ["ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                           "ce_loss_without_sae", "ce_loss_with_mean_ablation",
                                           "ce_loss_score_mean_ablation", "delta_lm_loss"],
        "reconstruction_quality": ["explained_variance", "fvu", "mse", "cossim"],
        "shrinkage": ["l2_ratio", "relative_reconstruction_bias"],
        "sparsity": ["l0", "l1"],
        "misc_metrics": ["dead_fraction", "dense_fraction", "freq_over_1e-1", "freq_under_1e-5"],
        "absorption": ["absorption_mean_absorption_fraction_score", "absorption_mean_full_absorption_score",
                       "absorption_mean_num_split_features", "absorption_n_letters", "absorption_words"],
    }
    metrics = {g: {k: row[k] for k in keys if k in row} for g, keys in groups.items()}
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": {"model_name": cfg.model.name, "hook_name": ref["hook"], "context_size": cfg.data.context_size,
                        "dataset": cfg.data.path, "eval_fraction": cfg.buffer.eval_fraction,
                        "n_eval_tokens": ref["eval_tokens"], "batch_size_prompts": cfg.eval.batch_size,
                        "llm_dtype": cfg.model.dtype, "exclude_special_tokens_from_reconstruction": True},
        "eval_id": f"sae-ray-{int(time.time() * 1000)}",
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {g: m for g, m in metrics.items() if m},
        "eval_result_details": [],
        "eval_result_unstructured": {"reference": {k: v for k, v in ref.items() if isinstance(v, (int, float, str))},
                                     "seconds": row["seconds"]},
        "sae_bench_commit_hash": None,
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": {"architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                         "hook_name": ref["hook"], "model_name": cfg.model.name, "k": sae.cfg.k,
                         "dtype": str(sae.cfg.dtype)},
    }


def log_eval(client, run_id: str, cfg: RunConfig, ref: dict[str, Any], row: dict[str, Any], sae: SAE,
             step: int = 0) -> dict[str, Any]:
    """Into MLflow run `run_id`: every figure as `lm/<name>` metrics, and under `lm_eval/` the
    SAEBench-style result.json, the per-latent firing frequencies (safetensors) and the
    log-density plot. Returns the result dict."""
    from sae_ray import tracking

    scalars = {f"lm/{k}": float(v) for k, v in row.items() if isinstance(v, (int, float))}
    scalars.update({f"lm/{k}": float(ref[k]) for k in ("eval_tokens", "setup_seconds", "shared_seconds") if k in ref})
    tracking.log_metrics(client, run_id, scalars, step)
    result = result_json(cfg, ref, row, sae)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "result.json").write_text(json.dumps(result, indent=2) + "\n")
        save_file({"frequencies": row["frequencies"].contiguous()}, str(Path(tmp, "frequencies.safetensors")))
        plot_log_density(row["frequencies"], Path(tmp, "density.png"), f"{sae.cfg.architecture} d_sae {sae.cfg.d_sae}")
        client.log_artifacts(run_id, tmp, EVAL_ARTIFACT_PATH)
    return result


def evaluate_runs(cfg: RunConfig, hook_name: str, runs: list[tuple[str, str]], device: str = "cpu",
                  log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate the SAEs that the MLflow runs `runs` ([(run_id, registered version or "")], all
    of hook `hook_name`) saved; log each one's figures into its run (`log_eval`) and put the
    headline figures into its registry version's tags. Returns {run_id: headline figures,
    seconds (its own passes) and eval_seconds (its share of the whole evaluation)}."""
    from sae_ray import tracking
    from sae_ray.formats import load_sae_dir

    client = tracking.client_for(cfg.tracking_uri())
    start = time.perf_counter()
    saes = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id, _ in runs:
            path = client.download_artifacts(run_id, tracking.SAE_ARTIFACT_PATH, tmp + "/" + run_id)
            saes.append(load_sae_dir(path).eval())
    ref, rows = evaluate_hook(cfg, hook_name, saes, device=device, log=log)
    name = tracking.registry_name(cfg.model.name, hook_name)
    total = time.perf_counter() - start
    out = {}
    for (run_id, version), sae, row in zip(runs, saes, rows):
        log_eval(client, run_id, cfg, ref, row, sae)
        figures = headline(row)
        if version:
            for k, v in figures.items():
                tracking.retry(lambda k=k, v=v: client.set_model_version_tag(name, version, k, str(round(v, 6))))
            client.set_model_version_tag(name, version, "lm_eval_tokens", str(ref["eval_tokens"]))
        # its share of the evaluation: its own spliced pass, and an equal part of the shared work
        out[run_id] = {**figures, "lm_eval_seconds": row["seconds"] + (total - sum(r["seconds"] for r in rows)) / len(rows)}
    return out


def load_ref(client, uri: str, ref: str, command: str):
    """(sae, registry version or None, a label for file names) of REF: a local path `load_sae`
    reads, or a registered version (`models:/NAME/3`, `NAME/3`, `NAME@alias`); FileNotFoundError
    naming REF and the store otherwise."""
    from mlflow.exceptions import MlflowException

    import sae_ray
    from sae_ray import tracking

    if Path(ref).expanduser().exists():
        path = Path(ref).expanduser()
        return sae_ray.load_sae(str(path)), None, path.resolve().name
    try:
        version = tracking.resolve_version(client, ref)
    except MlflowException as e:  # MLflow's own error for an unknown name or alias
        raise FileNotFoundError(f"{command}: REF {ref!r} is neither a local path nor a registered version in "
                                f"{uri} ({' '.join(str(e).split())[:200]}); see `sae-ray registry list`") from None
    sae = sae_ray.load_sae(f"models:/{version.name}/{version.version}", tracking_uri=uri)
    return sae, version, f"{version.name}_v{version.version}"


def eval_ref(cfg: RunConfig, ref: str, hook: str | None = None, output: str | Path | None = None,
             tracking_uri: str | None = None, device: str = "cpu", log: Callable[[str], None] = print) -> dict[str, Any]:
    """`sae-ray eval`: evaluate one SAE on the config's model and held-out documents.

    ref: a registered version (`models:/NAME/3`, `NAME/3`, `NAME@alias`, `models:/NAME@alias`)
    in the config's MLflow store (or `tracking_uri`), or a local path `sae_ray.load_sae` reads
    (a SAELens or sparsify directory, a Gemma Scope params.npz). hook: the hook to splice at;
    default the SAE's own hook_name, which must be one of the config's hooks. Writes an MLflow
    eval run (tags sae_ray.kind=eval, sae_ray.evaluates=ref and, for a registered ref, the
    version and its training run), updates a registered version's tags with the headline
    figures (and lm_eval_run), and writes the SAEBench-style result to `output` (default
    <workdir>/eval/<name>_core.json). Returns the result dict.
    """
    from sae_ray import tracking

    uri = tracking_uri or cfg.tracking_uri()
    client = tracking.client_for(uri)
    sae, version, label = load_ref(client, uri, ref, "sae-ray eval")
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise ConfigError([f"--hook: the SAE of {ref!r} names no hook; give one of the config's hooks"], "sae-ray eval")
    hook_entry(cfg, hook)  # a clear error before the model loads
    ref_figs, (row,) = evaluate_hook(cfg, hook, [sae], device=device, log=None)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, cfg.artifact_location())
    tags = {"sae_ray.kind": "eval", "sae_ray.evaluates": ref, "sae_ray.hook": hook}
    if version is not None:
        tags.update({"sae_ray.model_version": f"{version.name}/{version.version}", "sae_ray.source_run": version.run_id or ""})
    run_id = tracking.start_run(uri, experiment_id, f"eval-{label}", tags=tags)
    result = log_eval(client, run_id, cfg, ref_figs, row, sae)
    client.set_terminated(run_id)
    if version is not None:
        for k, v in headline(row).items():
            tracking.retry(lambda k=k, v=v: client.set_model_version_tag(version.name, version.version, k, str(round(v, 6))))
        client.set_model_version_tag(version.name, version.version, "lm_eval_run", run_id)
    path = Path(output) if output else cfg.workdir_path() / "eval" / f"{label.replace('/', '_')}_core.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for group, figures in result["eval_result_metrics"].items():
        log(f"{group}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    log(f"{ref_figs['eval_tokens']:,} held-out tokens of {ref_figs['model']} at {hook}; "
        f"{row['seconds']:.1f} s for this SAE, {ref_figs['setup_seconds'] + ref_figs['shared_seconds']:.1f} s shared")
    log(f"result {path}; MLflow eval run {run_id}")
    return result
