"""Which sweep a `sae-ray run` continues: the sweep record under the workdir. No Ray.

    <workdir>/sweeps/<name>.json   {"status": "running" | "finished", "parent_run_id",
                                    "tune_path", "config": what matters of the config}

`run_sweep` writes the record when a sweep starts and marks it finished at the end. A rerun
of the same config (same `name` and `workdir`) while the record says "running" (the driver
was killed, or a trial failed) resumes that sweep: Tune's experiment under `tune_path`
(`Tuner.restore`), the same parent MLflow run. What matters is the whole config except the
fields in `IGNORED`; a rerun whose config differs in anything else is refused, naming the
fields (`--fresh` starts a new sweep instead and deletes nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_ray.config import RunConfig
from sae_ray.config.fields import bounded_repr
from sae_ray.sweep import SweepError

IGNORED = ("producers",)
"""Config fields (dotted; a section for all its fields) a resumed sweep may change: only the
producers, which the driver starts anew. Everything else is baked into the trials Tune saved
(a restored trial runs with the config it was created with), so a change is refused."""


def record_path(cfg: RunConfig) -> Path:
    return cfg.workdir_path() / "sweeps" / f"{cfg.name}.json"


def what_matters(cfg: RunConfig) -> dict[str, Any]:
    """The config as flat {dotted field: value}, without the IGNORED fields."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", cfg.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in IGNORED)}


def _read(path: Path) -> dict[str, Any] | None:
    """The sweep record at `path` (None if there is none); SweepError naming it if it is damaged."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise ValueError("not a sweep record")
        return record
    except (ValueError, UnicodeDecodeError) as e:
        raise SweepError(f"sweep record {path} is damaged ({e}): delete it, or run with --fresh "
                         "(a new sweep; the old runs and checkpoints stay where they are)") from None


def open_sweep(cfg: RunConfig, fresh: bool) -> dict[str, Any] | None:
    """The record of an unfinished sweep this run resumes, or None for a new sweep. SweepError
    when the unfinished sweep's config differs in a field that matters (and not `fresh`)."""
    if fresh:
        return None
    record = _read(record_path(cfg))
    if record is None or record.get("status") != "running":
        return None
    path = record_path(cfg)
    old, new = record["config"], what_matters(cfg)
    changed = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    if changed:
        lines = [f"  {k}: {bounded_repr(old.get(k, '<absent>'))} -> {bounded_repr(new.get(k, '<absent>'))}" for k in changed]
        raise SweepError(f"sweep {cfg.name!r} in {cfg.workdir_path()} did not finish, and this config differs from its "
                         f"config in {len(changed)} field(s) its trials were created with:\n" + "\n".join(lines) +
                         f"\nrun the same config again to resume it, or add --fresh to start a new sweep "
                         f"(nothing is deleted; the unfinished one is closed as KILLED); record: {path}")
    return record


def write_record(cfg: RunConfig, status: str, parent_run_id: str, tune_path: str) -> None:
    path = record_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"status": status, "parent_run_id": parent_run_id, "tune_path": tune_path, "config": what_matters(cfg)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def unfinished(cfg: RunConfig) -> dict[str, Any] | None:
    """The record of this sweep if it did not finish (whatever its config), else None."""
    try:
        record = _read(record_path(cfg))
    except SweepError:  # --fresh over a damaged record: nothing to close
        return None
    return record if record is not None and record.get("status") == "running" else None
