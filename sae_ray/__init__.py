"""sae-ray: train sweeps of sparse autoencoders on transformer activations (Ray + Zarr + MLflow)."""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

DEFAULT_TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def load_sae(uri: str, tracking_uri: str | None = None, device: str = "cpu"):
    """Load an SAE module (in eval mode) from `models:/NAME/VERSION`, `models:/NAME@ALIAS`, or a local SAELens directory.

    tracking_uri: the MLflow store holding the registry; default $MLFLOW_TRACKING_URI, else
    the embedded default of the default workdir (sqlite:///runs/default/mlflow.db).
    """
    from sae_ray.formats import load_sae_dir

    if not uri.startswith("models:/"):
        if not Path(uri).is_dir():
            raise FileNotFoundError(f"load_sae: {uri!r} is neither a models:/ URI nor an existing directory")
        return load_sae_dir(uri, device=device).eval()
    from sae_ray import tracking

    tracking_uri = tracking_uri or os.environ.get(DEFAULT_TRACKING_URI_ENV) or default_tracking_uri()
    path = tracking.download_sae(tracking.client_for(tracking_uri), uri)
    return load_sae_dir(path, device=device).eval()  # eval: BatchTopK-style SAEs use their inference threshold


def default_tracking_uri(workdir: str | Path = "runs/default") -> str:
    """The embedded MLflow store of a workdir: sqlite:///<workdir, absolute>/mlflow.db."""
    return f"sqlite:///{Path(workdir).expanduser().resolve() / 'mlflow.db'}"
