"""Presets: the one home of the training-length rule, and the starting config `sae-ray init` writes.

The rule (what every SAE of a sweep needs to converge; `sae-ray validate` warns below it):

- at least MIN_STEPS optimizer steps: batch = total_tokens / MIN_STEPS, rounded down to a power
  of 2, kept within [MIN_BATCH, MAX_BATCH] (`batch_size_for`);
- Adam's lr = 2e-4 * sqrt(2**14 / d_sae) (EleutherAI sparsify's default, the inverse square root
  of the number of latents; sparsify follows Gao et al. 2024, "Scaling and evaluating sparse
  autoencoders"), made larger for short runs: times sqrt(LONG_RUN_STEPS / steps) below
  LONG_RUN_STEPS, and at most LR_MAX (`learning_rate`).

Measured on the synthetic problem of the issue (`sae_ray.bench.synthetic`: d 128, 1,024 true
features, true L0 7, d_sae 2,048, 2M tokens): with today's TrainConfig defaults (batch 4096,
lr 3e-4: 489 steps) TopK recovers 0.1% of the true features. Steps alone fix it at the width rule's
lr 5.7e-4 only slowly (1,954 steps: 35%, 3,907: 81%, 7,813: 99.7%); a larger lr fixes it in fewer
(3e-3: 99% in 489 steps). The rule picks batch 512 and lr 1.6e-3 (3,907 steps) there; the figures
are in the README section `sae-ray init` came with.

`init_config(model, ...)` writes a starting config, step by step:

1. read the model's config without weights (`preflight.meta_model`: a local directory, a
   `package:` name, a hub id found in the local Hugging Face cache, never the network; a `gguf:`
   file is converted once, as a run would, since its config lives inside it);
2. resolve the hook points by layer and site (`activations.hooks`) and their widths d_in (a forward
   pass on the meta device, as preflight does);
3. widths as expansion factors of d_in, a target-L0 ladder sized to d_in;
4. batch size and lr from the token budget and d_sae (the rule above);
5. the buffer: rows, held-out share, shard and chunk rows from d_in, the dtype and the free disk;
6. producers and trial resources from the GPUs given;
7. the YAML, every number with a comment saying where it comes from, checked by the config loader
   before it is returned.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sae_ray.config import ConfigError, RunConfig
from sae_ray.config.sections import AUTO_MAX_STACK, BufferConfig, DataConfig, TrainConfig

MIN_STEPS = 2048
"""Optimizer steps an SAE needs at the least: the fewest at which LR_MAX still keeps lr * sqrt(steps)
at 0.1 (1,111; see LONG_RUN_STEPS), rounded up to a power of 2. On the synthetic problem (see above)
TopK at batch 4096 and lr 3e-4 (489 steps) recovers 0.1% of the features, and about 2,000 steps at
this rule's lr recover 93-100% (TopK, BatchTopK); the lr warmup (capped at 10% of the run), the
sparsity warmup and the L0 controller need a few hundred steps each too."""

MAX_BATCH = TrainConfig.model_fields["batch_size"].default
"""4096, TrainConfig's default (SAELens, Anthropic April 2024 update): the batch of long runs."""

MIN_BATCH = 256
"""The smallest batch the rule picks (the synthetic bench's batch: smaller ones leave a GPU idle,
and BatchTopK's threshold is taken over the batch). A budget under MIN_STEPS * MIN_BATCH tokens
gets fewer than MIN_STEPS steps: raise the budget."""

LR_WIDTH = (2e-4, 2**14)
"""(lr, d_sae) of the width rule lr = 2e-4 * sqrt(2**14 / d_sae): sparsify's Adam default."""

LONG_RUN_STEPS = 2**15
"""Steps from which the width rule's lr is used as it is; below, lr grows as sqrt(LONG_RUN_STEPS /
steps). On the synthetic problem recovery follows lr * sqrt(steps) (TopK at d_sae 2,048: 0.0066 ->
0.1%, 0.022 -> 58%, 0.025 -> 35%, 0.035 -> 81%, 0.050 -> 99.7%, 0.066 -> 93-99%); the width rule's
5.7e-4 there reaches 99.7% in 7,813 steps, and this keeps lr * sqrt(steps) at twice that run's 0.05
for shorter runs."""

LR_MAX = 3e-3
"""The largest lr the rule gives: the highest measured (the synthetic bench's lr), stable there."""

DISK_SHARE = 0.5
"""Share of the free disk the buffer may take (our choice: room for MLflow, Tune and other runs)."""

SHARD_MAX_BYTES = 256 * 2**20
"""Most bytes of activations in one shard (all hooks): a producer holds write_queue + 1 shards in
memory (our choice: 256 MiB)."""

MIN_SHARDS = 16
"""Shards a buffer is cut into at the least (our choice: trials start once the first shard is
committed, readers mix chunks of several shards, and the held-out documents spread over many)."""

EXPANSION_FACTORS = (8,)
"""d_sae / d_in (our choice, as the quickstart and SmolLM2 configs); a sweep over widths lists more."""

EVAL_MARGIN = 2
"""The held-out share must hold this many times train.eval_rows: documents are held out by a hash,
so the share of rows held out varies (our choice)."""


class InitError(ConfigError):
    """A mistake in `sae-ray init`'s arguments: one line, "what: value X: what is accepted"."""

    def __init__(self, problem: str):
        super().__init__([problem], "sae-ray init")
        self.args = (f"sae-ray init: {problem}",)


# ---------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------

def optimizer_steps(total_tokens: int, batch_size: int) -> int:
    """Steps of a run of `total_tokens` rows in batches of `batch_size` (as `train_sae` counts them)."""
    return math.ceil(total_tokens / batch_size)


def batch_size_for(total_tokens: int) -> int:
    """total_tokens / MIN_STEPS rounded down to a power of 2, within [MIN_BATCH, MAX_BATCH]."""
    per_step = max(total_tokens // MIN_STEPS, 1)
    return min(MAX_BATCH, max(MIN_BATCH, 2 ** int(math.log2(per_step))))


def dead_tokens_for(total_tokens: int) -> int:
    """train.dead_tokens for a run of total_tokens: a tenth of it, at most TrainConfig's default
    (1M), at least 1, so AuxK revives dead latents within a short run."""
    return max(1, min(TrainConfig.model_fields["dead_tokens"].default, total_tokens // 10))


def learning_rate(d_sae: int, steps: int) -> float:
    """Adam lr for an SAE of `d_sae` latents trained `steps` steps, to 2 significant digits:
    min(LR_MAX, 2e-4 * sqrt(2**14 / d_sae) * max(1, sqrt(LONG_RUN_STEPS / steps)))."""
    lr, ref = LR_WIDTH
    lr = min(LR_MAX, lr * math.sqrt(ref / d_sae) * max(1.0, math.sqrt(LONG_RUN_STEPS / steps)))
    return float(f"{lr:.2g}")


def step_warnings(cfg: RunConfig) -> list[str]:
    """One line when the config gives each SAE fewer than MIN_STEPS optimizer steps, naming the
    fields, their values and what would fix it; [] otherwise."""
    t = cfg.train
    steps = optimizer_steps(t.total_tokens, t.batch_size)
    if steps >= MIN_STEPS:
        return []
    better = batch_size_for(t.total_tokens)
    fix = f"raise train.total_tokens to {MIN_STEPS * t.batch_size:,}"
    if better < t.batch_size:
        fix = (f"lower train.batch_size to {better:,} ({optimizer_steps(t.total_tokens, better):,} steps) and raise "
               f"train.lr for it, or {fix}")
    return [f"train.batch_size: value {t.batch_size:,}: with train.total_tokens {t.total_tokens:,} each SAE takes "
            f"{steps:,} optimizer steps, fewer than the {MIN_STEPS:,} an SAE needs to converge (sae_ray.presets; on a "
            f"synthetic problem with a known dictionary, TopK at batch 4,096 and lr 3e-4 recovers 0.1% of the "
            f"features in 489 steps): {fix} (`sae-ray init MODEL --budget-tokens N` writes the batch size and lr "
            "for a budget)"]


# ---------------------------------------------------------------------------------------
# The model: its config, hook points and widths (no weights)
# ---------------------------------------------------------------------------------------

@dataclass
class ModelFacts:
    """What init reads of a model."""

    kind: str
    """The model's class name, e.g. GPT2LMHeadModel."""
    n_layers: int
    """Transformer blocks (`activations.hooks.find_blocks`)."""
    d_model: int
    """config.hidden_size."""
    max_positions: int | None
    """config.max_position_embeddings, if it has one."""
    dtype: str | None
    """The dtype its config names, e.g. "bfloat16", or None."""
    hooks: dict[str, int]
    """hook name -> d_in, in the order of the (layer, site) pairs asked for."""


def _readable_name(name: str, revision: str | None) -> str:
    """What meta_model may read without the network: a hub id becomes its snapshot directory in
    the local Hugging Face cache (InitError when its config.json is not there)."""
    from sae_ray.paths import has_scheme, looks_local

    if looks_local(name) or has_scheme(name):
        return name
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json", revision=revision)
    if not isinstance(found, str):
        raise InitError(f"MODEL: value {name!r}: not a local directory, and no config.json of a hub model of this "
                        f"id in the local Hugging Face cache; give a model directory, 'package:<pkg>/<dir>', "
                        f"'gguf:...', or fetch the config first (hf download {name} config.json)")
    return os.path.dirname(found)


def read_model(name: str, layers: list[int] | None, sites: list[str], revision: str | None = None,
               trust_remote_code: bool = False) -> tuple[ModelFacts, list[tuple[int, str]]]:
    """The model's facts for the hook points (layer, site) of `layers` x `sites` (layers None: the
    middle block), and those pairs. InitError names MODEL, --layers or --sites when one is wrong."""
    from sae_ray.activations.hooks import find_blocks, resolve_hook
    from sae_ray.preflight import hook_widths, meta_model

    readable = _readable_name(name, revision)
    try:
        model, config, _ = meta_model(readable, revision if readable == name else None, trust_remote_code)
        _, blocks = find_blocks(model)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, it is about MODEL
        raise InitError(f"MODEL: value {name!r}: could not read its config ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]})") from None
    n = len(blocks)
    layers = [n // 2] if layers is None else layers
    for layer in layers:
        if not 0 <= layer < n:
            raise InitError(f"--layers: value {layer}: out of range: {type(model).__name__} has {n} layers (0..{n - 1})")
    pairs = [(layer, site) for layer in layers for site in sites]
    resolved = []
    for layer, site in pairs:
        try:
            resolved.append(resolve_hook(model, layer, site))
        except ValueError as e:
            raise InitError(f"--sites: value {site!r}: {e}") from None
    fields = vars(config)  # not getattr: transformers 5 warns on reading config.torch_dtype
    dtype = fields.get("dtype") or fields.get("torch_dtype")
    facts = ModelFacts(kind=type(model).__name__, n_layers=n, d_model=int(config.hidden_size),
                       max_positions=getattr(config, "max_position_embeddings", None),
                       dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
                       hooks=hook_widths(model, config, resolved))
    return facts, pairs


# ---------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------

def target_l0_ladder(d_in: int) -> list[int]:
    """Two rungs a factor 2 apart, the top the power of 2 nearest d_in / 4, at most 128, at least 2
    (our choice: the quickstart's [64, 128] at d_in 384)."""
    top = min(128, max(2, 2 ** round(math.log2(d_in / 4))))
    return [top // 2, top]


def _pow2_floor(n: float) -> int:
    """The largest power of 2 at most n (1 for n below 2)."""
    return 2 ** int(math.log2(max(n, 1)))


def buffer_numbers(total_tokens: int, row_bytes: int, free_bytes: int, eval_rows: int) -> dict[str, int | float]:
    """n_tokens, shard_rows, chunk_rows, eval_fraction and eval_rows of a buffer for a run of
    `total_tokens`, each row taking `row_bytes` (activations of every hook and the row columns).

    eval_fraction: the smallest multiple of 0.05 (at least BufferConfig's 0.05, at most 0.5) whose
    share of n_tokens holds EVAL_MARGIN x eval_rows (eval_rows is lowered if even 0.5 cannot);
    n_tokens: one epoch, total_tokens / (1 - eval_fraction), at most DISK_SHARE of the free disk
    (then rows are reused over epochs), in whole shards; shard_rows: a power of 2, at most
    SHARD_MAX_BYTES, at most n_tokens / MIN_SHARDS and BufferConfig's 65,536; chunk_rows:
    BufferConfig's 4,096, or the shard if smaller."""
    cap = int(DISK_SHARE * free_bytes // row_bytes)
    fraction = BufferConfig.model_fields["eval_fraction"].default
    while True:
        epoch = math.ceil(total_tokens / (1 - fraction))
        rows = min(cap, epoch)
        if rows * fraction >= EVAL_MARGIN * eval_rows or fraction >= 0.5:
            break
        fraction = round(fraction + 0.05, 2)
    eval_rows = min(eval_rows, _pow2_floor(rows * fraction / EVAL_MARGIN))
    shard = min(BufferConfig.model_fields["shard_rows"].default, _pow2_floor(SHARD_MAX_BYTES / row_bytes),
                _pow2_floor(rows / MIN_SHARDS))
    chunk = min(BufferConfig.model_fields["chunk_rows"].default, shard)
    shards = math.ceil(rows / shard) if rows == epoch else max(1, rows // shard)  # whole shards within the disk
    return {"n_tokens": shards * shard, "shard_rows": shard, "chunk_rows": chunk, "eval_fraction": fraction,
            "eval_rows": eval_rows}


def free_disk(path: str | Path) -> tuple[int, str]:
    """(free bytes, the directory measured): the nearest existing directory at or above `path`."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free, str(p)


def gpu_shares(gpus: int, n_stacks: int) -> tuple[float, float]:
    """(GPU share of each producer, of each trial) on `gpus` GPUs: one producer per GPU takes half of
    it, the trials split the other halves, each at most the half a producer leaves, in a share 1/2^n
    (Ray counts in steps of 0.0001). (0, 0) without GPUs (our choice)."""
    if gpus == 0:
        return 0.0, 0.0
    share = max(min(0.5, gpus * 0.5 / n_stacks), 2**-13)
    return 0.5, 1.0 / 2 ** math.ceil(math.log2(1 / share))


# ---------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------

COMMENT_COLUMN = 40
"""Column the comments of the YAML start at."""


def _line(text: str, comment: str, indent: int = 2) -> str:
    """One YAML line `text` with `# comment` aligned at COMMENT_COLUMN."""
    text = " " * indent + text
    return f"{text.ljust(COMMENT_COLUMN - 1)} # {comment}"


def _slug(name: str) -> str:
    """A run name from a model name: its last path parts, lowercased, other characters as '-'."""
    tail = "-".join(name.rstrip("/").replace(":", "/").split("/")[-2:])
    return re.sub(r"[^a-z0-9_.]+", "-", tail.lower()).strip("-.") or "sae-sweep"


def init_config(model: str, layers: list[int] | None = None, sites: tuple[str, ...] = ("resid_post",),
                budget_tokens: int | None = None, gpus: int = 0,
                architectures: tuple[str, ...] = ("topk", "batchtopk"), free_bytes: int | None = None) -> str:
    """The YAML text of a starting config for `model` (see the module docstring for the steps).

    layers: block indices (None: the middle block); sites: of activations.hooks.SITES; budget_tokens:
    training tokens per SAE (None: TrainConfig's default); gpus: GPUs the run has (0: CPU);
    free_bytes: free disk for the buffer (None: measured at the workdir). InitError for a wrong
    argument; the text is validated by the config loader before it is returned."""
    from sae_ray.config import validate_config
    from sae_ray.config.yamlload import load_yaml
    from sae_ray.dtypes import ACTIVATION_DTYPES, STORAGE_DTYPES
    from sae_ray.buffer.layout import COLUMNS
    from sae_ray.sae import ARCHITECTURES

    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown:
        raise InitError(f"--architectures: value {unknown[0]!r}: unknown; accepted: {', '.join(sorted(ARCHITECTURES))}")
    if gpus < 0:
        raise InitError(f"--gpus: value {gpus}: must be 0 (CPU) or more")
    if budget_tokens is not None and budget_tokens <= 0:
        raise InitError(f"--budget-tokens: value {budget_tokens}: must be a positive number of tokens")
    facts, pairs = read_model(model, layers, list(sites))
    d_ins = list(facts.hooks.values())
    total = budget_tokens or TrainConfig.model_fields["total_tokens"].default
    name, workdir = _slug(model), f"runs/{_slug(model)}"

    # dtype: float32 on CPU; with GPUs the dtype the model's config names, where a buffer can store it
    dtype = facts.dtype if gpus and facts.dtype in ACTIVATION_DTYPES else "float32"
    dtype_why = (f"the dtype the model's config names ({facts.dtype})" if dtype != "float32" else
                 "float32: no GPU given (CPU matmuls in bfloat16 are slow)" if not gpus else
                 f"float32: the model's config names {facts.dtype or 'no dtype'}, not float16/bfloat16")
    itemsize = STORAGE_DTYPES[dtype]().itemsize
    column_bytes = sum(t().itemsize for t in COLUMNS.values())
    row_bytes = sum(d_ins) * itemsize + column_bytes
    if free_bytes is None:
        free_bytes, disk_at = free_disk(workdir)
    else:
        disk_at = "(given)"
    eval_rows = TrainConfig.model_fields["eval_rows"].default
    buf = buffer_numbers(total, row_bytes, free_bytes, eval_rows)

    batch = batch_size_for(total)
    steps = optimizer_steps(total, batch)
    d_saes = sorted({f * d for f in EXPANSION_FACTORS for d in d_ins})
    lr = learning_rate(max(d_saes), steps)
    ladder = target_l0_ladder(min(d_ins))
    dead = dead_tokens_for(total)
    n_stacks = len(pairs) * len(architectures) * len(EXPANSION_FACTORS) * math.ceil(len(ladder) / AUTO_MAX_STACK)
    producer_gpus, trial_gpus = gpu_shares(gpus, n_stacks)
    context = DataConfig.model_fields["context_size"].default
    if facts.max_positions:
        context = min(context, facts.max_positions)
    epochs = total / (buf["n_tokens"] * (1 - buf["eval_fraction"]))
    few = steps < MIN_STEPS

    hooks_text = "\n".join(
        _line(f"- {{layer: {layer}, site: {site}}}",
              f"{hook}: d_in {d}, layer {layer} of 0..{facts.n_layers - 1}" + (" (the middle block)" if layers is None else ""))
        for (layer, site), (hook, d) in zip(pairs, facts.hooks.items()))
    lr_ref, width_ref = LR_WIDTH
    lines = [
        f"# `sae-ray init` for {model} ({facts.kind}: {facts.n_layers} layers, d_model {facts.d_model}), from its",
        "# config alone (no weights). Each number says where it comes from; the batch size and lr follow",
        f"# the rule of sae_ray.presets: at least {MIN_STEPS:,} optimizer steps per SAE, lr scaled to width and steps.",
        _line(f"name: {name}", "from the model's name", 0),
        _line(f"workdir: {workdir}", "buffer, MLflow store and Tune results", 0),
        "",
        "model:",
        _line(f"name: {model}", "MODEL"),
        _line(f"dtype: {dtype}", dtype_why),
        "",
        "data:",
        _line("path: builtin:python-docs", "offline corpus shipped with sae-ray: put your dataset here"),
        _line("text_column: text", "DataConfig's default"),
        _line(f"context_size: {context}", f"DataConfig's {DataConfig.model_fields['context_size'].default}"
              + (f", at most the model's {facts.max_positions} positions" if facts.max_positions else "")),
        _line(f"batch_size: {DataConfig.model_fields['batch_size'].default}", "DataConfig's: contexts per forward pass"),
        "",
        "hooks:",
        hooks_text,
        "",
        "buffer:",
        _line(f"n_tokens: {buf['n_tokens']}", ("one epoch" if epochs <= 1.001 else f"{epochs:.1f} epochs (disk-bound)")
              + ": total_tokens / (1 - eval_fraction), whole shards"),
        _line(f"shard_rows: {buf['shard_rows']}", f"2^n, <= {SHARD_MAX_BYTES // 2**20} MiB at {row_bytes:,} B/row, "
              f"<= n_tokens/{MIN_SHARDS}, <= 65,536"),
        _line(f"chunk_rows: {buf['chunk_rows']}", "BufferConfig's 4,096 (the unit of reading), <= shard_rows"),
        _line(f"dtype: {dtype}", "as model.dtype"),
        _line(f"eval_fraction: {buf['eval_fraction']:g}", f"smallest 0.05 step >= 0.05 holding {EVAL_MARGIN} x train.eval_rows"),
        f"  # {buf['n_tokens'] * row_bytes / 1e9:.2f} GB uncompressed; at most {DISK_SHARE:g} of the "
        f"{free_bytes / 1e9:,.1f} GB free at {disk_at} when init ran",
        "",
        "producers:",
        _line(f"count: {max(1, gpus)}", "one per GPU (--gpus)" if gpus else "one: no GPU given (--gpus 0)"),
        _line(f"num_gpus: {producer_gpus:g}", "half a GPU each, trials share the other half" if gpus else "CPU"),
        _line("num_cpus: 1", "ProducerConfig's default"),
        "",
        "sae:",
        _line(f"architectures: [{', '.join(architectures)}]", "--architectures"),
        _line(f"expansion_factor: [{', '.join(map(str, EXPANSION_FACTORS))}]",
              f"d_sae {', '.join(f'{d:,}' for d in d_saes)} (presets.EXPANSION_FACTORS x d_in)"),
        _line(f"target_l0: [{', '.join(map(str, ladder))}]", f"x2 apart, top: 2^n nearest d_in/4 = {min(d_ins) / 4:g}, <= 128"),
        "",
        "train:",
        _line(f"total_tokens: {total}", "--budget-tokens" if budget_tokens else "TrainConfig's default (--budget-tokens)"),
        _line(f"batch_size: {batch}", f"{steps:,} steps: 2^n <= total/{MIN_STEPS:,}, in [{MIN_BATCH}, {MAX_BATCH}]"
              + (f"; FEWER than {MIN_STEPS:,}: raise --budget-tokens" if few else "")),
        _line(f"lr: {lr:g}", f"{lr_ref:g}*sqrt({width_ref}/d_sae) (sparsify's default) "
              f"*max(1, sqrt({LONG_RUN_STEPS}/steps)), <= {LR_MAX:g}"),
        _line(f"eval_rows: {buf['eval_rows']}", "TrainConfig's" + (", lowered to fit eval_fraction"
              if buf["eval_rows"] < eval_rows else "") + ": held-out rows of the final figures"),
        _line(f"dead_tokens: {dead}", "total_tokens/10, <= TrainConfig's 1M: AuxK revives in time"),
        "",
        "resources:",
        _line("cpus_per_trial: 1", "ResourcesConfig's default"),
        _line(f"gpus_per_trial: {trial_gpus:g}", f"{n_stacks} trial(s) share half of {gpus} GPU(s), 1/2^n each"
              if gpus else "CPU"),
        "",
    ]
    text = "\n".join(lines)
    try:
        validate_config(load_yaml(text), "sae-ray init's output")
    except ConfigError as e:  # a bug of init, not the user's mistake: keep the traceback
        raise RuntimeError(f"sae-ray init wrote an invalid config: {e}") from e
    return text
