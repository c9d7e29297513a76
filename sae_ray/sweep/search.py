"""Ray Tune's search and scheduling for a sweep: what `sweep` (SearchConfig) asks of Tune.

    param_space(cfg, stacks) ──▶ {"stacks", "stack_index", "draw"}   the search-dependent part
                                                                       of Tune's param_space
    tune_parts(cfg) ───────────▶ TuneParts                            TuneConfig's search_alg,
                                                                       scheduler, num_samples,
                                                                       max_concurrent_trials
    trial_resources(cfg) ──────▶ PlacementGroupFactory                for tune.with_resources
    trial_setup(config) ───────▶ (RunConfig, Stack)                   in the trial: its config
                                                                       and stack, draws applied
    report_scalars(rows) ──────▶ {"tokens", "fvu", "l0", ...}         the flat figures a trial
                                                                       reports for ASHA / Optuna

How each search maps onto Tune:

- grid: `stack_index` is a grid_search over the stacks; nothing is drawn; one trial per stack.
- random: the same grid_search, and `draw` holds Tune domains (uniform, loguniform, randint,
  lograndint). Tune's BasicVariantGenerator crosses the grid with fresh draws and repeats the
  grid num_samples times: stacks x num_samples trials. Draws are seeded by train.seed.
- optuna: OptunaSearch refuses grid_search, so `stack_index` is a tune.choice over stack
  indices (Optuna's categoricals must be primitives, hence an index, not the stack dict) and
  Optuna's TPE picks it like any other parameter; num_samples is the total number of trials.

The stacks themselves travel as a constant list in every trial's config (`"stacks"`); a trial
finds its own with `stack_index`.

Which metric is fair (ASHA compares trials at equal `tokens`; Optuna compares finished trials).
Every report carries flat scalars: `tokens` (rows the stack has trained on) and, for each name
in `REPORTED_METRICS`, the mean over the stack's SAEs still training. Reconstruction (fvu, and
mse, loss) always improves with a denser code, so comparing it is fair only between trials of
equal L0:

- With a k ladder (TopK family) or a target-L0 ladder (`sae.target_l0`), every stack of the
  grid holds the same ladder, so the mean FVU of two stacks compares SAEs at the same L0 (a
  controlled coefficient architecture sits near its target once the controller has settled:
  keep `grace_fraction` past the sparsity warmup). That is the fair case, and FVU (scale-free,
  unlike mse) is the metric: `sweep.metric: fvu`.
- With sparsity coefficients, L0 depends on the coefficient and on lr, so the trial whose SAEs
  are densest has the lowest FVU: ASHA and Optuna would favour weak penalties, not good SAEs.
  `sae_ray.config.sections.search_warnings` says so, as it does for a drawn k or target_l0
  (the largest wins) and for ASHA over stacks of different hook, architecture or width (their
  attainable FVU differs by nature).
- The mean moves when the live monitor stops an SAE of the stack (fewer members remain).

Imports ray.tune (and Optuna only when search is optuna); no other Ray.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any, NamedTuple

from ray import tune

from sae_ray.config import RunConfig
from sae_ray.config.sections import INTEGER_KEYS, REPORTED_METRICS, SPACE_KEYS, Range
from sae_ray.sweep.plan import Stack


class TuneParts(NamedTuple):
    """The keyword arguments of `tune.TuneConfig` that `sweep` decides."""

    search_alg: Any
    """None (Tune's default grid expansion), a seeded BasicVariantGenerator or an OptunaSearch."""
    scheduler: Any
    """None (FIFO) or an ASHAScheduler on `tokens`."""
    num_samples: int
    max_concurrent_trials: int | None
    """resources.max_concurrent_trials, or None where the BasicVariantGenerator holds it (Tune ignores
    TuneConfig's cap when it is given a search algorithm that is not a Searcher)."""


def _domain(name: str, r: Range) -> Any:
    """The Tune domain of one range: whole numbers (high included) for k and target_l0."""
    if name in INTEGER_KEYS:
        low, high = int(r.low), int(r.high) + 1  # Tune's integer domains exclude their upper end
        return tune.lograndint(low, high) if r.log else tune.randint(low, high)
    return tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high)


def param_space(cfg: RunConfig, stacks: list[Stack]) -> dict[str, Any]:
    """The search-dependent entries of Tune's param_space: "stacks" (every `Stack.to_dict()`, a
    constant), "stack_index" (grid_search over the indices for grid and random, tune.choice for
    optuna) and "draw" ({name: Tune domain} for sweep.space; {} for grid)."""
    if not stacks:
        raise ValueError("param_space: no stacks to train")
    indices = list(range(len(stacks)))
    s = cfg.sweep
    return {
        "stacks": [st.to_dict() for st in stacks],
        "stack_index": tune.choice(indices) if s.search == "optuna" else tune.grid_search(indices),
        "draw": {} if s.search == "grid" else {name: _domain(name, r) for name, r in s.space.items()},
    }


def drawn_stack(stack: Stack, draw: dict[str, Any]) -> Stack:
    """`stack` with the drawn sparsity values applied. A drawn k / l1_coefficient / l0_coefficient
    goes to every trial that knob sets directly (`target_l0` None); a drawn target_l0 to every
    target-L0 trial: its `target_l0`, and its k for the k architectures (k = target; a coefficient
    architecture keeps its starting coefficient, the L0 controller moves it). Raises ValueError
    for an unknown name or a k / target not below d_sae."""
    unknown = sorted(set(draw) - set(SPACE_KEYS))
    if unknown:
        raise ValueError(f"draw: unknown names {unknown}; accepted: {list(SPACE_KEYS)}")
    trials = []
    for t in stack.trials:
        changes: dict[str, Any] = {}
        target = t.target_l0
        if target is None and t.sparsity_param in draw:
            value = draw[t.sparsity_param]
            changes["sparsity"] = int(value) if t.sparsity_param == "k" else float(value)
        if target is not None and "target_l0" in draw:
            target = changes["target_l0"] = int(draw["target_l0"])
            if t.sparsity_param == "k":
                changes["sparsity"] = target
        k = changes.get("sparsity", t.sparsity) if t.sparsity_param == "k" else None
        for what, value in (("k", k), ("target_l0", target)):
            if value is not None and not 0 < value < t.d_sae:
                raise ValueError(f"draw: {what} {value} for {t.name}: must be in [1, d_sae {t.d_sae})")
        trials.append(dataclasses.replace(t, **changes) if changes else t)
    return Stack(tuple(trials))


def apply_draw(cfg: RunConfig, stack: Stack, draw: dict[str, Any]) -> tuple[RunConfig, Stack]:
    """The trial's config and stack with the drawn values applied: lr -> cfg.train.lr; the
    sparsity knobs and target_l0 -> the stack's trials (`drawn_stack`). An empty draw changes nothing."""
    stack = drawn_stack(stack, draw)
    if "lr" in draw:
        lr = float(draw["lr"])
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"draw: lr {lr!r}: must be a positive number")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": lr})})
    return cfg, stack


def stack_of(config: dict[str, Any]) -> Stack:
    """The stack of a Tune trial's config (`param_space` entries resolved), draws applied."""
    return drawn_stack(Stack.from_dict(config["stacks"][config["stack_index"]]), config.get("draw") or {})


def trial_setup(config: dict[str, Any]) -> tuple[RunConfig, Stack]:
    """In the trial: its RunConfig (config["run"]) and Stack, with the draws applied."""
    cfg = RunConfig.model_validate(config["run"])
    stack = Stack.from_dict(config["stacks"][config["stack_index"]])
    return apply_draw(cfg, stack, config.get("draw") or {})


def trial_name(config: dict[str, Any]) -> str:
    """A Tune trial's display name: its stack's name (drawn sparsity in it), then the drawn lr,
    e.g. 'topk-d128-k8,k16@blocks.1.hook_resid_post lr=3.1e-04'."""
    draw = config.get("draw") or {}
    name = stack_of(config).name
    return f"{name} lr={float(draw['lr']):.2g}" if "lr" in draw else name


def tune_parts(cfg: RunConfig) -> TuneParts:
    """search_alg, scheduler, num_samples and max_concurrent_trials for `tune.TuneConfig(**parts._asdict())`.

    metric and mode go to the searcher and the scheduler themselves (TuneConfig gets neither:
    Tune refuses a scheduler given them twice). ASHA: time_attr "tokens", grace_period =
    grace_fraction x train.total_tokens, and stop_last_trials off with every rung below
    total_tokens, so ASHA never stops a trial that has finished training (which would lose its
    held-out evaluation and registration); it only stops trials at a rung.
    """
    s, r = cfg.sweep, cfg.resources
    search_alg: Any = None
    max_concurrent = r.max_concurrent_trials
    if s.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(max_concurrent=max_concurrent or 0, random_state=cfg.train.seed)
        max_concurrent = None
    elif s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=s.metric, mode=s.mode, seed=cfg.train.seed)
    scheduler = None
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        total = cfg.train.total_tokens
        grace = s.grace_fraction * total
        # max_t a hair below total_tokens: the rungs grace x factor^n < total_tokens only
        scheduler = ASHAScheduler(time_attr="tokens", metric=s.metric, mode=s.mode, grace_period=grace,
                                  max_t=max(grace, total * (1 - 1e-9)), reduction_factor=s.reduction_factor,
                                  stop_last_trials=False)
    return TuneParts(search_alg, scheduler, s.num_samples, max_concurrent)


def trial_resources(cfg: RunConfig) -> tune.PlacementGroupFactory:
    """What one trial reserves, for `tune.with_resources`: a placement group of one bundle
    {CPU: resources.cpus_per_trial, GPU: resources.gpus_per_trial, **resources.trial_resources}
    (custom resources place it on the nodes that declare them; a GPU share below 1 packs
    several trials on one GPU; 0 asks for none). A trial that starts workers of its own would add
    one bundle per worker here."""
    r = cfg.resources
    return tune.PlacementGroupFactory([{"CPU": float(r.cpus_per_trial), "GPU": float(r.gpus_per_trial),
                                        **{k: float(v) for k, v in r.trial_resources.items()}}])


def report_scalars(rows: list[dict[str, Any]], previous: dict[str, float] | None = None) -> dict[str, float]:
    """The flat figures of one report: `tokens` (the most any row has: the rows the stack trained
    on; `tokens_seen` in a final row) and, for each of REPORTED_METRICS, the mean over the rows
    that have it (None skipped: an SAE the monitor stopped). Figures the rows lack keep their value
    in `previous` (the last step's report): so the final report carries held-out fvu, l0 and
    dead_fraction, and the last step's loss and mse. A figure never seen is NaN."""
    out = {name: float("nan") for name in ("tokens", *REPORTED_METRICS)}
    out.update(previous or {})
    tokens = [r.get("tokens", r.get("tokens_seen")) for r in rows]
    tokens = [t for t in tokens if t is not None]
    if tokens:
        out["tokens"] = float(max(tokens))
    for name in REPORTED_METRICS:
        values = [float(r[name]) for r in rows if r.get(name) is not None]
        if values:
            out[name] = sum(values) / len(values)
    return out


def plan_problems(cfg: RunConfig, stacks: list[Stack]) -> list[str]:
    """Once the plan is known (preflight): a drawn k or target_l0 whose high end is not below the
    d_sae of a stack it applies to; search optuna without the optuna package."""
    problems = []
    s = cfg.sweep
    if s.search == "optuna" and importlib.util.find_spec("optuna") is None:
        problems.append("sweep.search: value 'optuna': needs the optuna package; pip install 'sae-ray[search]' "
                        "(or optuna), or use search 'random'")
    if s.search == "grid":
        return problems
    for key in ("k", "target_l0"):
        if key not in s.space:
            continue
        high = int(s.space[key].high)
        for t in {t for st in stacks for t in st.trials}:
            target = t.target_l0
            applies = (t.sparsity_param == "k" and target is None) if key == "k" else target is not None
            if applies and high >= t.d_sae:
                problems.append(f"sweep.space.{key}: value high {high}: must be below d_sae ({t.d_sae}) of {t.name}")
    return sorted(set(problems))
