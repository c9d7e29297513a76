"""MLflow: experiments, parent/child runs, SAE artifacts, the model registry, lookups.

Everything goes through an explicit `MlflowClient(tracking_uri)` rather than MLflow's
global state, because trials run in other processes (and on other machines). MLflow is
imported inside the functions that use it, so `import sae_ray` (which exports
`find_saes` from `tracking.registry`) does not pay for importing MLflow.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from mlflow import MlflowClient

SAE_ARTIFACT_PATH = "sae"
"""Artifact folder, inside a trial's run, that holds the SAELens-layout SAE."""

T = TypeVar("T")


def client_for(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def retry(fn: Callable[[], T], attempts: int = 8, wait: float = 0.25) -> T:
    """Run fn, retrying on errors such as sqlite's 'database is locked' (several trials write at once)."""
    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            return fn()
        except MlflowException as e:
            if i == attempts - 1 or "locked" not in str(e).lower() and "operationalerror" not in str(e).lower():
                raise
            time.sleep(wait * (2**i))
    raise AssertionError("unreachable")


def ensure_experiment(uri: str, name: str, artifact_location: str | None) -> str:
    """Experiment id for `name`, created with `artifact_location` if it does not exist.

    Also creates the sqlite schema on first use, so call it once from the driver before
    trials start (concurrent first-time migrations from several processes race).
    """
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = client_for(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists become JSON strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = [Param(k, v[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
        retry(lambda: client.log_batch(run_id, params=flat[i : i + 100]))


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    retry(lambda: client.log_batch(run_id, metrics=batch))


def start_run(uri: str, experiment_id: str, name: str, parent_run_id: str | None = None, tags: dict | None = None) -> str:
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return retry(lambda: client_for(uri).create_run(experiment_id, run_name=name, tags=tags)).info.run_id


def registry_name(model_name: str, hook_name: str) -> str:
    """One registered model per (model, hook point), e.g. 'EleutherAI--pythia-70m__blocks.3.hook_resid_post'.

    '/' and ':' are replaced because `models:/NAME/VERSION` URIs split on them.
    """
    return f"{model_key(model_name)}__{hook_name}"


def model_key(model_name: str) -> str:
    """The model's part of its registry names: 'EleutherAI/pythia-70m' -> 'EleutherAI--pythia-70m',
    a local path -> its last folder's name."""
    model = model_name.removeprefix("package:").rstrip("/")
    if model.startswith(("/", ".", "~")):
        model = Path(model).name
    return re.sub(r"[/:@\s]+", "--", model.strip("/"))


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The id of the run of the experiment that carries every one of `tags` (the oldest if several), or None."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = retry(lambda: client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1))
    return runs[0].info.run_id if runs else None


def close_open_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str, reason: str) -> list[str]:
    """End every child run of `parent_run_id` still RUNNING as `status` (FAILED or KILLED), with
    `reason` in its `sae_ray.closed` tag; returns their ids. For runs a dead process left open."""
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    runs = retry(lambda: client.search_runs([experiment_id], query, max_results=10_000))
    for run in runs:
        client.set_tag(run.info.run_id, "sae_ray.closed", reason)
        client.set_terminated(run.info.run_id, status=status)
    return [r.info.run_id for r in runs]


def register_sae(client: MlflowClient, name: str, run_id: str, tags: dict[str, Any]) -> str:
    """Register the run's SAE artifact as a version of `name`; returns the version. Idempotent:
    a run that already has a version of `name` gets that version back, not a second one.
    A registered model is created with its description and its model, hook and d_in tags
    (`registry.describe_model`); each sweep's end refreshes them (`registry.refresh_model`)."""
    from mlflow.exceptions import MlflowException

    from sae_ray.tracking.registry import describe_model

    existing = retry(lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    if existing:
        return min(existing, key=lambda v: int(v.version)).version
    hook = str(tags.get("hook") or name.split("__", 1)[-1])
    model = str(tags.get("model") or name.split("__", 1)[0])
    description, model_tags = describe_model(model, hook, tags.get("d_in"))
    try:
        retry(lambda: client.create_registered_model(name, tags=model_tags, description=description))
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{SAE_ARTIFACT_PATH}"
    mv = retry(lambda: client.create_model_version(name, source, run_id, tags={k: str(v) for k, v in tags.items()}))
    return mv.version


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'NAME', 'NAME@ALIAS', 'NAME/VERSION' or 'models:/…' -> (name, alias, version)."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, None, version
    return ref, None, None


def resolve_version(client: MlflowClient, ref: str):
    """The ModelVersion a reference points to (latest version when none is named)."""
    name, alias, version = parse_model_ref(ref)
    if alias:
        return client.get_model_version_by_alias(name, alias)
    if version:
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise ValueError(f"registered model {name!r} has no versions (see `sae-ray registry list`)")
    return max(versions, key=lambda v: int(v.version))


def download_sae(client: MlflowClient, ref: str, dst: str | None = None) -> str:
    """Local directory holding the SAELens files of a registered version."""
    import mlflow.artifacts

    mv = resolve_version(client, ref)
    dst = dst or tempfile.mkdtemp(prefix="sae-ray-")
    return mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=dst, tracking_uri=client.tracking_uri)
