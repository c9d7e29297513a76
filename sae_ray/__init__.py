"""sae-ray: train sweeps of sparse autoencoders on transformer activations (Ray + Zarr + MLflow)."""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

DEFAULT_TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"

from sae_ray.tracking.registry import find_saes  # noqa: E402,F401 (the registry query; MLflow loads on the first call)


def load_sae(uri: str, tracking_uri: str | None = None, device: str = "cpu"):
    """Load an SAE module (in eval mode) from `models:/NAME/VERSION`, `models:/NAME@ALIAS`, or a local
    path in any format `sae_ray.formats.load_sae_path` reads (SAELens, sparsify, Gemma Scope).

    tracking_uri: the MLflow store holding the registry; default $MLFLOW_TRACKING_URI, else
    the embedded default of the default workdir (sqlite:///runs/default/mlflow.db).
    """
    from sae_ray.formats import load_sae_dir

    if not uri.startswith("models:/"):  # a local path: SAELens or sparsify directory, Gemma Scope params.npz
        if not Path(uri).exists():
            raise FileNotFoundError(f"load_sae: {uri!r} is neither a models:/ URI nor an existing path")
        from sae_ray.formats import load_sae_path

        return load_sae_path(uri, device=device).eval()
    from sae_ray import tracking

    tracking_uri = tracking_uri or os.environ.get(DEFAULT_TRACKING_URI_ENV) or default_tracking_uri()
    path = tracking.download_sae(tracking.client_for(tracking_uri), uri)
    return load_sae_dir(path, device=device).eval()  # eval: BatchTopK-style SAEs use their inference threshold


def default_tracking_uri(workdir: str | Path = "runs/default") -> str:
    """The embedded MLflow store of a workdir: sqlite:///<workdir, absolute>/mlflow.db."""
    return f"sqlite:///{Path(workdir).expanduser().resolve() / 'mlflow.db'}"
