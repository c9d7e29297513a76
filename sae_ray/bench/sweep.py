"""`sae-ray bench sweep`: N SAEs trained as one sweep from one shared buffer, against the same
N SAEs trained as N separate runs that each produce their own activations.

Measured side by side in one invocation, on the config's model and data (the quickstart's by
default), with the same tokens per SAE on both sides:

(a) one sae-ray sweep: one `run_sweep` whose producers fill one buffer of `tokens` rows while
    its trials (stacks of SAEs of one architecture, `sae.max_stack`) train every SAE on it;
(b) N separate runs, as with a tool that trains one SAE per run: one `run_sweep` per SAE, each
    in its own directory, so each produces its own buffer of `tokens` rows.

The N SAEs of a size: a target-L0 ladder x {ReLU+L1 (standard), TopK} (`saes_of`: N = 4 is
L0 32 and 64 for each, N = 8 is 16, 32, 64, 128), at the config's first width and hook. Wall
times are taken around each `run_sweep`: preflight, production, training, evaluation and
registration, everything a run does. The SAEs of a smaller size are the same SAEs as some of a
larger size's (same config; checked on the configs and on what the runs trained), so each
distinct separate run is made once and (b) of a size is the sum of the runs of its SAEs.

The bound for (a), the shortest wall time the sweep could have here, from figures of the same
invocation:

    P     = rows / rate                         s: rows (a)'s producers wrote, over their summed
                                                rows/s (with one producer: its seconds)
    W_i   = tokens_i / tps_i                    s: SAE i trained alone on one core; tokens_i the
                                                tokens it trained in (a), tps_i the tokens/s of
                                                that SAE trained alone in this process on one
                                                torch thread from (a)'s buffer
    bound = max(P, (P * c_p + sum_i W_i) / C)   C: CPUs Ray sees; c_p: CPUs the producers hold
                                                (producers.count x producers.num_cpus)

A sweep cannot end before its buffer is produced (every SAE trains on all of it), nor before
C cores have done the producers' and the trainers' work. (a)/bound is how close the sweep comes
to it (1.00: no overhead at all). Outside the bound: starting Ray workers for trials and
producers, loading the model, each SAE's initialisation, the final evaluation, checkpoints,
MLflow. A stack of K SAEs can train faster than K single SAEs (each batch is read once; `sae-ray
bench train`), so (a) may come under the bound: (a)/bound below 1.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_ray.config import ConfigError, RunConfig, load_config, validate_config
from sae_ray.config.sections import SearchConfig

ARCHITECTURES = ("standard", "topk")
"""ReLU+L1 (its coefficient steered to the target L0) and TopK (k = target), as the quickstart."""
TARGETS = (32, 64, 16, 128)
"""Target L0s in the order sizes take them: size 2k trains the first k of them (sorted) for each architecture."""
MAX_SIZE = len(ARCHITECTURES) * len(TARGETS)
DEFAULT_TOKENS = 65_536
"""Tokens per SAE, and rows of every run's buffer: 4 shards of the quickstart's 16,384 rows. The
whole bench with sizes 4 and 8 (2 sweeps, 8 separate runs, 8 single-SAE timings) is estimated at
9-11 minutes on 2 cores, from runs at sizes 2 (producer ~2,100 rows/s, ~9 s of fixed cost per run,
one SAE 3,700-8,400 tokens/s on one core)."""
DEFAULT_CONFIG = "jobs/configs/quickstart.yaml"
SOURCE = "sae-ray bench sweep"


# ---------------------------------------------------------------------------------------
# The SAEs of a size, and the configs of both sides
# ---------------------------------------------------------------------------------------

def saes_of(n: int) -> list[tuple[str, int]]:
    """(architecture, target L0) of the n SAEs of a size: 1 is [("standard", 32)]; 2k is each
    of ARCHITECTURES at the first k of TARGETS, sorted (4: 32, 64; 8: 16, 32, 64, 128)."""
    if n == 1:
        return [(ARCHITECTURES[0], TARGETS[0])]
    return [(a, t) for a in ARCHITECTURES for t in sorted(TARGETS[: n // 2])]


def size_problems(sizes: list[int]) -> list[str]:
    """What is wrong with --sizes: one line per problem ([] when every size can be built)."""
    problems = []
    if not sizes:
        problems.append("--sizes: value '': give at least one size, e.g. 4,8")
    for n in sizes:
        if n < 1:
            problems.append(f"--sizes: value {n}: a size is a number of SAEs, at least 1")
        elif n > MAX_SIZE:
            problems.append(f"--sizes: value {n}: at most {MAX_SIZE} SAEs (the target-L0 ladder {sorted(TARGETS)} "
                            f"x architectures {list(ARCHITECTURES)})")
        elif n > 1 and n % 2:
            problems.append(f"--sizes: value {n}: the SAEs of a size are a target-L0 ladder x {list(ARCHITECTURES)}, "
                            f"so a size is 1 or even (2, 4, 6, 8)")
    twice = sorted({n for n in sizes if sizes.count(n) > 1})
    if twice:
        problems.append(f"--sizes: value {','.join(map(str, sizes))}: lists {', '.join(map(str, twice))} more than once")
    return problems


def check_bench_args(config_path: str | Path, sizes: list[int], tokens: int) -> RunConfig:
    """The config of `config_path`, once --config, --sizes and --tokens are known good: ConfigError
    (source `sae-ray bench sweep`, one line per problem, each naming its flag) otherwise, before
    any work. The config's own problems are load_config's ConfigError, naming the file."""
    problems = size_problems(list(sizes))
    path = Path(config_path)
    if not path.is_file():
        problems.append(f"--config: value {str(config_path)!r}: no such file")
    if problems:
        raise ConfigError(problems, SOURCE)
    base = load_config(path)
    batch = base.train.batch_size
    if tokens < batch:
        why = f"at least train.batch_size ({batch:,}) of {str(config_path)!r}, one optimizer step per SAE"
        raise ConfigError([f"--tokens: value {tokens:,}: {why}"], SOURCE)
    return base


def bench_config(base: RunConfig, saes: list[tuple[str, int]], tokens: int, workdir: Path, name: str,
                 tracking_uri: str, artifact_location: str, gpus: float = 0) -> RunConfig:
    """`base` made into one run of the bench: the SAEs `saes` (a grid: architectures x target L0s)
    at base's first width, on base's first hook; a buffer of `tokens` rows in `workdir` (kept
    whole: no window, so the bench can read it again) and `tokens` training tokens per SAE; eval
    on at most half the expected held-out rows; the live monitor off (no SAE stops early, so
    both sides train every token); grid search; MLflow in the bench's shared store. gpus > 0:
    the producer takes half of them and each trial a quarter (the model and the SAEs on CUDA);
    0: as base. Validated again as a whole (the rules between fields)."""
    archs = sorted({a for a, _ in saes}, key=ARCHITECTURES.index)
    targets = sorted({t for _, t in saes})
    if len(archs) * len(targets) != len(saes):
        raise ValueError(f"bench_config: SAEs {saes!r} are not a grid of architectures x target L0s")
    s = base.sae
    width = {"expansion_factor": s.expansion_factor[:1], "d_sae": None} if s.expansion_factor else \
        {"expansion_factor": None, "d_sae": (s.d_sae or [])[:1]}
    sae = s.model_copy(update={"architectures": archs, "target_l0": targets, "k": None, "l1_coefficient": None,
                               "l0_coefficient": None, **width,
                               "extra": {a: knobs for a, knobs in s.extra.items() if a in archs}})
    t = base.train
    train = t.model_copy(update={
        "total_tokens": tokens,
        "eval_rows": max(1, min(t.eval_rows, int(tokens * base.buffer.eval_fraction / 2))),
        "checkpoint_every": t.checkpoint_every if t.checkpoint_every and t.checkpoint_every <= tokens else None,
        "monitor": t.monitor.model_copy(update={"enabled": False}),
    })
    placement = {}
    if gpus > 0:
        placement = {"producers": base.producers.model_copy(update={"count": 1, "num_gpus": gpus / 2}),
                     "resources": base.resources.model_copy(update={"gpus_per_trial": gpus / 4}),
                     "model": base.model.model_copy(update={"device": "auto"})}
        train = train.model_copy(update={"device": "auto"})
    cfg = base.model_copy(update={
        **placement, "name": name, "workdir": str(workdir), "hooks": base.hooks[:1], "sae": sae, "train": train,
        "buffer": base.buffer.model_copy(update={"n_tokens": tokens, "path": None, "max_gb": None}),
        "tracking": base.tracking.model_copy(update={"uri": tracking_uri, "artifact_location": artifact_location}),
        "sweep": SearchConfig(),
    })
    return validate_config(cfg.model_dump(mode="json"), SOURCE)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted.path: value}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def same_but_saes(a: RunConfig, b: RunConfig) -> list[str]:
    """The fields (dotted paths) where configs `a` and `b` differ, other than name, workdir and
    the SAE list (sae.architectures, sae.target_l0, sae.extra): [] when a run of `b` trains its
    SAEs exactly as a run of `a` trains the same ones."""
    fa, fb = _flat(a.model_dump(mode="json")), _flat(b.model_dump(mode="json"))
    skip = ("name", "workdir", "sae.architectures", "sae.target_l0", "sae.extra")
    return sorted(k for k in set(fa) | set(fb)
                  if not any(k == s or k.startswith(s + ".") for s in skip) and fa.get(k) != fb.get(k))


def sae_key(row: dict[str, Any]) -> tuple:
    """What identifies an SAE across runs, from a summary row: (architecture, d_sae, target_l0, hook)."""
    return row["architecture"], row["d_sae"], row["target_l0"], row["hook"]


def match_separate(sweep_rows: list[dict[str, Any]], separate: dict[tuple, dict[str, Any]]) -> list[tuple]:
    """For each SAE a sweep trained (its summary rows), the key of the separate run that trained
    the identical SAE (same architecture, width, target L0 and hook, the same tokens). ValueError
    when one has none, or two SAEs of the sweep would share one."""
    keys = []
    for row in sweep_rows:
        key = sae_key(row)
        other = separate.get(key)
        if other is None:
            raise ValueError(f"no separate run trained the sweep's SAE {row['sae']!r}; separate runs: "
                             f"{sorted(r['sae'] for r in separate.values())}")
        if other["tokens_seen"] != row["tokens_seen"]:
            raise ValueError(f"SAE {row['sae']!r}: {row['tokens_seen']:,} tokens in the sweep, "
                             f"{other['tokens_seen']:,} in its separate run")
        keys.append(key)
    if len(set(keys)) != len(keys):
        raise ValueError(f"two SAEs of the sweep match one separate run: {keys!r}")
    return keys


# ---------------------------------------------------------------------------------------
# The figures (plain arithmetic on what the runs measured)
# ---------------------------------------------------------------------------------------

def production_seconds(producer_stats: list[dict[str, Any]]) -> tuple[float, int, float]:
    """(P seconds, rows, rate rows/s) of a run's producers: rows summed, rate their summed rows/s
    (`with_rates`' tokens_per_s), P = rows / rate."""
    rows = sum(int(s["rows"]) for s in producer_stats)
    rate = sum(float(s["tokens_per_s"]) for s in producer_stats)
    return rows / rate, rows, rate


def bound_seconds(production_s: float, producer_cpus: float, train_s: list[float], cores: float) -> float:
    """The shortest wall time of a sweep, s: max(P, (P * c_p + sum W_i) / C). production_s: P;
    producer_cpus: c_p; train_s: W_i, each SAE alone on one core; cores: C."""
    return max(production_s, (production_s * producer_cpus + sum(train_s)) / cores)


def size_figures(n: int, a_seconds: float, separate_seconds: list[float], producer_stats: list[dict[str, Any]],
                 producer_cpus: float, tokens_trained: list[int], tokens_per_s: list[float], cores: float) -> dict:
    """The row of one size: (a) and (b) wall seconds, (b)/(a), the bound and (a)/bound, and the
    bound's parts. separate_seconds: the separate run of each SAE; tokens_trained, tokens_per_s:
    each SAE's tokens in (a) and its tokens/s alone (W_i = tokens / tokens/s)."""
    p, rows, rate = production_seconds(producer_stats)
    w = [t / s for t, s in zip(tokens_trained, tokens_per_s, strict=True)]
    bound = bound_seconds(p, producer_cpus, w, cores)
    b = sum(separate_seconds)
    return {"n": n, "a_seconds": a_seconds, "b_seconds": b, "ratio": b / a_seconds, "bound_seconds": bound,
            "a_over_bound": a_seconds / bound, "production_seconds": p, "producer_rows": rows,
            "producer_rows_per_s": rate, "producer_cpus": producer_cpus, "train_seconds": w, "cores": cores,
            "separate_seconds": list(separate_seconds)}


def format_table(sizes: list[dict]) -> str:
    """The rows of `size_figures` as a fixed-width table, the bound's parts below it."""
    head = f"{'N':>3} {'(a) sweep s':>12} {'(b) separate s':>15} {'(b)/(a)':>8} {'bound s':>8} {'(a)/bound':>10}"
    lines = [head, "-" * len(head)]
    for r in sizes:
        lines.append(f"{r['n']:>3} {r['a_seconds']:>12.1f} {r['b_seconds']:>15.1f} {r['ratio']:>7.2f}x "
                     f"{r['bound_seconds']:>8.1f} {r['a_over_bound']:>10.2f}")
    lines.append("")
    lines.append("bound = max(P, (P * c_p + sum W_i) / C): P production s of (a) (rows / rows/s), c_p producer CPUs, "
                 "W_i each SAE alone on one core, C cores")
    for r in sizes:
        lines.append(f"  N={r['n']}: P {r['production_seconds']:.1f}s ({r['producer_rows']:,} rows at "
                     f"{r['producer_rows_per_s']:,.0f} rows/s), c_p {r['producer_cpus']:g}, sum W_i "
                     f"{sum(r['train_seconds']):.1f}s over {len(r['train_seconds'])} SAEs, C {r['cores']:g}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------

def single_sae_tokens_per_s(cfg: RunConfig, buffer_path: str, timed_steps: int = 10) -> float:
    """Training tokens/s of the one SAE of `cfg` trained alone in this process (on the torch
    threads set by the caller) from the buffer at `buffer_path`, as a trial trains it (its
    SAEConfig, train settings, target L0, the reader's train split).

    Runs 2 x timed_steps steps of train.batch_size rows with a log step at timed_steps and at the
    end; the time between the two log steps is timed (the init batches, b_dec's geometric median
    and the first steps are not): tokens/s = timed_steps x batch_size / seconds.
    """
    from sae_ray.buffer import ActivationBuffer, BufferReader
    from sae_ray.devices import pick_device
    from sae_ray.sae import create_sae
    from sae_ray.sweep.plan import expand_trials
    from sae_ray.train.loop import train_sae
    from sae_ray.train.memory import keep_freed_memory

    buffer = ActivationBuffer.open(buffer_path)
    hook = next(iter(buffer.hooks))  # bench_config keeps one hook
    (trial,) = expand_trials(cfg.sae, {hook: buffer.hooks[hook]})
    device = pick_device(cfg.train.device)
    if device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_memory()  # as the trial does
    batch = cfg.train.batch_size
    train = cfg.train.model_copy(update={"total_tokens": 2 * timed_steps * batch, "log_every": timed_steps})
    marks: list[tuple[float, float]] = []

    def on_log(step: int, metrics: list[dict[str, float]]) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append((time.perf_counter(), metrics[0]["tokens"]))

    torch.manual_seed(cfg.train.seed)
    sae = create_sae(trial.sae_config(cfg)).to(device)
    reader = BufferReader(buffer, hook, batch, seed=cfg.train.seed, split="train")
    try:
        train_sae(sae, iter(reader), train, on_log=on_log, targets=[trial.target_l0])
    finally:
        reader.close()
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


def _timed_sweep(cfg: RunConfig) -> tuple[float, Any]:
    """(wall seconds, SweepResult) of one `run_sweep(cfg)`; RuntimeError when it produced nothing
    (it reused a buffer, so it did not pay for its own activations)."""
    from sae_ray.sweep import run_sweep

    start = time.perf_counter()
    result = run_sweep(cfg)
    seconds = time.perf_counter() - start
    if not result.producer_stats:
        raise RuntimeError(f"run {cfg.name!r} in {cfg.workdir} produced no activations (it reused a buffer)")
    return seconds, result


def run_sweep_bench(config_path: str | Path = DEFAULT_CONFIG, sizes: tuple[int, ...] | list[int] = (4, 8),
                    tokens: int = DEFAULT_TOKENS, workdir: str | Path | None = None, timed_steps: int = 10,
                    gpus: float = 0, log: Callable[[str], None] | None = print) -> dict:
    """Time N SAEs as one sweep (a) against N separate runs (b), for each N in `sizes`; print the
    table (`format_table`) and return the figures.

    1. --config, --sizes, --tokens checked (`check_bench_args`): ConfigError before any work;
    2. the configs (`bench_config`): one sweep per size, one separate run per distinct SAE of the
       sizes (the SAEs of the largest size), each in a fresh subdirectory of the bench's
       directory (its own buffer), all in one MLflow store created first (no run pays for that);
       every separate run's config is checked to differ from its sweep's only in its SAEs;
    3. Ray started once, as run_sweep would start it (`connect_ray`), unless this process has
       joined one already; both sides run on it and neither pays for starting it;
    4. (a): one timed run_sweep per size, smallest first (the first run also pays for what runs
       first: page cache, Ray's first workers);
    5. (b): one timed run_sweep per distinct SAE; each SAE of every size matched to the separate
       run that trained the identical SAE (`match_separate`), so (b) of a size sums its SAEs' runs;
    6. each distinct SAE's tokens/s alone on one torch thread (`single_sae_tokens_per_s`) from
       the largest sweep's buffer;
    7. per size `size_figures`, printed as `format_table`;
    8. Ray shut down if step 3 started it; the bench's directory removed unless `workdir` was given.

    workdir: keep everything in a new subdirectory of it (default: a temporary directory, removed).
    timed_steps: steps timed per SAE in step 6. gpus: GPUs the runs use (`bench_config`; 0: the
    config's placement, on CPU; with GPUs the bound still counts CPU cores: a reference only).
    log: where lines go (None: nowhere; run_sweep prints its own progress to stdout).

    Returns {"tokens", "cores", "workdir" (None when removed), "separate_seconds" {SAE name: s},
    "tokens_per_s" {SAE name: single-SAE tokens/s}, "sizes": [size_figures row per size]}.
    """
    from sae_ray import tracking
    from sae_ray.preflight import available_resources

    say = log or (lambda line: None)
    sizes = sorted(int(n) for n in sizes)
    base = check_bench_args(config_path, sizes, tokens)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-", dir=None if workdir is None else str(workdir))).resolve()
    ray_started = False
    try:
        uri, artifacts = f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()

        def make(saes: list[tuple[str, int]], name: str) -> RunConfig:
            return bench_config(base, saes, tokens, root / name, name, uri, artifacts, gpus)

        sweeps = {n: make(saes_of(n), f"sweep-{n}") for n in sizes}
        distinct = saes_of(sizes[-1])  # every smaller size's SAEs are among these (checked in 5.)
        separate = {sae: make([sae], f"separate-{sae[0]}-L0_{sae[1]}") for sae in distinct}
        largest = sweeps[sizes[-1]]
        for cfg in [*sweeps.values(), *separate.values()]:  # every run trains its SAEs exactly alike
            differ = same_but_saes(largest, cfg)
            if differ:
                raise ValueError(f"run {cfg.name!r}: its config differs from {largest.name!r}'s in {differ}")
        tracking.ensure_experiment(uri, base.tracking.experiment, artifacts)
        s = largest.sae
        width = f"expansion {s.expansion_factor[0]}" if s.expansion_factor else f"d_sae {s.d_sae[0]}"
        say(f"{SOURCE}: model {largest.model.name}, data {largest.data.path}, "
            f"hook {largest.hooks[0].model_dump(exclude_none=True)}, {width}")
        say(f"each SAE trains {tokens:,} tokens; every run produces its own buffer of {tokens:,} rows; batch "
            f"{largest.train.batch_size:,}, eval on {largest.train.eval_rows:,} held-out rows, monitor off; sizes {sizes}; "
            f"workdir {root}")
        for n in sizes:
            say(f"  N={n}: {', '.join(f'{a} L0 {t}' for a, t in saes_of(n))}")
        say(f"(b): {len(distinct)} distinct separate runs, each run once; (b) of a size is the sum of its SAEs' runs "
            "(the same SAEs, same config)")

        import ray

        from sae_ray.sweep.production import connect_ray

        ray_started = not ray.is_initialized()
        connect_ray(largest)
        cores = float(available_resources()["CPU"])
        say(f"Ray: {cores:g} CPUs")

        # 4. (a): one sweep per size
        a_runs = {}
        for n in sizes:
            say(f"\n(a) one sweep of {n} SAEs")
            a_runs[n] = _timed_sweep(sweeps[n])
            say(f"(a) N={n}: {a_runs[n][0]:.1f}s")

        # 5. (b): one run per distinct SAE
        b_seconds, b_rows = {}, {}
        for sae, cfg in separate.items():
            say(f"\n(b) separate run: {sae[0]} L0 {sae[1]}")
            seconds, result = _timed_sweep(cfg)
            (row,) = result.rows
            b_seconds[sae_key(row)], b_rows[sae_key(row)] = seconds, row
            say(f"(b) {row['sae']}: {seconds:.1f}s")
        matched = {n: match_separate(a_runs[n][1].rows, b_rows) for n in sizes}

        # 6. each SAE alone on one torch thread, from the largest sweep's buffer
        tps = {}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for sae in distinct:
                key = sae_key(_row_of(b_rows, sae))
                tps[key] = single_sae_tokens_per_s(separate[sae], largest.buffer_path(), timed_steps)
        finally:
            torch.set_num_threads(threads)
        say("\nsingle-SAE training tokens/s (1 torch thread, from (a)'s buffer): "
            + ", ".join(f"{b_rows[k]['sae'].split('@')[0]} {v:,.0f}" for k, v in tps.items()))

        # 7. the figures
        rows = []
        for n in sizes:
            seconds, result = a_runs[n]
            p = sweeps[n].producers
            rows.append(size_figures(n, seconds, [b_seconds[k] for k in matched[n]], result.producer_stats,
                                     p.count * p.num_cpus, [r["tokens_seen"] for r in result.rows],
                                     [tps[sae_key(r)] for r in result.rows], cores))
        say("")
        say(format_table(rows))
        return {"tokens": tokens, "cores": cores, "workdir": None if workdir is None else str(root),
                "separate_seconds": {b_rows[k]["sae"]: s for k, s in b_seconds.items()},
                "tokens_per_s": {b_rows[k]["sae"]: v for k, v in tps.items()}, "sizes": rows}
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _row_of(rows: dict[tuple, dict[str, Any]], sae: tuple[str, int]) -> dict[str, Any]:
    """The separate run's summary row of (architecture, target L0) `sae`."""
    (row,) = [r for r in rows.values() if (r["architecture"], r["target_l0"]) == sae]
    return row
