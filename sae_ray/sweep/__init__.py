"""Sweeps: the plan (`sweep.plan`, no Ray), production (`sweep.production`), the Tune wiring
(`sweep.tuner`) and one trial (`sweep.trainable`); the report is `sae_ray.tracking.report`.

`from sae_ray.sweep import run_sweep, run_cache` is the front; importing the plan alone
(`sae_ray.sweep.plan`) does not import Ray.
"""

from __future__ import annotations

from typing import Any



class SweepError(RuntimeError):
    """Some trials of a sweep failed; the message has one line per failed trial (its root cause)."""


class SweepStopped(BaseException):
    """The sweep's driver got SIGTERM (`ray job stop`, a batch scheduler ending the job). Its
    MLflow runs were closed as KILLED before this was raised; the sweep resumes when run again.
    A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way swallows it."""


_RAY_NAMES = {"run_sweep": "tuner", "SweepResult": "tuner", "run_cache": "production",
              "start_production": "production", "connect_ray": "production"}


def __getattr__(name: str) -> Any:
    """The Ray-side names, imported on first use."""
    if name in _RAY_NAMES:
        import importlib

        return getattr(importlib.import_module(f"sae_ray.sweep.{_RAY_NAMES[name]}"), name)
    raise AttributeError(f"module 'sae_ray.sweep' has no attribute {name!r}")


__all__ = ["SweepError", "SweepStopped", *sorted(_RAY_NAMES)]
