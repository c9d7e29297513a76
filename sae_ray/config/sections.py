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
    name: str = Field(min_length=1, description="Hugging Face hub id, a local directory, 'package:<python_package>/<subdir>' for a model a Python package ships, or 'gguf:<python_package>/<file.gguf>' / 'gguf:<path.gguf>' for a GGUF file (converted once to safetensors under $SAE_RAY_CACHE, default ~/.cache/sae-ray).")
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
    site: Literal["resid_pre", "resid_post", "mlp_in", "mlp_out", "attn_out"] | None = Field(None, description="Where in the block (mlp_in: the MLP's input, the output of the pre-MLP norm; its buffer array is blocks.L.ln2.hook_normalized).")
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
    resources: dict[str, float] = Field({}, description="Custom Ray resources each producer asks for, e.g. {producer: 1}: producers then run only on the nodes that declare them (`ray start --resources`, a cluster config's node types).")
    max_restarts: int = Field(3, ge=0, description="Times Ray restarts a producer that died; it resumes where its committed rows end.")
    write_queue: int = Field(2, ge=1, description="Shards a producer may hold while its background writer writes (the forward pass never waits on Zarr unless this fills).")
    debug_delay_s: float = Field(0.0, ge=0, description="Debugging: seconds slept per document read and between writing and committing each shard (widens the window in which a kill lands mid-shard; crash drills use it). 0: off.")


class TranscoderConfig(Section):
    """A transcoder: it reads the activation at `input` and reconstructs the one at `output` of the
    same tokens (e.g. an MLP's input and output: it stands in for the MLP). Both hook points are
    captured into the buffer with `hooks:` (added to it when missing), side by side in the same rows."""

    input: HookPointConfig = Field(description="The hook point it reads, e.g. {layer: 3, site: mlp_in}.")
    output: HookPointConfig = Field(description="The hook point it reconstructs, e.g. {layer: 3, site: mlp_out}; a site without a layer takes input's layer. Must come after input in the forward pass.")
    skip: bool = Field(False, description="A learned skip connection W_skip [d_out, d_in] (skip transcoder, Paulo et al. 2025): the reconstruction gains x_in @ W_skip^T.")

    def points(self) -> tuple[HookPointConfig, HookPointConfig]:
        """(input, output), output's layer filled in from input's where output names a site without one."""
        out = self.output
        if out.module is None and out.layer is None and out.site is not None and self.input.layer is not None:
            out = HookPointConfig(layer=self.input.layer, site=out.site)
        return self.input, out


class SweepConfig(Section):
    """The SAE search space: the grid is architectures x widths x (each architecture's own sparsity values)."""

    architectures: list[str] = Field(["topk"], min_length=1, description="SAE architectures to train (see sae_ray.sae.ARCHITECTURES).")
    expansion_factor: list[int] | None = Field(None, description="d_sae = expansion_factor * d_in. Give this or d_sae.")
    d_sae: list[int] | None = Field(None, description="Dictionary sizes. Give this or expansion_factor.")
    l1_coefficient: list[float] | None = Field(None, description="L1 sparsity coefficients (standard, gated).")
    l0_coefficient: list[float] | None = Field(None, description="L0 sparsity coefficients (jumprelu).")
    k: list[int] | None = Field(None, description="Active latents per token (topk, batchtopk, matryoshka).")
    target_l0: list[int] | None = Field(None, description="A target-L0 ladder, the sparsity axis for every architecture that is not given its own coefficient or k list: TopK, BatchTopK and Matryoshka train with k = target; ReLU+L1, Gated and JumpReLU adapt their coefficient during training (train.l0_control) so the final L0 lands near the target.")
    max_stack: int | None = Field(None, gt=0, description="Most SAEs of one architecture and shape trained together in one trial (a stack: it reads each batch once, and on a GPU trains all its SAEs in one launch). None (the default) follows the rule of sweep.plan.stack_limit: stacks of up to AUTO_MAX_STACK (8) where trials have a GPU (resources.gpus_per_trial > 0), read a bounded window (buffer.max_gb: every trial must run at once) or are searched or scheduled (sweep.search, sweep.scheduler: trials are drawn and ranked as stacks); one SAE per trial on CPU otherwise, where a stack trains no faster than its SAEs one after another and separate trials spread over the cores (sae-ray bench train). A number: stacks of up to that many wherever trials run.")
    extra: dict[str, dict[str, Any]] = Field({}, description="Architecture knobs by architecture, kept in each SAE's cfg.extra, e.g. {jumprelu: {bandwidth: 0.05}, topk: {k_aux: 256}}; each architecture's `knobs` lists what it reads.")
    transcoder: TranscoderConfig | None = Field(None, description="Train transcoders instead of SAEs: the grid (architectures x widths x sparsity) is trained from transcoder.input to transcoder.output, and `hooks:` only lists what else the buffer captures (it may be left out). None: SAEs on every hook of `hooks:`.")


class MonitorConfig(Section):
    """The live quality monitor (`sae_ray.train.monitor`): verdicts on every SAE of a stack at each log step.
    The thresholds are our choices where no source gives a number; each description says which."""

    enabled: bool = Field(True, description="Watch every SAE at each log step: stop one whose loss or weights hold NaN/inf, that is dense, or no better than the mean; flag (warn) one that is fairly dense or mostly dead.")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Share of train.total_tokens before the dense, dead and FVU checks start (NaN/inf is checked from the first log step); FVU must also stay >= 1 this long, and not fall, to stop an SAE. 0.1 is our choice, twice the sparsity warmup of the Anthropic April 2024 update (0.05); no source gives one.")
    max_l0_fraction: float = Field(0.20, gt=0, le=1, description="Stop an SAE whose L0 is above this share of d_sae after the warmup, with its sparsity penalty at full strength (after train.sparsity_warmup_fraction), and not falling (no lower than at the first log step at full strength); above it at the end: warn. Dense latents: Anthropic April 2024 update, Gao et al. 2024; L0 as SAELens and SAEBench report it; 0.2 and the not-falling rule are our choices (no source gives a threshold).")
    warn_l0_fraction: float = Field(0.05, gt=0, le=1, description="Flag (warn) an SAE whose L0 is above this share of d_sae after the warmup, at full sparsity penalty; at most max_l0_fraction. 0.05 is our choice (no source gives a threshold).")
    max_dead_fraction: float = Field(0.5, ge=0, le=1, description="Flag (warn) an SAE with more than this share of latents dead (silent for train.dead_tokens tokens), as SAELens and SAEBench report the dead fraction (dead latents: Gao et al. 2024, Anthropic April 2024 update); 0.5 is our choice (no source gives a threshold).")

    @model_validator(mode="after")
    def _warn_below_stop(self) -> MonitorConfig:
        if self.warn_l0_fraction > self.max_l0_fraction:
            raise ValueError(f"warn_l0_fraction {self.warn_l0_fraction!r} > max_l0_fraction {self.max_l0_fraction!r}: "
                             "the warning level must be at or below the stop level")
        return self


class L0ControlConfig(Section):
    """The L0 controller of target-L0 runs (`sae_ray.train.target`): each step, log λ += gain * clip(clip(log(L0 / target)) + clip(steps left * d log L0 / step)), each clip to [-1, 1]."""

    gain: float = Field(0.03, gt=0, le=1, description="Step size in log λ per optimizer step at an L0 e times off target (our choice: λ can change by e^3 in 100 steps, enough for runs of a few hundred steps; on the synthetic problem of the tests 0.05 overshot JumpReLU's L0 by half and landed 16% low, 0.03 landed within 10%).")
    trend_steps: int = Field(20, gt=0, description="Steps over which the controller measures the trend of log L0 (its reservoir measurements of the last this many steps); it acts on the L0 that trend predicts for the end of the control span, so λ falls while an SAE's L0 is on course to pass its target even though it is still above it (an L1 SAE's L0 falls on its own: on the quickstart from 250 to 104 in 85 steps at a fixed λ). 20 (four measurements at measure_every 5) is our choice; it replaced a patience rule that let the quickstart's ReLU+L1 end 9% / 26% under targets 64 / 128, the trend ends it at +9% / -1% (full training split).")
    reservoir_rows: int = Field(4096, gt=0, description="Rows of the reservoir the controller measures L0 on: a uniform sample of every row trained on so far (sae_ray.train.target.RowReservoir). 4096 is our choice: on the quickstart the L0 of its 4096 rows was 54.4 where the L0 of all 143k training rows was 54.8.")
    measure_every: int = Field(5, gt=0, description="Steps between two L0 measurements on the reservoir (the controller steps every step on the last one). 5 is our choice: encoding 4096 rows every 5 steps of 1024 costs about a tenth of the control span's training time.")
    freeze_fraction: float = Field(0.05, ge=0, lt=1, description="Share of the run, at its end, with λ frozen: the SAE settles under a fixed objective while the lr decays (our choice: with 0.2 JumpReLU's L0 drifted 25% under target after the freeze on the synthetic problem of the tests; on the quickstart ReLU+L1's L0 fell 4-7% in the 29 frozen steps of 0.1, 0.05 halves that drift).")


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
    checkpoint_every: int | None = Field(None, gt=0, description="Tokens between checkpoints of a trial (every member's weights, Adam's state, the reader's position, the monitor and the L0 controller); a trial whose worker dies, or a sweep whose driver was killed, goes on from the last one. None: every fifth of train.total_tokens.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per trial (Tune's CheckpointConfig.num_to_keep); older ones are deleted.")
    monitor: MonitorConfig = MonitorConfig()
    l0_control: L0ControlConfig = L0ControlConfig()


class TrackingConfig(Section):
    uri: TrackingURI | None = Field(None, description="MLflow tracking URI: sqlite:///<path>, http(s)://<host>:<port>, postgresql://..., mysql://..., mssql://... or databricks (MLflow 3 refuses a plain file store); default sqlite:///<workdir>/mlflow.db. Use an http:// server on a cluster.")
    artifact_location: str | None = Field(None, description="Where artifacts go; default <workdir>/mlartifacts, or the server's own (proxied) location for an http(s) tracking URI (ignored for an existing experiment).")
    experiment: str = Field("sae-ray", min_length=1, description="MLflow experiment name.")
    register_models: bool = Field(True, description="Register every trained SAE in the model registry.")


class ResourcesConfig(Section):
    cpus_per_trial: Annotated[float, AfterValidator(ray_cpus)] = Field(1, gt=0, description="CPUs each Tune trial takes.")
    gpus_per_trial: Annotated[float, AfterValidator(ray_gpus)] = Field(0, ge=0, description="GPU share each Tune trial takes (a share below 1, or whole GPUs).")
    trial_resources: dict[str, float] = Field({}, description="Custom Ray resources each trial asks for, e.g. {trainer: 1}: trials then run only on the nodes that declare them.")
    max_concurrent_trials: int | None = Field(None, gt=0, description="Cap on trials running at once (None: as resources allow).")
    max_failures: int = Field(2, ge=0, description="Times Tune restarts a trial whose worker died or raised; it goes on from its last checkpoint (train.checkpoint_every) with the same MLflow runs. Tune's FailureConfig.max_failures.")
    lost_resource_timeout_s: float | None = Field(300, gt=0, description="Seconds a sweep waits once no alive node offers a custom resource it still needs (resources.trial_resources; producers.resources while producing), e.g. after the only node with it died, for a node with it to join (an autoscaler may start one); then it fails, naming the resource and what the nodes offer. None: wait as long as Ray does (for ever).")


AUTO_MAX_STACK = 8
"""The stack size sae.max_stack None gives where stacks pay (sweep.plan.stack_limit)."""

SPACE_KEYS = ("lr", "l1_coefficient", "l0_coefficient", "k", "target_l0")
"""What `sweep.space` may draw: train.lr, one of the grid's sparsity knobs, or the target L0."""
INTEGER_KEYS = ("k", "target_l0")
"""Space keys drawn as whole numbers (both ends of their range included)."""
Metric = Literal["fvu", "l0", "loss", "mse", "dead_fraction"]
REPORTED_METRICS: tuple[str, ...] = Metric.__args__
"""The flat scalars a trial reports at every log step besides `tokens` (each the mean over the
stack's members, `sae_ray.sweep.search.report_scalars`): what `sweep.metric` may name."""


class Range(Section):
    """A range `sweep.space` draws one value from per trial: uniform, or log-uniform with `log`."""

    low: float = Field(gt=0, description="Smallest value (every knob that may be drawn is positive); a whole number for k and target_l0.")
    high: float = Field(gt=0, description="Largest value, above low (included for k and target_l0, which are drawn as whole numbers).")
    log: bool = Field(False, description="Draw log-uniformly: right for lr and sparsity coefficients, which act by factors.")


class SearchConfig(Section):
    """How Ray Tune picks and schedules trials: the grid alone, or random / Optuna draws from
    `space` for every stack of the grid; FIFO (every trial runs to the end) or ASHA (trials that
    trail at equal tokens are stopped). `sae_ray.sweep.search` turns it into Tune's objects."""

    search: Literal["grid", "random", "optuna"] = Field("grid", description="'grid': each stack of the grid once, nothing drawn; 'random': Tune's random search, fresh draws from space for every trial; 'optuna': Optuna's TPE (needs the optuna package: pip install 'sae-ray[search]') chooses the stack and the draws from the results so far.")
    num_samples: int = Field(1, ge=1, description="'random': trials per stack of the grid, each with its own draws (stacks x num_samples trials); 'optuna': the total number of trials (Optuna picks each one's stack, so a stack may get none); 'grid': must be 1 (a repeat would train the same SAEs again).")
    space: dict[str, Range] = Field({}, description="The ranges drawn from, by name: lr (train.lr), k, l1_coefficient, l0_coefficient (every SAE of a stack set by that knob takes the drawn value; the grid then gives the knob one placeholder value) or target_l0, e.g. {lr: {low: 1e-4, high: 1e-3, log: true}}. Needs search random or optuna.")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="'fifo': every trial trains to train.total_tokens; 'asha': Async Successive Halving stops trials whose metric trails the others' at equal tokens (rungs at grace_fraction x total_tokens x reduction_factor^n).")
    metric: Metric = Field("fvu", description="The figure ASHA and Optuna rank trials by: the mean over a stack's SAEs at each log step (held-out figures in the trial's last report). fvu is fair between trials whose stacks hold the same L0 ladder (one sae.k or sae.target_l0 list); with sparsity coefficients the denser SAE wins (sae_ray.sweep.search explains).")
    mode: Literal["min", "max"] = Field("min", description="Whether a lower ('min': fvu, mse, loss) or higher metric is better.")
    grace_fraction: float = Field(0.1, gt=0, lt=1, description="ASHA: share of train.total_tokens a trial trains before it may be stopped (its first rung). 0.1 is our choice: past the sparsity warmup (train.sparsity_warmup_fraction, 0.05), as long as the monitor's warmup (train.monitor.warmup_fraction), since before it the penalty is not at full strength.")
    reduction_factor: float = Field(4, gt=1, description="ASHA: at each rung only the best 1/reduction_factor of the trials that reached it go on, and rungs are this factor apart in tokens (4: Ray's default).")


class EvalConfig(Section):
    """LM-level evaluation of every trained SAE, at the end of the sweep and in `sae-ray eval` (sae_ray.eval.lm)."""

    lm: bool = Field(True, description="Splice each SAE into the model at its hook on held-out documents and measure CE loss recovered, KL and delta LM loss (causal LMs) or the embedding cosine (encoders), with the reconstruction and feature-density figures; the clean and ablated passes run once per hook, not per SAE. Logged to each SAE's run, headline figures in its registry tags and the summary.")
    tokens: int = Field(8192, gt=0, description="Held-out tokens (spliced positions) per hook. SAEBench's core eval uses about 400k (200 batches of 16 contexts of 128); 8192 is sized for a laptop CPU.")
    batch_size: int = Field(8, gt=0, description="Contexts per forward pass of the evaluation.")
    num_cpus: Annotated[float, AfterValidator(ray_cpus)] | None = Field(None, gt=0, description="CPUs the evaluation task of each hook takes (its torch threads: it runs the whole model once per SAE, after training, when those CPUs are free); None: a producer's (producers.num_cpus). It takes a producer's GPU share (producers.num_gpus).")
    absorption: bool = Field(False, description="Also SAEBench's first-letter absorption (sae_ray.eval.absorption; causal LMs only): a letter probe on the model's single-token words, the SAE's main latents per letter, and how often another latent absorbs the letter. Off by default: it prompts the model once per word, minutes on a CPU; SAEBench says its figures mean something from ~1B-parameter models and 16k-latent SAEs.")
    absorption_words: int | None = Field(2000, gt=0, description="Words (single-token, letters only) drawn from the vocabulary for absorption, seeded; None: all of them, as SAEBench.")


class RunConfig(Section):
    name: str = Field("sae-sweep", min_length=1, description="Name of the sweep (parent MLflow run, Tune experiment).")
    workdir: str = Field("runs/default", min_length=1, description="Directory for the buffer, MLflow store and Tune results (relative to the current directory).")
    model: ModelConfig
    data: DataConfig
    hooks: list[HookPointConfig] = Field(min_length=1, description="Hook points to capture (an SAE sweep trains on each). A transcoder's input and output (sae.transcoder) are added when missing, so with one this may be left out.")
    buffer: BufferConfig = BufferConfig()
    producers: ProducerConfig = ProducerConfig()
    sae: SweepConfig = SweepConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    sweep: SearchConfig = SearchConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _capture_transcoder_hooks(cls, data: Any) -> Any:
        """`hooks` gains sae.transcoder's input and output where it lacks them: the buffer captures
        them, and everything that reads `hooks` (producers, fingerprint, evaluation) sees them."""
        if not isinstance(data, dict):
            return data
        sae = data.get("sae")
        raw = sae.transcoder if isinstance(sae, SweepConfig) else sae.get("transcoder") if isinstance(sae, dict) else None
        if raw is None:
            return data
        try:
            points = TranscoderConfig.model_validate(raw).points()
            hooks = [HookPointConfig.model_validate(h) for h in data.get("hooks") or []]
        except Exception:  # noqa: BLE001 - the sections' own validation reports it
            return data
        missing = [p for p in points if p not in hooks]
        missing = [p for i, p in enumerate(missing) if p not in missing[:i]]
        return {**data, "hooks": [*hooks, *missing]} if missing else data

    # -- resolved paths ---------------------------------------------------------------
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    def buffer_path(self) -> str:
        return self.buffer.path or str(self.workdir_path() / "buffer")

    def tracking_uri(self) -> str:
        return self.tracking.uri or default_tracking_uri(self.workdir_path())

    def artifact_location(self) -> str | None:
        """tracking.artifact_location; else, for a tracking server (http/https), None: the server's
        own (proxied `mlflow-artifacts:`) location, which trials on any node can upload to; else
        <workdir>/mlartifacts."""
        if self.tracking.artifact_location:
            return self.tracking.artifact_location
        if self.tracking_uri().startswith(("http://", "https://")):
            return None
        return (self.workdir_path() / "mlartifacts").as_uri()

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
        for field in ("expansion_factor", "d_sae", "k", "target_l0"):
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
            if sweep.target_l0 and values is not None:
                problems.append(f"sae.target_l0: value {bounded_repr(sweep.target_l0)}: given together with sae.{param} "
                                f"{bounded_repr(values)}, which also sets the sparsity of {arch!r}; give one of them "
                                f"(target_l0 sets {'k = target' if param == 'k' else 'the coefficient during training'})")
            elif sweep.target_l0:
                too_big = [t for t in sweep.target_l0 if sweep.d_sae and t >= min(sweep.d_sae)]
                if too_big:
                    problems.append(f"sae.target_l0: value {too_big!r}: a target L0 must be < d_sae "
                                    f"(smallest d_sae is {min(sweep.d_sae)})")
            elif not values:
                problems.append(
                    f"sae.{param}: value {values!r}: architecture {arch!r} needs a non-empty list of {param} values, "
                    "or a target-L0 ladder in sae.target_l0"
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
    if sweep is not None and sweep.transcoder is not None:
        tc = sweep.transcoder
        for field, hook in zip(("input", "output"), tc.points()):
            shown = hook.model_dump(exclude_none=True)
            if hook.module is None and (hook.layer is None or hook.site is None):
                need = "a layer (input names a module, so there is no layer to take)" if field == "output" else "layer and site"
                problems.append(f"sae.transcoder.{field}: value {shown!r}: give {need}, or module")
            if hook.module is not None and (hook.layer is not None or hook.site is not None):
                problems.append(f"sae.transcoder.{field}: value {shown!r}: give module alone, not with layer/site")
        if tc.points()[0] == tc.points()[1]:
            problems.append(f"sae.transcoder.output: value {tc.points()[1].model_dump(exclude_none=True)!r}: the same hook "
                            "point as input; a transcoder maps one activation to another (for one that reconstructs its "
                            "input, leave sae.transcoder out: that is an SAE)")
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
    if train.checkpoint_every is not None and train.checkpoint_every > train.total_tokens:
        problems.append(f"train.checkpoint_every: value {train.checkpoint_every:,}: larger than train.total_tokens "
                        f"{train.total_tokens:,}, so no checkpoint would be written; give at most total_tokens, or "
                        "leave it unset (a fifth of total_tokens)")
    if buf.n_tokens * buf.eval_fraction < train.eval_rows:
        problems.append(f"buffer.eval_fraction: value {buf.eval_fraction}: holds out about "
                        f"{buf.n_tokens * buf.eval_fraction:,.0f} of buffer.n_tokens {buf.n_tokens:,} rows, fewer than "
                        f"train.eval_rows {train.eval_rows:,}: raise buffer.eval_fraction or n_tokens, or lower train.eval_rows")
    problems += _duplicates_and_devices(sections)
    problems += search_problems(sections)
    return problems


def _duplicates_and_devices(sections: dict[str, Any]) -> list[str]:
    """Duplicates in the grid and the hooks, knobs that are not finite numbers, a cuda:N that Ray hides."""
    problems: list[str] = []
    sweep: SweepConfig | None = sections.get("sae")
    if sweep is not None:
        for field in ("architectures", "expansion_factor", "d_sae", "k", "l1_coefficient", "l0_coefficient", "target_l0"):
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




# ---------------------------------------------------------------------------------------
# Rules of the `sweep` section (search, scheduler, space) and the sparsity grid it draws into
# ---------------------------------------------------------------------------------------

_KNOBS = ("k", "l1_coefficient", "l0_coefficient")  # the sparsity knobs of SweepConfig a space may draw


def _range_text(r: Range) -> str:
    return f"{{low: {r.low:g}, high: {r.high:g}{', log: true' if r.log else ''}}}"


def search_problems(sections: dict[str, Any]) -> list[str]:
    """The rules of `sweep` (a SearchConfig), with `sae` (SweepConfig) where it validated: known
    space keys; low < high, whole numbers for k and target_l0, k below the smallest sae.d_sae;
    ranges only with random/optuna and random/optuna only with ranges; no repeats of a grid; no
    bounded window (buffer.max_gb) with more or fewer than one trial per stack, or with ASHA; a
    drawn knob some architecture uses, with one grid value (the placeholder the draw replaces);
    no architecture left with nothing drawn while num_samples repeats it."""
    from sae_ray.sae import ARCHITECTURES

    search: SearchConfig | None = sections.get("sweep")
    if search is None:
        return []
    problems: list[str] = []
    space = search.space
    for key, r in space.items():
        if key not in SPACE_KEYS:
            problems.append(f"sweep.space: key {key!r}: unknown; accepted: {list(SPACE_KEYS)}")
            continue
        if r.low >= r.high:
            problems.append(f"sweep.space.{key}: value {_range_text(r)}: low must be below high "
                            f"(one value is not a range: put it in the grid instead)")
        if key in INTEGER_KEYS and not (r.low.is_integer() and r.high.is_integer()):
            problems.append(f"sweep.space.{key}: value {_range_text(r)}: {key} is drawn as a whole number; "
                            "give whole-number low and high")
    drawn = [key for key in space if key in SPACE_KEYS]
    if search.search == "grid" and space:
        problems.append(f"sweep.space: keys {list(space)}: search 'grid' draws nothing; set sweep.search to "
                        "'random' or 'optuna', or put the values in the grid (train.lr, sae.k, ...)")
    if search.search != "grid" and not space:
        problems.append(f"sweep.search: value {search.search!r}: draws from sweep.space, which is empty; give at "
                        "least one range, e.g. space: {lr: {low: 1e-4, high: 1e-3, log: true}}, or use search 'grid'")
    if search.search == "grid" and search.num_samples > 1:
        problems.append(f"sweep.num_samples: value {search.num_samples}: with search 'grid' every trial is fixed by the "
                        "grid, so a repeat trains the same SAEs again (same seed); use 1, or search 'random'/'optuna' "
                        "with a sweep.space")

    buf: BufferConfig | None = sections.get("buffer")
    if buf is not None and buf.max_gb is not None:
        # the window registers one reader per stack before the trials start, and drops a shard
        # once every reader has passed it
        if search.search == "optuna" or (search.search == "random" and search.num_samples > 1):
            problems.append(f"sweep.search: value {search.search!r}: with buffer.max_gb (a bounded window) every stack "
                            "is read by exactly one trial, registered before the trials start; "
                            + ("Optuna chooses each trial's stack as it goes" if search.search == "optuna" else
                               f"num_samples={search.num_samples} trials per stack would read it more than once")
                            + ": leave buffer.max_gb unset (the buffer is kept whole), or use search 'grid'")
        if search.scheduler == "asha":
            problems.append("sweep.scheduler: value 'asha': with buffer.max_gb (a bounded window) a trial ASHA stops "
                            "stops reading, and the window waits for it forever; leave buffer.max_gb unset, or use "
                            "scheduler 'fifo'")
    sweep: SweepConfig | None = sections.get("sae")
    if sweep is None or search.search == "grid":
        return problems
    known = [a for a in sweep.architectures if a in ARCHITECTURES]
    targets = getattr(sweep, "target_l0", None)

    def own_list(arch: str) -> bool:
        """Whether `arch` is set by its own knob list (else it takes sae.target_l0)."""
        return bool(getattr(sweep, ARCHITECTURES[arch].sparsity_param))

    for key in drawn:
        if key in _KNOBS:
            users = [a for a in known if ARCHITECTURES[a].sparsity_param == key and own_list(a)]
            values = getattr(sweep, key) or []
            if not users:
                setters = sorted(a for a, cls in ARCHITECTURES.items() if cls.sparsity_param == key)
                problems.append(f"sweep.space.{key}: value {_range_text(space[key])}: no architecture of "
                                f"sae.architectures {sweep.architectures!r} is set by sae.{key} (accepted for: {setters}, "
                                f"given a sae.{key} list; one that takes sae.target_l0 draws through space.target_l0)")
            elif len(values) > 1:
                problems.append(f"sweep.space.{key}: value {_range_text(space[key])}: sae.{key} lists {values!r}, one SAE "
                                f"of a stack each, and a drawn {key} would give them all the same value; give sae.{key} "
                                "one value (the placeholder the draw replaces)")
            if key == "k" and sweep.d_sae and space[key].high >= min(sweep.d_sae):
                problems.append(f"sweep.space.k: value {_range_text(space[key])}: k must stay below d_sae "
                                f"(smallest sae.d_sae is {min(sweep.d_sae)}); lower high")
        elif key == "target_l0":
            if not targets:
                problems.append(f"sweep.space.target_l0: value {_range_text(space[key])}: sae.target_l0 is not set, so no "
                                "SAE has a target to draw; give sae.target_l0 one value (the placeholder the draw replaces)")
            elif len(targets) > 1:
                problems.append(f"sweep.space.target_l0: value {_range_text(space[key])}: sae.target_l0 lists {targets!r}, "
                                "one SAE of a stack each, and a drawn target would give them all the same one; give "
                                "sae.target_l0 one value (the placeholder the draw replaces)")
            if sweep.d_sae and space[key].high >= min(sweep.d_sae):
                problems.append(f"sweep.space.target_l0: value {_range_text(space[key])}: a target L0 must stay below "
                                f"d_sae (smallest sae.d_sae is {min(sweep.d_sae)}); lower high")
    if search.num_samples > 1 and "lr" not in drawn:
        for arch in known:
            param = ARCHITECTURES[arch].sparsity_param
            axis = param if own_list(arch) or not targets else "target_l0"
            if axis not in drawn:
                problems.append(f"sweep.space: keys {list(space)}: nothing drawn sets architecture {arch!r} (its sparsity "
                                f"is set by sae.{axis}), so its stacks would train sweep.num_samples={search.num_samples} "
                                f"times unchanged; add lr or {axis} to sweep.space, or drop {arch!r}")
    return problems


def search_warnings(cfg: RunConfig) -> list[str]:
    """What a valid `sweep` section may still get wrong: ASHA and Optuna rank trials by one metric,
    which is fair only between trials that differ in what is drawn and hold the same L0 ladder
    (`sae_ray.sweep.search` explains). One line per warning, "field: value X: why"."""
    from sae_ray.sae import ARCHITECTURES

    s, sweep = cfg.sweep, cfg.sae
    ranks = s.scheduler == "asha" or s.search == "optuna"
    if not ranks:
        return []
    warnings: list[str] = []
    who = "sweep.scheduler 'asha'" if s.scheduler == "asha" else "sweep.search 'optuna'"
    reconstruction = s.metric in ("fvu", "mse", "loss")
    # an architecture given its own coefficient list is set by it (sae.target_l0 covers the others)
    coefficient_archs = [a for a in sweep.architectures if a in ARCHITECTURES
                         and ARCHITECTURES[a].sparsity_param != "k" and getattr(sweep, ARCHITECTURES[a].sparsity_param)]
    if reconstruction and coefficient_archs:
        warnings.append(f"sweep.metric: value {s.metric!r}: {who} ranks trials by it, but {coefficient_archs} set "
                        "sparsity by a coefficient, so their L0 differs between trials and the denser SAE wins; "
                        "give sae.target_l0 (a ladder every stack shares) or rank by another metric")
    for key in ("k", "target_l0"):
        if key in s.space and reconstruction:
            warnings.append(f"sweep.space.{key}: value {_range_text(s.space[key])}: {who} ranks trials by "
                            f"{s.metric}, which falls as L0 grows: the draw with the largest {key} wins")
    if s.scheduler == "asha":
        widths = sweep.expansion_factor or sweep.d_sae or []
        groups = (1 if sweep.transcoder else len(cfg.hooks)) * len(sweep.architectures) * len(widths)  # a transcoder: one pair
        if groups > 1:
            warnings.append(f"sweep.scheduler: value 'asha': the grid has {groups} stacks of different hook, "
                            "architecture or width, and ASHA ranks them all together: it stops the ones whose "
                            "metric is worse by nature (narrower, harder hook) rather than by their draws; "
                            "sweep one hook, architecture and width per run with ASHA")
        ladder = [getattr(sweep, p) or [] for p in ("k", "l1_coefficient", "l0_coefficient", "target_l0")
                  if hasattr(sweep, p)]
        limit = sweep.max_stack or AUTO_MAX_STACK  # an ASHA sweep stacks (sweep.plan.stack_limit)
        if any(len(v) > limit for v in ladder):
            warnings.append(f"sae.max_stack: value {limit}: a sparsity list longer than it is split over "
                            "stacks holding different values, which ASHA then ranks against each other")
        if s.grace_fraction < cfg.train.sparsity_warmup_fraction:
            warnings.append(f"sweep.grace_fraction: value {s.grace_fraction:g}: below train.sparsity_warmup_fraction "
                            f"({cfg.train.sparsity_warmup_fraction:g}): ASHA may stop trials before their sparsity "
                            "penalty is at full strength")
    if s.mode == "max" and s.metric in ("fvu", "mse", "loss", "dead_fraction"):
        warnings.append(f"sweep.mode: value 'max': {s.metric} is better when lower; use 'min'")
    return warnings
