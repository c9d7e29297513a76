"""Checks that look at the world before any expensive work: model, hook points, data, buffer.

`preflight(cfg)` returns a `Plan` (hook names and widths, the trials and their stacks, the
buffer fingerprint) or raises `ConfigError` listing every problem it found. It loads only the
model's config and builds the model on the meta device (no weights, no compute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sae_ray.config import ConfigError, RunConfig
from sae_ray.sweep.plan import Stack, Trial, expand_trials, pack_stacks, stack_limit, trial_problems


@dataclass
class Plan:
    hooks: dict[str, int]
    """hook name -> d_in."""
    hook_layers: dict[str, int]
    """hook name -> block index (-1 for a raw module path)."""
    trials: list[Trial]
    """One per SAE, for every hook."""
    stacks: list[Stack]
    """The trials packed into Tune trials (at most `plan.stack_limit` SAEs per stack)."""
    fingerprint: dict[str, Any]
    """What identifies the buffer's contents; a buffer with another fingerprint is not reused."""
    transcoder: tuple[str, str] | None = None
    """sae.transcoder's (input, output) hook names, both in `hooks`; None for an SAE sweep."""


def meta_model(name: str, revision: str | None, trust_remote_code: bool):
    """The model's architecture without weights (meta device): enough to resolve hooks and shapes."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from sae_ray.activations.model import is_causal_lm, resolve_model_path

    path = resolve_model_path(name)
    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return model.eval(), config, path


_PROBE_TOKENS = 4
"""Tokens of the meta-device forward pass that measures each hook's width."""


def _hook_shapes(model, config, resolved) -> dict[str, tuple[int, ...] | None]:
    """hook name -> the shape of its activation on a [1, _PROBE_TOKENS] batch (meta device);
    None for every hook when the model does not run on meta tensors."""
    from sae_ray.activations.hooks import capture_activations

    try:
        ids = torch.zeros((1, _PROBE_TOKENS), dtype=torch.long, device="meta")
        acts = capture_activations(model, resolved, ids, torch.ones_like(ids))
        return {name: tuple(int(n) for n in a.shape) for name, a in acts.items()}
    except Exception:  # some models don't run on meta tensors
        return {h.name: None for h in resolved}


def _widths(shapes: dict[str, tuple[int, ...] | None], config) -> dict[str, int]:
    """hook name -> d (the last dim); the residual width where the shape is unknown."""
    return {name: int(shape[-1]) if shape else int(config.hidden_size) for name, shape in shapes.items()}


def hook_widths(model, config, resolved) -> dict[str, int]:
    """hook name -> d of each resolved hook (meta device; the residual width where it does not run)."""
    return _widths(_hook_shapes(model, config, resolved), config)


def transcoder_problems(cfg: RunConfig, model, shapes: dict[str, tuple[int, ...] | None]) -> tuple[tuple[str, str] | None, list[str]]:
    """(input, output) hook names of sae.transcoder, and what is wrong with them: a hook point that
    does not resolve (the message lists what does), an activation that is not one vector per token
    of the context (both hooks must give [batch, tokens, d], row for row in the buffer), the same
    hook point twice, or an output that comes before the input in the forward pass."""
    from sae_ray.activations.hooks import SITE_ORDER, parse_hook_name, resolve_hook, valid_hook_points

    tc = cfg.sae.transcoder
    if tc is None:
        return None, []
    names, problems = [], []
    for field, h in zip(("input", "output"), tc.points()):
        shown = f"sae.transcoder.{field}: value {h.model_dump(exclude_none=True)!r}"
        try:
            r = resolve_hook(model, h.layer, h.site, h.module)
        except ValueError as e:
            try:
                valid = valid_hook_points(model)
            except ValueError:
                valid = []
            problems.append(f"{shown}: {e}" + (f"; hook points of this model: {valid}" if valid else ""))
            continue
        names.append(r.name)
        shape = shapes.get(r.name)
        if shape is not None and (len(shape) != 3 or shape[:2] != (1, _PROBE_TOKENS)):
            problems.append(f"{shown}: {r.name} gives activations of shape {list(shape)} for a batch of 1 context of "
                            f"{_PROBE_TOKENS} tokens, not [1, {_PROBE_TOKENS}, d]: a transcoder pairs one vector per token "
                            "at its input with one at its output; accepted: a site (resid_pre, resid_post, attn_out, mlp_in, "
                            "mlp_out) or a module with one output vector per token")
    if problems or len(names) != 2:
        return None, problems
    absent = [n for n in names if n not in shapes]
    if absent:  # a config changed after validation (model_copy) never had them added to `hooks`
        return None, [f"hooks: value {[h.model_dump(exclude_none=True) for h in cfg.hooks]!r}: lacks {absent}, the hook "
                      "points of sae.transcoder, which validation adds; validate the config again (validate_config) "
                      "after changing sae.transcoder"]
    if names[0] == names[1]:
        return None, [f"sae.transcoder.output: value {names[1]!r}: the same hook point as input ({names[0]!r}); a "
                      "transcoder maps one activation to another (leave sae.transcoder out for an SAE)"]
    where = [parse_hook_name(n) for n in names]
    if all(where) and (where[1][0], SITE_ORDER[where[1][1]]) <= (where[0][0], SITE_ORDER[where[0][1]]):
        problems.append(f"sae.transcoder.output: value {names[1]!r}: comes before (or at) input {names[0]!r} in the "
                        "forward pass; a transcoder reads its input and predicts what the model computes after it: "
                        "give an output at a later site or layer (a site without output.layer takes input's layer), "
                        f"e.g. blocks.{where[0][0]}.hook_mlp_out for input mlp_in")
    return (names[0], names[1]), problems


def preflight(cfg: RunConfig, check_data: bool = True, check_buffer: bool = True, address: str | None = None,
              window: bool = True) -> Plan:
    """The plan of `cfg`, or ConfigError with every problem. Paths are made absolute first,
    so the fingerprint does not depend on how a path was written. `address`: the Ray cluster
    the run will join (resources are checked against it once joined; see `resource_problems`).
    window: check buffer.max_gb for a sweep (`window_problems`); `sae-ray cache` ignores it."""
    from sae_ray.activations.hooks import resolve_hook

    cfg = cfg.with_absolute_paths()
    problems: list[str] = []
    hooks: dict[str, int] = {}
    layers: dict[str, int] = {}
    fingerprint: dict[str, Any] = {}
    trials: list[Trial] = []
    transcoder: tuple[str, str] | None = None
    try:
        model, config, path = meta_model(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here is a problem with model.name
        problems.append(f"model.name: value {cfg.model.name!r}: could not load its config: {e}")
    else:
        resolved = []
        for i, h in enumerate(cfg.hooks):
            try:
                r = resolve_hook(model, h.layer, h.site, h.module)
                resolved.append(r)
                layers[r.name] = h.layer if h.layer is not None else -1
            except ValueError as e:
                if cfg.sae.transcoder is None or h not in cfg.sae.transcoder.points():  # else named below
                    problems.append(f"hooks[{i}]: value {h.model_dump(exclude_none=True)!r}: {e}")
        shapes = _hook_shapes(model, config, resolved) if resolved else {}
        hooks = _widths(shapes, config)
        transcoder, found = transcoder_problems(cfg, model, shapes)
        problems += found
        trials = expand_trials(cfg.sae, hooks, layers, transcoder) if not found else []
        problems += trial_problems(cfg, trials)
        if cfg.sweep.search != "grid" and trials:  # what is drawn must suit every SAE it applies to
            from sae_ray.sweep.search import plan_problems

            problems += plan_problems(cfg, [Stack(tuple(trials))])
        tok = getattr(config, "vocab_size", None)
        fingerprint = {
            "model": cfg.model.name,
            "revision": cfg.model.revision,
            "model_type": config.model_type,
            "vocab_size": tok,
            "hooks": sorted(hooks),
            "dataset": {k: getattr(cfg.data, k) for k in ("path", "name", "split", "text_column", "max_documents")},
            "context_size": cfg.data.context_size,
            "model_dtype": cfg.model.dtype,
            "dtype": cfg.buffer.dtype,
            "shard_rows": cfg.buffer.shard_rows,
            "eval_fraction": cfg.buffer.eval_fraction,
        }

    if check_data:
        try:
            from sae_ray.activations.corpus import resolve_dataset_path
            from sae_ray.activations.text import peek_documents

            d = cfg.data
            peek_documents(resolve_dataset_path(d.path, cfg.workdir_path()), text_column=d.text_column, split=d.split,
                           name=d.name, streaming=d.streaming, trust_remote_code=cfg.model.trust_remote_code)
        except (ValueError, FileNotFoundError) as e:
            problems.append(f"data: {e}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"data.path: value {cfg.data.path!r}: could not be loaded: {e}")

    if check_buffer and fingerprint:
        problems += _buffer_problems(cfg.buffer_path(), fingerprint)

    problems += resource_problems(cfg, address=address)
    stacks = pack_stacks(trials, stack_limit(cfg))
    if window and hooks:
        problems += window_problems(cfg, hooks, len(stacks), available_resources(address))
    problems += tracking_problems(cfg)
    if problems:
        raise ConfigError(problems, "preflight")
    return Plan(hooks=hooks, hook_layers=layers, trials=trials, stacks=stacks, fingerprint=fingerprint,
                transcoder=transcoder)


def _buffer_problems(path: str, fingerprint: dict) -> list[str]:
    """An existing buffer must have the same fingerprint; it is never modified here."""
    from pathlib import Path

    from sae_ray.buffer import ActivationBuffer
    from sae_ray.buffer.layout import diff, json_normalise

    if "://" in path:  # an object store (s3://, gs://): it must answer, with these credentials, now
        problem, exists = _store_problem(path)
        if problem or not exists:
            return [problem] if problem else []
    else:
        p = Path(path)
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            return []
    try:
        existing = ActivationBuffer.open(path).fingerprint
    except Exception as e:  # noqa: BLE001
        return [f"buffer.path: value {path!r}: exists but is not a readable sae-ray buffer ({e}); choose another path"]
    differences = diff(existing, json_normalise(fingerprint, "the fingerprint"))
    if differences:
        shown = "; ".join(f"{k}: buffer has {stored!r}, config wants {given!r}" for k, (stored, given) in differences.items())
        return [f"buffer.path: value {path!r}: holds a buffer with a different fingerprint ({shown}); "
                "nothing was changed: use another buffer.path or workdir"]
    return []


STORE_TIMEOUT_S = 20.0
"""How long preflight waits for the object store of a buffer.path such as s3://... to answer."""

_BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs")


def _store_problem(path: str, timeout_s: float = STORE_TIMEOUT_S) -> tuple[str | None, bool]:
    """(a problem, or None; whether a buffer's zarr.json is there) for a buffer on an object store.

    One read of ``<path>/zarr.json`` (absent is fine: the run creates the buffer) and, when it is
    absent, whether the bucket exists, with the credentials the producers and trials will use
    (the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, or fsspec's
    FSSPEC_S3_KEY, FSSPEC_S3_SECRET, FSSPEC_S3_ENDPOINT_URL). s3:// is asked with short timeouts and no retries; any store gets ``timeout_s`` in
    all, so a closed port, a wrong endpoint, missing or wrong credentials are one line within
    seconds, before any production. The message never holds a credential."""
    import threading

    outcome: dict[str, Any] = {}
    protocol = path.split("://", 1)[0]

    def probe() -> None:
        try:
            import fsspec

            options: dict[str, Any] = {"skip_instance_cache": True}
            if protocol in ("s3", "s3a"):
                options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 10,
                                            "retries": {"mode": "standard", "max_attempts": 1}}
            fs, root = fsspec.core.url_to_fs(path, **options)
            if hasattr(fs, "retries"):
                fs.retries = 1  # s3fs's own retry loop (a class attribute; this instance is not shared)
            try:
                fs.cat_file(f"{root.rstrip('/')}/zarr.json")
                outcome["exists"] = True
            except FileNotFoundError:
                outcome["exists"] = False
                bucket = root.strip("/").split("/", 1)[0]
                if protocol in _BUCKET_PROTOCOLS and bucket and not fs.exists(bucket):
                    outcome["problem"] = (f"bucket {bucket!r} does not exist (or these credentials cannot see it): "
                                          "create it first; sae-ray creates the buffer inside a bucket, not the bucket")
        except BaseException as e:  # noqa: BLE001 - reported below, whatever the store raised
            outcome["error"] = e

    thread = threading.Thread(target=probe, name="sae-ray-store-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    where = f"buffer.path: value {path!r}"
    endpoint = _store_endpoint(protocol)
    if thread.is_alive():
        return (f"{where}: the store did not answer within {timeout_s:g}s{endpoint}: check the endpoint "
                "(AWS_ENDPOINT_URL for s3://) and the network"), False
    if "error" in outcome:
        return f"{where}: {_store_error(outcome['error'], endpoint)}", False
    if "problem" in outcome:
        return f"{where}: {outcome['problem']}", False
    return None, bool(outcome.get("exists"))


def _store_endpoint(protocol: str) -> str:
    """' (endpoint URL)' where the environment names one for s3://; '' otherwise."""
    import os

    if protocol not in ("s3", "s3a"):
        return ""
    try:
        import fsspec.config

        configured = fsspec.config.conf.get("s3", {}).get("endpoint_url")
    except ImportError:
        configured = None
    url = configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" (endpoint {url})" if url else " (endpoint: AWS's default; set AWS_ENDPOINT_URL for another S3 server)"


def _store_error(e: BaseException, endpoint: str) -> str:
    """One line saying what the store's exception means and what to do."""
    name, text = type(e).__name__, str(e).strip()
    if isinstance(e, ImportError):
        return (f"cannot open this store ({text}): install its filesystem (pip install 'sae-ray[s3]' for s3://, "
                "'sae-ray[gcs]' for gs://)")
    if name in ("NoCredentialsError", "PartialCredentialsError") or "locate credentials" in text:
        return (f"no credentials for the store ({name}: {text}){endpoint}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or FSSPEC_S3_KEY and FSSPEC_S3_SECRET, or AWS_PROFILE) in the environment "
                "of every process of the run")
    if isinstance(e, PermissionError) or any(s in text for s in ("SignatureDoesNotMatch", "InvalidAccessKeyId",
                                                                  "AccessDenied", "Forbidden")):
        return (f"the store refused these credentials ({name}: {text}){endpoint}: check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or FSSPEC_S3_KEY and FSSPEC_S3_SECRET), and that they may read and write "
                "this path")
    if isinstance(e, (ConnectionError, TimeoutError, OSError)) or any(
            s in name for s in ("Connect", "Connection", "Timeout", "Endpoint")):
        return (f"could not reach the store ({name}: {text}){endpoint}: check the endpoint (AWS_ENDPOINT_URL for "
                "s3://) and that the server is up")
    return f"could not read the store ({name}: {text}){endpoint}"


# ---------------------------------------------------------------------------------------
# The world a run needs: CPUs and GPUs for its actors and trials, a tracking store that answers
# ---------------------------------------------------------------------------------------

def available_resources(address: str | None = None) -> dict[str, Any] | None:
    """What the run's actors and trials can be given, as
    ``{"CPU": n, "GPU": n, "nodes": [{"CPU": n, "GPU": n, <custom resource>: n, ...}, ...], "where": "..."}``.

    A Ray this process has joined: its cluster (totals from `ray.cluster_resources()`, one
    entry per alive node from `ray.nodes()`). Not joined yet but `address` or RAY_ADDRESS names
    a cluster: None, unknown until Ray connects (the driver's machine says nothing about the
    cluster's). Otherwise this machine, which a local Ray uses whole: os.cpu_count() CPUs and
    torch.cuda.device_count() GPUs. Ray is never started or imported here.
    """
    import os
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        total = ray.cluster_resources()
        nodes = [{k: float(v) for k, v in n["Resources"].items()}
                 for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
        return {"CPU": float(total.get("CPU", 0)), "GPU": float(total.get("GPU", 0)), "nodes": nodes,
                "where": "the Ray cluster"}
    if address or os.environ.get("RAY_ADDRESS"):
        return None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus), "where": "this machine"}


def _amount(n: float, what: str) -> str:
    return f"{n:g} {what}{'' if n == 1 else 's'}"


def _describe_resources(available: dict[str, Any]) -> str:
    where = available.get("where", "the cluster")
    cpu, gpu = float(available.get("CPU", 0)), float(available.get("GPU", 0))
    nodes = available.get("nodes") or []
    text = f"{where} has {_amount(cpu, 'CPU')} and {_amount(gpu, 'GPU')}"
    if len(nodes) > 1:
        big_cpu = max(float(n.get("CPU", 0)) for n in nodes)
        big_gpu = max(float(n.get("GPU", 0)) for n in nodes)
        text += f" on {len(nodes)} nodes (at most {_amount(big_cpu, 'CPU')} and {_amount(big_gpu, 'GPU')} on one)"
    return text


def resource_problems(cfg: RunConfig, available: dict[str, Any] | None = None, address: str | None = None) -> list[str]:
    """What Ray could never schedule, found before it starts (Ray would wait for it forever).

    available: {"CPU": n, "GPU": n} and optionally "nodes" (a list of such dicts, one per node)
    and "where" (words for the message); None: `available_resources(address)` (which is None
    for a cluster not joined yet: then nothing is checked). Checked: one producer and one trial
    must each fit on one node; all producers must fit at once (each holds its share until the
    buffer is complete); a cuda device needs a GPU. A trial need not fit beside the producers:
    it starts when they are done.
    """
    if available is None:
        available = available_resources(address)
        if available is None:
            return []
    cpu, gpu = float(available.get("CPU", 0)), float(available.get("GPU", 0))
    nodes = available.get("nodes") or [{"CPU": cpu, "GPU": gpu}]
    eps = 1e-9

    def fits(cpus: float, gpus: float, custom: dict[str, float] | None = None) -> bool:
        need = {"CPU": cpus, "GPU": gpus, **(custom or {})}
        return any(all(float(n.get(k, 0)) + eps >= v for k, v in need.items()) for n in nodes)

    has = _describe_resources(available)
    problems = []
    p, r = cfg.producers, cfg.resources
    if not fits(p.num_cpus, p.num_gpus):
        problems.append(f"producers: num_cpus={p.num_cpus:g}, num_gpus={p.num_gpus:g}: one producer does not fit: {has}; "
                        "Ray would wait for it forever: lower producers.num_cpus / producers.num_gpus")
    elif p.count * p.num_cpus > cpu + eps or p.count * p.num_gpus > gpu + eps:
        problems.append(f"producers.count: value {p.count}: {p.count} producers x (num_cpus {p.num_cpus:g}, num_gpus {p.num_gpus:g}) "
                        f"need {_amount(p.count * p.num_cpus, 'CPU')} and {_amount(p.count * p.num_gpus, 'GPU')} at once, but {has}; "
                        "each producer holds its share until the buffer is complete, so the rest would wait forever: "
                        "lower producers.count or its num_cpus / num_gpus")
    for field, custom in (("producers.resources", p.resources), ("resources.trial_resources", r.trial_resources)):
        missing = custom_resource_problem(field, custom, nodes)
        if missing:  # a local Ray declares no custom resources; a cluster's nodes may
            problems.append(f"{missing}; Ray would wait forever: declare it on a node (`ray start --resources`) or drop it")
        elif custom and not fits(*(((p.num_cpus, p.num_gpus) if field.startswith("producers") else
                                    (r.cpus_per_trial, r.gpus_per_trial))), custom):
            problems.append(f"{field}: {dict(custom)}: no node has these together with the CPUs and GPUs asked for: {has}")
    if not fits(r.cpus_per_trial, r.gpus_per_trial):
        problems.append(f"resources: cpus_per_trial={r.cpus_per_trial:g}, gpus_per_trial={r.gpus_per_trial:g}: one trial does not "
                        f"fit: {has}; Tune would wait for it forever: lower resources.cpus_per_trial / resources.gpus_per_trial")
    if cfg.eval.lm and cfg.eval.num_cpus is not None and not fits(cfg.eval.num_cpus, p.num_gpus):
        problems.append(f"eval.num_cpus: value {cfg.eval.num_cpus:g} (with a producer's {p.num_gpus:g} GPUs): the evaluation "
                        f"task does not fit: {has}; Ray would wait for it forever: lower eval.num_cpus")
    for field, device in (("model.device", cfg.model.device), ("train.device", cfg.train.device)):
        if device.startswith("cuda") and gpu < eps:
            problems.append(f"{field}: value {device!r}: {has}; use 'auto' (cuda where there is a GPU, else cpu) or 'cpu'")
    return problems


def window_shards(cfg: RunConfig, hooks: dict[str, int]) -> tuple[int, int]:
    """(shards a window of buffer.max_gb holds at least, the most bytes one shard can take): the
    bytes are the shard's values uncompressed (every hook's activations plus the int32 token and
    position and int64 doc_index columns) plus the Zarr/Blosc framing; compression only makes a
    shard smaller, so more of them fit. Producers claim a shard while the live ones take less
    than buffer.max_gb, so the window fills at ceil(max_gb / shard bytes) shards."""
    from sae_ray.dtypes import STORAGE_DTYPES

    b = cfg.buffer
    values = sum(hooks.values()) * np.dtype(STORAGE_DTYPES[b.dtype]).itemsize + 16
    framing = (len(hooks) + 3) * (b.shard_rows // b.chunk_rows * 48 + 64)
    shard_bytes = math.ceil(b.shard_rows * values * 1.01) + framing
    return max(1, math.ceil(b.max_gb * 1e9 / shard_bytes)), shard_bytes


def window_problems(cfg: RunConfig, hooks: dict[str, int], n_stacks: int, available: dict[str, Any] | None) -> list[str]:
    """What makes a sweep with a bounded window (buffer.max_gb) stall or train short; [] without one.

    A window is read once (each trial reads each shard once), a shard is dropped only once every
    trial has passed it (a trial that has not started yet holds every shard) and the shards with
    the held-out rows every trial evaluates on are kept to the end. So, when the window binds
    (the buffer would not fit in it): it must hold those held-out shards plus what readers mix at
    once; when not every stack can run at once, each trial must finish within the window; and
    no trial may wait for the whole buffer (train.wait_for_buffer). Whatever the window: a trial
    cannot read more training rows than the buffer will hold.
    available: as `resource_problems` takes it (None: the trials-at-once rule is not checked).
    Figures of rows are estimates from buffer.eval_fraction (the split is by document)."""
    from sae_ray.buffer.reader import SHARDS_IN_MIX

    b, t, r, p = cfg.buffer, cfg.train, cfg.resources, cfg.producers
    if b.max_gb is None or not hooks:
        return []
    problems = []
    need = math.ceil(t.total_tokens / t.batch_size) * t.batch_size  # whole batches
    train_share = 1 - b.eval_fraction
    if need > b.n_tokens * train_share:
        problems.append(
            f"train.total_tokens: value {t.total_tokens:,}: with a bounded window (buffer.max_gb {b.max_gb:g}) every shard "
            f"is read once, and the buffer will hold at most about {b.n_tokens * train_share:,.0f} training rows (buffer.n_tokens "
            f"{b.n_tokens:,} x (1 - buffer.eval_fraction {b.eval_fraction:g})), fewer if the dataset ends first; a trial needs "
            f"{need:,} (train.total_tokens in whole batches of train.batch_size {t.batch_size:,}). Accepted: train.total_tokens "
            f"<= about {b.n_tokens * train_share:,.0f}, or buffer.n_tokens >= {math.ceil(need / train_share):,}, or no "
            "buffer.max_gb (the whole buffer is kept and read over several epochs)")
    held, shard_bytes = window_shards(cfg, hooks)
    if math.ceil(b.n_tokens / b.shard_rows) <= held:
        return problems  # the whole buffer fits: nothing is ever dropped, nothing waits
    if t.wait_for_buffer:
        problems.append(
            f"train.wait_for_buffer: value True: with a bounded window (buffer.max_gb {b.max_gb:g}) that the buffer does not "
            "fit in, the producers wait for trials to read the window before they write the rest, so a trial waiting for "
            "the whole buffer would wait forever. Accepted: train.wait_for_buffer False, or no buffer.max_gb")
    eval_shards = math.ceil(t.eval_rows / (b.shard_rows * b.eval_fraction))
    least = eval_shards + SHARDS_IN_MIX + 1
    if held < least:
        problems.append(
            f"buffer.max_gb: value {b.max_gb:g}: holds about {held} shards of up to {shard_bytes:,} bytes (buffer.shard_rows "
            f"{b.shard_rows:,} rows of {sum(hooks.values()):,} activation values in {b.dtype} and 16 bytes of tokens, "
            f"doc_index and position, uncompressed); a window must hold at least {least}: about {eval_shards} with the "
            f"held-out rows every trial evaluates on (train.eval_rows {t.eval_rows:,} / (buffer.shard_rows x "
            f"buffer.eval_fraction {b.eval_fraction:g})), kept to the end, {SHARDS_IN_MIX} a reader mixes at once and 1 "
            f"coming in. Accepted: buffer.max_gb >= {least * shard_bytes / 1e9:.3g}, or none (keep the whole buffer)")
    if available is None:
        return problems
    cpu, gpu, eps = float(available.get("CPU", 0)), float(available.get("GPU", 0)), 1e-9
    at_once = math.floor((cpu - p.count * p.num_cpus + eps) / r.cpus_per_trial)
    why = (f"{cpu:g} CPUs less the producers' {p.count * p.num_cpus:g} leave room for {max(at_once, 0)} trials of "
           f"resources.cpus_per_trial {r.cpus_per_trial:g}")
    if r.gpus_per_trial > 0:
        by_gpu = math.floor((gpu - p.count * p.num_gpus + eps) / r.gpus_per_trial)
        if by_gpu < at_once:
            at_once, why = by_gpu, (f"{gpu:g} GPUs less the producers' {p.count * p.num_gpus:g} leave room for "
                                    f"{max(by_gpu, 0)} trials of resources.gpus_per_trial {r.gpus_per_trial:g}")
    if r.max_concurrent_trials is not None and r.max_concurrent_trials < at_once:
        at_once, why = r.max_concurrent_trials, f"resources.max_concurrent_trials is {r.max_concurrent_trials}"
    if at_once < 1:
        problems.append(
            f"resources.cpus_per_trial: value {r.cpus_per_trial:g}: no trial can run beside the producers ({why}), and with "
            f"a bounded window (buffer.max_gb {b.max_gb:g}) they hold their share until trials have read the window: nothing "
            "would ever move. Accepted: resources.cpus_per_trial / gpus_per_trial small enough for one trial beside the "
            "producers, fewer producers (producers.count, num_cpus, num_gpus), or no buffer.max_gb")
        return problems
    rows_held = held * b.shard_rows * train_share
    if n_stacks > at_once and need > rows_held:
        more = math.ceil(need / (b.shard_rows * train_share))
        problems.append(
            f"train.total_tokens: value {t.total_tokens:,}: the window (buffer.max_gb {b.max_gb:g}) holds about {held} shards, "
            f"about {rows_held:,.0f} training rows, and only {at_once} of the {n_stacks} stacks can run at once ({why}); a trial "
            f"that has not started holds every shard in the window, so the trials that run first must finish within it, but "
            f"each needs {need:,} rows. Accepted: train.total_tokens <= about {rows_held:,.0f}, buffer.max_gb >= "
            f"{more * shard_bytes / 1e9:.3g}, or every stack at once (resources.max_concurrent_trials >= {n_stacks} and the "
            "CPUs/GPUs for them beside the producers, or fewer stacks: a larger sae.max_stack)")
    return problems


def custom_resource_problem(field: str, custom: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """None if some node in `nodes` (each {resource: amount}) offers every resource of `custom` in
    its amount; else which are missing and what each node offers, for `field`. One rule for
    preflight and for a running sweep that lost the nodes with it (`sweep.tuner.ResourceWatcher`)."""
    missing = [k for k, v in custom.items() if not any(float(n.get(k, 0)) + 1e-9 >= v for n in nodes)]
    if not missing:
        return None
    offered = "; ".join(", ".join(f"{k}: {v:g}" for k, v in sorted(n.items()) if k not in ("CPU", "GPU")
                                  and not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type")))
                        or "none" for n in nodes) or "none"
    return (f"{field}: {dict(custom)}: no node offers {', '.join(repr(k) for k in missing)} in that amount "
            f"(custom resources per node: {offered})")


def _in_time(probe, timeout: float):
    """probe() in a daemon thread, waited for at most `timeout` s (a DNS lookup ignores socket timeouts);
    returns its result, or TimeoutError when it did not finish."""
    import threading

    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = probe()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["result"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return out.get("result", TimeoutError())


def _http_problem(uri: str, timeout: float) -> str | None:
    import base64
    import os
    import socket
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    headers = {"Accept": "application/json"}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        user = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()

    context = None  # TLS as MLflow's client does it
    if url.startswith("https:") and os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        import ssl

        context = ssl._create_unverified_context()
    elif url.startswith("https:") and os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        import ssl

        context = ssl.create_default_context(cafile=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])

    def probe() -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout, context=context) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    result = _in_time(probe, timeout + 0.5)
    if isinstance(result, int):
        if 200 <= result < 300:
            return None
        if result in (401, 403):
            return (f"the server answered HTTP {result}: it wants credentials (MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)")
        if result in (404, 405):
            return (f"the server answered HTTP {result} for the MLflow REST API (/api/2.0/mlflow/experiments/search): "
                    "is it an MLflow tracking server, and is the path right?")
        return f"the server answered HTTP {result} for the MLflow REST API (/api/2.0/mlflow/experiments/search)"
    reason = getattr(result, "reason", result)  # URLError wraps the socket error
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s: is the tracking server running, and reachable from here?"
    if isinstance(reason, ConnectionRefusedError):
        return "nothing answers there (connection refused): start the tracking server (mlflow server --host ... --port ...) or fix the address"
    if isinstance(reason, socket.gaierror):
        return f"the host name does not resolve ({reason.strerror or reason})"
    return f"could not reach it: {' '.join(str(reason).split())}"


def _tcp_problem(uri: str, timeout: float) -> str | None:
    import socket
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(uri)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        return f"not a database URL: {e}"
    if not host:
        return None  # a local socket: nothing to probe cheaply
    port = port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(parts.scheme.split("+")[0])
    if port is None:
        return None
    result = _in_time(lambda: socket.create_connection((host, port), timeout=timeout).close(), timeout + 0.5)
    if result is None:
        return None
    if isinstance(result, (TimeoutError, socket.timeout)):
        return f"the database at {host}:{port} did not answer within {timeout:g} s"
    if isinstance(result, ConnectionRefusedError):
        return f"nothing listens at {host}:{port} (connection refused)"
    return f"could not reach the database at {host}:{port}: {result}"


def _database_problem(uri: str, timeout: float) -> str | None:
    """A database that listens must also let the run in (user, password, database name):
    `tracking.server.database_problem`, waited for at most ~`timeout` s."""
    from sae_ray.tracking.server import database_problem

    result = _in_time(lambda: database_problem(uri, timeout), timeout + 2.5)  # libpq waits 2 s at least
    if isinstance(result, TimeoutError):
        return f"the database did not answer within {timeout:g} s"
    if isinstance(result, BaseException):
        return f"cannot connect to the database: {type(result).__name__}"  # never the text: it may hold the URI
    return result


def _writable_problem(path: str, what: str) -> str | None:
    """Whether `path` (a file or directory the run will create) can be created: its nearest existing
    ancestor must be a writable directory, and an existing `path` must itself be writable."""
    import os
    from pathlib import Path

    p = Path(path).expanduser()
    if p.exists():
        return None if os.access(p, os.W_OK) else f"{what} {str(p)!r} exists but is not writable"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{what} {str(p)!r} cannot be created: {str(parent)!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{what} {str(p)!r} cannot be created: the directory {str(parent)!r} is not writable"
    return None


def tracking_problems(cfg: RunConfig, timeout: float = 3.0) -> list[str]:
    """Whether the MLflow tracking store will take the run, found in at most ~`timeout` s.

    http(s): one GET of the REST API (experiments/search, max_results=1) must answer 2xx;
    postgresql/mysql/mssql: the database's port must accept a connection, and then the database
    must let the run in (one `SELECT 1` with its user and password); sqlite (the default
    under workdir): the database file must be creatable. A local artifact location must be
    creatable too. Databricks is not probed.
    """
    from urllib.parse import unquote, urlsplit

    uri = cfg.tracking_uri()
    from sae_ray.tracking.server import redact

    shown = f"tracking.uri: value {redact(uri)!r}" + ("" if cfg.tracking.uri else " (the default)")  # never a password
    scheme = uri.split(":", 1)[0].lower()
    problem = None
    if scheme in ("http", "https"):
        problem = _http_problem(uri, timeout)
    elif scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):  # the port first: a closed one is named at once
        problem = _tcp_problem(uri, timeout) or _database_problem(uri, timeout)
    elif scheme == "sqlite" and uri.startswith("sqlite:///"):
        problem = _writable_problem(uri[len("sqlite:///"):].split("?")[0], "the sqlite database")
    problems = [f"{shown}: {problem}"] if problem else []
    artifacts = cfg.artifact_location() or ""  # None: the tracking server's own location
    remote = "://" in artifacts or artifacts.startswith("mlflow-artifacts:")
    local = unquote(urlsplit(artifacts).path) if artifacts.startswith("file:") else (artifacts if artifacts and not remote else None)
    if local:
        problem = _writable_problem(local, "the artifact directory")
        if problem:
            problems.append(f"tracking.artifact_location: value {artifacts!r}"
                            + ("" if cfg.tracking.artifact_location else " (the default)") + f": {problem}")
    return problems
