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


def fit_sae(x, architecture: str = "topk", *, d_sae: int | None = None, k: int | None = None,
            l1_coefficient: float | None = None, l0_coefficient: float | None = None,
            target_l0: float | None = None, total_tokens: int | None = None, epochs: int | None = None,
            batch_size: int | None = None, lr: float | None = None, extra: dict | None = None,
            save: str | Path | None = None, device: str = "auto", seed: int = 0, on_log=None, **train):
    """Train one SAE on activations and return it, in eval mode, taking raw activations.

        sae = fit_sae(x, "topk", d_sae=4096, k=32)        # x: [N, d_in] -> sae.encode(x): [N, 4096]

    x: a tensor [N, d_in] (shuffled every epoch with `seed`, cut into batch_size rows), or an
    iterator of [B, d_in] batches (then total_tokens is required).
    architecture: "standard", "topk", "batchtopk", "jumprelu", "gated" or "matryoshka".
    d_sae: latents; default 8 * d_in (`sae_ray.presets.EXPANSION_FACTORS`, as `sae-ray init`).
    Sparsity, one of: k (topk, batchtopk, matryoshka); l1_coefficient (standard, gated) or
    l0_coefficient (jumprelu), held fixed; target_l0, for every architecture (k = target, or the
    coefficient steered to it while training, `sae_ray.train.target`). A coefficient architecture
    given none of them trains at its default λ (`SAE.target_start`: 5 for standard and gated,
    1 for jumprelu); a k architecture needs k or target_l0.
    total_tokens: rows to train on; default one pass over x, or `epochs` passes. With a
    tensor, epochs caps the passes: if they hold fewer rows than total_tokens, training ends
    early with a RuntimeWarning (as it does when an iterator ends early).
    batch_size, lr: default the rule of `sae_ray.presets` for total_tokens and d_sae, as `sae-ray
    init` writes them (at least 2,048 steps: batch total_tokens / 2,048 as a power of 2 in [256,
    4096]; lr 2e-4 * sqrt(2**14 / d_sae), larger for short runs, at most 3e-3); dead_tokens (a
    `TrainConfig` field) likewise total_tokens / 10, at most TrainConfig's 1M, so AuxK revives
    dead latents within a short run.
    extra: architecture knobs (`SAEConfig.extra`; each architecture's `knobs` lists them).
    save: a directory to write the SAE to in the SAELens layout (`sae_ray.formats.save_saelens`;
    `sae_ray.load_sae(path)` reads it back).
    device: "auto" (cuda if there is one), "cpu", "cuda" or "cuda:N". seed: the init (drawn
    without touching torch's global generator) and the shuffle.
    on_log(step, metrics), **train: as `sae_ray.train.loop.train_sae` takes them and any other
    `TrainConfig` field (e.g. dead_tokens=10_000, lr_decay="cosine").

    Raises ValueError for a bad argument (naming it) and RuntimeError when the quality monitor
    stopped the SAE (`train.monitor`; e.g. it stayed dense). For a stack of SAEs, checkpoints or
    the TrainState, call `sae_ray.train.loop.train_sae` itself.
    """
    import itertools

    import torch

    from sae_ray import presets
    from sae_ray.config import TrainConfig
    from sae_ray.devices import pick_device
    from sae_ray.sae import ARCHITECTURES, SAEConfig, create_sae
    from sae_ray.train.loop import train_sae

    if architecture not in ARCHITECTURES:
        raise ValueError(f"fit_sae: architecture={architecture!r}; accepted: {', '.join(sorted(ARCHITECTURES))}")
    cls = ARCHITECTURES[architecture]
    if isinstance(x, torch.Tensor):
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"fit_sae: x has shape {tuple(x.shape)}; expected rows [N >= 1, d_in]")
        d_in, batches = x.shape[1], x
        total_tokens = x.shape[0] * (epochs or 1) if total_tokens is None else total_tokens
    else:
        if epochs is not None:
            raise ValueError(f"fit_sae: epochs={epochs!r} is for a tensor x; an iterator of batches ends when it ends")
        if total_tokens is None:
            raise ValueError("fit_sae: total_tokens=None; an iterator of batches needs total_tokens (rows to train on)")
        it = iter(x)
        first = next(it, None)
        if first is None:
            raise ValueError("fit_sae: x is an iterator that yielded no batch")
        if not isinstance(first, torch.Tensor) or first.dim() != 2:
            what = f"shape {tuple(first.shape)}" if isinstance(first, torch.Tensor) else type(first).__name__
            raise ValueError(f"fit_sae: x's first batch is a {what}; expected tensors of rows [B, d_in]")
        d_in, batches = first.shape[-1], itertools.chain([first], it)

    given = {name: v for name, v in (("k", k), ("l1_coefficient", l1_coefficient),
                                     ("l0_coefficient", l0_coefficient)) if v is not None}
    param = cls.sparsity_param
    for name, v in given.items():
        if name != param:
            raise ValueError(f"fit_sae: {name}={v!r} does not apply to architecture {architecture!r}, whose "
                             f"sparsity is set by {param} (or target_l0)")
    if given and target_l0 is not None:
        raise ValueError(f"fit_sae: {param}={given[param]!r} and target_l0={target_l0!r}; give one of them")
    if param == "k":
        if not given and target_l0 is None:
            raise ValueError(f"fit_sae: architecture {architecture!r} needs k (latents kept per row) or target_l0")
        value, targets = given.get("k", round(target_l0) if target_l0 is not None else None), None
    else:
        value = given.get(param, cls.target_start)
        targets = None if target_l0 is None else [float(target_l0)]
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(cls.knobs))
    if unknown:
        raise ValueError(f"fit_sae: extra keys {unknown} are not knobs of {architecture!r}; accepted: "
                         f"{', '.join(cls.knobs)}")
    cfg = SAEConfig(architecture, d_in, presets.EXPANSION_FACTORS[0] * d_in if d_sae is None else d_sae,
                    extra=extra, **{param: value})
    for name, v in (("total_tokens", total_tokens), ("batch_size", batch_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"fit_sae: {name}={v!r}; expected a whole number of rows >= 1")
    batch_size = presets.batch_size_for(total_tokens) if batch_size is None else batch_size
    if lr is None:
        lr = presets.learning_rate(cfg.d_sae, presets.optimizer_steps(total_tokens, batch_size))
    train.setdefault("dead_tokens", presets.dead_tokens_for(total_tokens))  # as `sae-ray init` sets it
    train_cfg = TrainConfig(total_tokens=total_tokens, batch_size=batch_size, lr=lr, seed=seed, device=device, **train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = create_sae(cfg).to(pick_device(train_cfg.device))
    state = train_sae(sae, batches, train_cfg, on_log=on_log, targets=targets,
                      epochs=epochs if isinstance(x, torch.Tensor) else None)
    if state.sae is None:
        raise RuntimeError(f"fit_sae: the quality monitor stopped the SAE: {'; '.join(state.reasons[0])} "
                           "(train.monitor; pass monitor={'enabled': False} to train it to the end regardless)")
    if save is not None:
        from sae_ray.formats import save_saelens

        save_saelens(state.sae, save)
    return state.sae


def default_tracking_uri(workdir: str | Path = "runs/default") -> str:
    """The embedded MLflow store of a workdir: sqlite:///<workdir, absolute>/mlflow.db."""
    return f"sqlite:///{Path(workdir).expanduser().resolve() / 'mlflow.db'}"
