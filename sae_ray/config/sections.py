"""The config sections (pydantic models, one line of meaning per field) and the rules between
fields. Types and ranges are pydantic's; `rule_problems` checks what spans fields.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from sae_ray import default_tracking_uri
from sae_ray.dtypes import ActivationDtype
from sae_ray.paths import absolute
from sae_ray.config.fields import Device, Section, TrackingURI, adam_beta, ray_cpus, ray_gpus, bounded_repr


class ModelConfig(Section):
    name: str = Field(min_length=1, description="Hugging Face hub id, a local directory, or 'package:<python_package>/<subdir>' for a model a Python package ships.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); part of the buffer fingerprint.")
    dtype: ActivationDtype = Field("float32", description="dtype the model computes in.")
    device: Device = Field("auto", description="'auto' (cuda when the producer has a GPU, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    trust_remote_code: bool = Field(False, description="Allow code from the model repository to run. Off unless you trust it.")


class DataConfig(Section):
    path: str = Field(min_length=1, description="Hub dataset id, or a local file/directory (.txt, .json, .jsonl, .parquet).")
    name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", min_length=1, description="Dataset split.")
    text_column: str = Field("text", min_length=1, description="Column holding the text.")
    streaming: bool | None = Field(None, description="Stream the dataset; default: on for hub datasets, off for local files.")
    context_size: int = Field(128, gt=1, description="Tokens per packed context fed to the model.")
    batch_size: int = Field(16, gt=0, description="Contexts per forward pass.")
    max_documents: int | None = Field(None, gt=0, description="Stop after this many documents (None: the whole dataset).")


class HookPointConfig(Section):
    layer: int | None = Field(None, ge=0, description="Block index.")
    site: Literal["resid_pre", "resid_post", "mlp_out", "attn_out"] | None = Field(None, description="Where in the block.")
    module: str | None = Field(None, description="A raw module path (model.named_modules()); instead of layer+site.")


class BufferConfig(Section):
    path: str | None = Field(None, description="Zarr store directory; default <workdir>/buffer.")
    n_tokens: int = Field(1_000_000, gt=0, description="Rows (non-special tokens) to produce; production also stops when the dataset ends.")
    shard_rows: int = Field(65_536, gt=0, description="Rows per shard: the unit one producer writes at once.")
    chunk_rows: int = Field(4_096, gt=0, description="Rows per chunk: the unit of reading. Must divide shard_rows.")
    dtype: ActivationDtype = Field("float32", description="dtype activations are stored in.")
    codec: Literal["zstd", "lz4", "none"] = Field("zstd", description="Blosc codec (byte shuffle, 1 MiB blocks) or no compression.")
    codec_level: int = Field(1, ge=0, le=9, description="Blosc compression level.")
    max_gb: float | None = Field(None, gt=0, description="Bounded streaming window: producers wait while committed shards take this many GB; a shard is dropped once every trial has passed it. None: keep the whole buffer as a cache.")
    on_corrupt: Literal["fail", "skip"] = Field("fail", description="A shard that fails its checksum: stop with an error naming it, or skip it and count the rows skipped.")
    eval_fraction: float = Field(0.05, gt=0, le=0.5, description="Share of the documents held out (by a hash of the document index): training never reads their rows, and every figure of a trained SAE is measured on them. Part of the buffer's fingerprint.")


class ProducerConfig(Section):
    count: int = Field(1, gt=0, description="Number of producer actors (one per GPU on a GPU machine).")
    num_gpus: Annotated[float, AfterValidator(ray_gpus)] = Field(0, ge=0, description="GPU share each producer takes (0 on CPU; a share below 1, or whole GPUs).")
    num_cpus: Annotated[float, AfterValidator(ray_cpus)] = Field(1, ge=0, description="CPUs each producer takes.")
    max_restarts: int = Field(3, ge=0, description="Times Ray restarts a producer that died; it resumes where its committed rows end.")
    write_queue: int = Field(2, ge=1, description="Shards a producer may hold while its background writer writes (the forward pass never waits on Zarr unless this fills).")
    debug_delay_s: float = Field(0.0, ge=0, description="Debugging: seconds slept per document read and between writing and committing each shard (widens the window in which a kill lands mid-shard; crash drills use it). 0: off.")


class SweepConfig(Section):
    """The SAE search space: the grid is architectures x widths x (each architecture's own sparsity values)."""

    architectures: list[str] = Field(["topk"], min_length=1, description="SAE architectures to train (see sae_ray.sae.ARCHITECTURES).")
    expansion_factor: list[int] | None = Field(None, description="d_sae = expansion_factor * d_in. Give this or d_sae.")
    d_sae: list[int] | None = Field(None, description="Dictionary sizes. Give this or expansion_factor.")
    l1_coefficient: list[float] | None = Field(None, description="L1 sparsity coefficients (standard, gated).")
    l0_coefficient: list[float] | None = Field(None, description="L0 sparsity coefficients (jumprelu).")
    k: list[int] | None = Field(None, description="Active latents per token (topk, batchtopk, matryoshka).")
    max_stack: int = Field(8, gt=0, description="Most SAEs of one architecture and shape trained together in one trial (a stack; 1 = one SAE per trial). A stack reads each batch once; it is one trial with resources.cpus_per_trial, so on CPU smaller stacks spread SAEs over more cores. The README's benchmark section has the measured speed (sae-ray bench train).")
    extra: dict[str, dict[str, Any]] = Field({}, description="Architecture knobs by architecture, kept in each SAE's cfg.extra, e.g. {jumprelu: {bandwidth: 0.05}, topk: {k_aux: 256}}; each architecture's `knobs` lists what it reads.")


class MonitorConfig(Section):
    """The live quality monitor (`sae_ray.train.monitor`): verdicts on every SAE of a stack at each log step.
    The thresholds are our choices where no source gives a number; each description says which."""

    enabled: bool = Field(True, description="Watch every SAE at each log step: stop one whose loss or weights hold NaN/inf, that is dense, or no better than the mean; flag (warn) one that is fairly dense or mostly dead.")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Share of train.total_tokens before the dense, dead and FVU checks start (NaN/inf is checked from the first log step); FVU must also stay >= 1 this long to stop an SAE. 0.1 is our choice, twice the sparsity warmup of the Anthropic April 2024 update (0.05); no source gives one.")
    max_l0_fraction: float = Field(0.20, gt=0, le=1, description="Stop an SAE whose L0 is above this share of d_sae after the warmup, with its sparsity penalty at full strength (after train.sparsity_warmup_fraction), and not falling (no lower than at the first log step at full strength); above it at the end: warn. Dense latents: Anthropic April 2024 update, Gao et al. 2024; L0 as SAELens and SAEBench report it; 0.2 and the not-falling rule are our choices (no source gives a threshold).")
    warn_l0_fraction: float = Field(0.05, gt=0, le=1, description="Flag (warn) an SAE whose L0 is above this share of d_sae after the warmup, at full sparsity penalty; at most max_l0_fraction. 0.05 is our choice (no source gives a threshold).")
    max_dead_fraction: float = Field(0.5, ge=0, le=1, description="Flag (warn) an SAE with more than this share of latents dead (silent for train.dead_tokens tokens), as SAELens and SAEBench report the dead fraction (dead latents: Gao et al. 2024, Anthropic April 2024 update); 0.5 is our choice (no source gives a threshold).")

    @model_validator(mode="after")
    def _warn_below_stop(self) -> MonitorConfig:
        if self.warn_l0_fraction > self.max_l0_fraction:
            raise ValueError(f"warn_l0_fraction {self.warn_l0_fraction!r} > max_l0_fraction {self.max_l0_fraction!r}: "
                             "the warning level must be at or below the stop level")
        return self


class TrainConfig(Section):
    """How each SAE (or stack of SAEs) is trained; defaults follow the published recipes named per field."""

    total_tokens: int = Field(1_000_000, gt=0, description="Training tokens per SAE (rows are reused over epochs if the buffer is smaller).")
    batch_size: int = Field(4096, gt=0, description="Rows per optimizer step (4096: SAELens, Anthropic April 2024 update).")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate (SAELens default).")
    lr_warmup_steps: int = Field(1000, ge=0, description="Linear lr warmup over this many steps, capped at 10% of the run (1000: sparsify, dictionary_learning, Gemma Scope).")
    lr_decay: Literal["none", "linear", "cosine"] = Field("linear", description="'linear': down to lr_end_factor*lr over the last lr_decay_fraction of steps (Anthropic April 2024 update); 'cosine': over the whole run after warmup.")
    lr_decay_fraction: float = Field(0.2, gt=0, le=1, description="Share of the run, at its end, over which 'linear' decay runs (Anthropic April 2024 update, dictionary_learning: 0.2).")
    lr_end_factor: float = Field(0.0, ge=0, le=1, description="lr at the end of decay, as a multiple of lr (Anthropic April 2024 update: 0).")
    sparsity_warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Share of the run over which the sparsity penalty ramps linearly from 0 to full (Anthropic April 2024 update: 0.05).")
    adam_betas: tuple[Annotated[float, AfterValidator(adam_beta)], Annotated[float, AfterValidator(adam_beta)]] | None = Field(None, description="Adam betas, each in [0, 1); None: the architecture's own (0.9, 0.999) for most, as SAELens; (0, 0.999) for JumpReLU, as Gemma Scope.")
    grad_clip_norm: float = Field(1.0, ge=0, description="Clip the gradient norm (per stack member) to this; 0 turns clipping off (Anthropic April 2024 update, SAELens: 1.0).")
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = Field("geometric_median", description="Initial b_dec from the first rows of data (geometric median: SAELens, Bricken et al. 2023, Gao et al. 2024).")
    normalize_activations: Literal["expected_norm", "none"] = Field("expected_norm", description="'expected_norm': train on x*s, s = sqrt(d_in / E||x||^2), folded into the saved weights (as SAELens's E||x|| = sqrt(d_in)).")
    init_batches: int = Field(10, gt=0, description="Batches read before training to estimate s and b_dec; they are then trained on like the rest.")
    autocast: Literal["auto", "bf16", "off"] = Field("auto", description="bfloat16 autocast of the forward pass; 'auto': on for CUDA, off for CPU.")
    seed: int = Field(0, ge=0, description="Seed for SAE init and the reader's shard order.")
    log_every: int = Field(20, gt=0, description="Steps between metric reports.")
    eval_rows: int = Field(8192, gt=0, description="Held-out rows the final FVU, L0 and dead fraction are measured on: the first ones in shard order, the same for every SAE of the buffer (buffer.eval_fraction must hold this many).")
    dead_tokens: int = Field(1_000_000, gt=0, description="A latent that has not fired for this many tokens counts as dead.")
    device: Device = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    keep_freed_memory: bool = Field(True, description="On CPU (Linux, glibc) a trial keeps the memory it frees for the next step instead of handing it back to the kernel, which zeroes it again every step (sae_ray.train.memory). The trial keeps its peak memory until it ends; the README's benchmark section has what it gains (sae-ray bench train).")
    wait_for_buffer: bool = Field(False, description="Wait for the whole buffer before training (default: start as soon as a shard is committed).")
    monitor: MonitorConfig = MonitorConfig()


class TrackingConfig(Section):
    uri: TrackingURI | None = Field(None, description="MLflow tracking URI: sqlite:///<path>, http(s)://<host>:<port>, postgresql://..., mysql://..., mssql://... or databricks (MLflow 3 refuses a plain file store); default sqlite:///<workdir>/mlflow.db. Use an http:// server on a cluster.")
    artifact_location: str | None = Field(None, description="Where artifacts go; default <workdir>/mlartifacts (ignored for an existing experiment).")
    experiment: str = Field("sae-ray", min_length=1, description="MLflow experiment name.")
    register_models: bool = Field(True, description="Register every trained SAE in the model registry.")


class ResourcesConfig(Section):
    cpus_per_trial: Annotated[float, AfterValidator(ray_cpus)] = Field(1, gt=0, description="CPUs each Tune trial takes.")
    gpus_per_trial: Annotated[float, AfterValidator(ray_gpus)] = Field(0, ge=0, description="GPU share each Tune trial takes (a share below 1, or whole GPUs).")
    max_concurrent_trials: int | None = Field(None, gt=0, description="Cap on trials running at once (None: as resources allow).")


class RunConfig(Section):
    name: str = Field("sae-sweep", min_length=1, description="Name of the sweep (parent MLflow run, Tune experiment).")
    workdir: str = Field("runs/default", min_length=1, description="Directory for the buffer, MLflow store and Tune results (relative to the current directory).")
    model: ModelConfig
    data: DataConfig
    hooks: list[HookPointConfig] = Field(min_length=1, description="Hook points to capture.")
    buffer: BufferConfig = BufferConfig()
    producers: ProducerConfig = ProducerConfig()
    sae: SweepConfig = SweepConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    resources: ResourcesConfig = ResourcesConfig()

    # -- resolved paths ---------------------------------------------------------------
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    def buffer_path(self) -> str:
        return self.buffer.path or str(self.workdir_path() / "buffer")

    def tracking_uri(self) -> str:
        return self.tracking.uri or default_tracking_uri(self.workdir_path())

    def artifact_location(self) -> str:
        return self.tracking.artifact_location or (self.workdir_path() / "mlartifacts").as_uri()

    def with_absolute_paths(self) -> "RunConfig":
        """Relative paths made absolute against the current directory.

        Done in the driver before the config travels to actors and trials: Tune runs each
        trial in its own working directory, where a relative path means something else.
        """

        buffer_path = self.buffer.path
        if buffer_path and "://" not in buffer_path:  # the buffer may not exist yet
            buffer_path = str(Path(buffer_path).expanduser().resolve())
        return self.model_copy(update={
            "workdir": str(self.workdir_path()),
            "model": self.model.model_copy(update={"name": absolute(self.model.name)}),
            "data": self.data.model_copy(update={"path": absolute(self.data.path)}),
            "buffer": self.buffer.model_copy(update={"path": buffer_path}),
        })


# ---------------------------------------------------------------------------------------
# Rules between fields (pydantic checks types and ranges; these check meaning)
# ---------------------------------------------------------------------------------------

def rule_problems(sections: dict[str, BaseModel]) -> list[str]:
    """Checks that span fields. `sections` holds the sections that validated on their own."""
    from sae_ray.sae import ARCHITECTURES

    problems: list[str] = []
    sweep: SweepConfig | None = sections.get("sae")  # type: ignore[assignment]
    if sweep is not None:
        if (sweep.expansion_factor is None) == (sweep.d_sae is None):
            problems.append(
                f"sae: expansion_factor={sweep.expansion_factor!r}, d_sae={sweep.d_sae!r}: give exactly one of them (a list of widths)"
            )
        for field in ("expansion_factor", "d_sae", "k"):
            values = getattr(sweep, field)
            if values is not None and (not values or any(v <= 0 for v in values)):
                problems.append(f"sae.{field}: value {values!r}: must be a non-empty list of positive integers")
        for arch in sweep.architectures:
            if arch not in ARCHITECTURES:
                problems.append(f"sae.architectures: value {arch!r}: unknown; accepted: {sorted(ARCHITECTURES)}")
                continue
            param = ARCHITECTURES[arch].sparsity_param
            values = getattr(sweep, param)
            is_coefficient = param != "k"
            if not values:
                problems.append(
                    f"sae.{param}: value {values!r}: architecture {arch!r} needs a non-empty list of {param} values"
                    + (" (> 0; without a sparsity penalty it learns dense, useless features)" if is_coefficient else "")
                )
            elif is_coefficient and any(v <= 0 for v in values):
                problems.append(
                    f"sae.{param}: value {values!r}: architecture {arch!r} needs every coefficient > 0 "
                    "(0 trains with no sparsity penalty and gives dense, useless features)"
                )
            elif param == "k" and sweep.d_sae:
                too_big = [k for k in values if k >= min(sweep.d_sae)]
                if too_big:
                    problems.append(f"sae.k: value {too_big!r}: k must be < d_sae (smallest d_sae is {min(sweep.d_sae)})")
        for arch, knobs in sweep.extra.items():
            if arch not in sweep.architectures:
                problems.append(f"sae.extra: key {arch!r}: not one of sae.architectures {sweep.architectures!r}")
            elif arch in ARCHITECTURES:
                accepted = ARCHITECTURES[arch].knobs
                for key in knobs:
                    if key not in accepted:
                        problems.append(f"sae.extra.{arch}: key {key!r}: unknown for {arch}; accepted: {sorted(accepted)}")
    for i, hook in enumerate(sections.get("hooks") or []):
        if hook.module is None and (hook.layer is None or hook.site is None):
            problems.append(f"hooks[{i}]: value {hook.model_dump(exclude_none=True)!r}: give layer and site, or module")
        if hook.module is not None and (hook.layer is not None or hook.site is not None):
            problems.append(f"hooks[{i}]: value {hook.model_dump(exclude_none=True)!r}: give module alone, not with layer/site")
    buf: BufferConfig | None = sections.get("buffer")  # type: ignore[assignment]
    if buf is not None and buf.shard_rows % buf.chunk_rows:
        problems.append(f"buffer.chunk_rows: value {buf.chunk_rows}: must divide buffer.shard_rows ({buf.shard_rows})")
    train: TrainConfig | None = sections.get("train")  # type: ignore[assignment]
    buf, train = buf or BufferConfig(), train or TrainConfig()
    if buf.n_tokens * buf.eval_fraction < train.eval_rows:
        problems.append(f"buffer.eval_fraction: value {buf.eval_fraction}: holds out about "
                        f"{buf.n_tokens * buf.eval_fraction:,.0f} of buffer.n_tokens {buf.n_tokens:,} rows, fewer than "
                        f"train.eval_rows {train.eval_rows:,}: raise buffer.eval_fraction or n_tokens, or lower train.eval_rows")
    problems += _duplicates_and_devices(sections)
    return problems


def _duplicates_and_devices(sections: dict[str, Any]) -> list[str]:
    """Duplicates in the grid and the hooks, knobs that are not finite numbers, a cuda:N that Ray hides."""
    problems: list[str] = []
    sweep: SweepConfig | None = sections.get("sae")
    if sweep is not None:
        for field in ("architectures", "expansion_factor", "d_sae", "k", "l1_coefficient", "l0_coefficient"):
            values = getattr(sweep, field) or []
            twice = sorted({v for v in values if values.count(v) > 1}, key=str)
            if twice:
                problems.append(f"sae.{field}: value {bounded_repr(values)}: lists {', '.join(map(repr, twice))} more than once; "
                                "give each value once (a duplicate trains the same SAE twice, under one name)")
        for arch, knobs in sweep.extra.items():
            for key, v in knobs.items():
                if isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
                    problems.append(f"sae.extra.{arch}.{key}: value {v!r}: expected a finite number")
    hooks = sections.get("hooks") or []
    for i, hook in enumerate(hooks):
        first = next(j for j, h in enumerate(hooks) if h == hook)
        if first < i:
            problems.append(f"hooks[{i}]: value {hook.model_dump(exclude_none=True)!r}: the same hook point as hooks[{first}]; give each once")
    for device_field, gpus_field, section, gpus_section in (("model.device", "producers.num_gpus", "model", "producers"),
                                                            ("train.device", "resources.gpus_per_trial", "train", "resources")):
        device = getattr(sections.get(section), "device", None)
        gpus = getattr(sections.get(gpus_section), gpus_field.split(".")[1], None)
        if device and device.startswith("cuda:") and gpus and int(device[5:]) >= math.ceil(gpus):
            problems.append(f"{device_field}: value {device!r}: Ray shows each {'producer' if section == 'model' else 'trial'} "
                            f"only the GPU(s) it reserves ({gpus_field} {gpus:g}: cuda:0..cuda:{math.ceil(gpus) - 1}); "
                            "use 'cuda' or 'auto'")
    return problems


