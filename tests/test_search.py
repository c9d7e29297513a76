"""Tune search and scheduling (`sweep` section, `sae_ray.sweep.search`): the config rules, the
param_space of each search, draws applied to a trial, Tune's objects, and real Tune runs of tiny
function trainables (no SAE pipeline): random and Optuna draws, ASHA stopping, fractional GPUs."""

from __future__ import annotations

import math
import os

import pytest
import ray
from ray import tune
from ray.tune.search import sample

from sae_ray.config import ConfigError, validate_config
from sae_ray.config.sections import (
    REPORTED_METRICS,
    Range,
    SearchConfig,
    search_warnings,
)
from sae_ray.sweep.plan import Stack, Trial, expand_trials, pack_stacks, stack_limit
from sae_ray.sweep.search import (
    TuneParts,
    apply_draw,
    drawn_stack,
    param_space,
    plan_problems,
    report_scalars,
    stack_of,
    trial_name,
    trial_resources,
    trial_setup,
    tune_parts,
)

HOOK = "blocks.1.hook_resid_post"
D_IN = 8

BASE = {
    "model": {"name": "some/model"},
    "data": {"path": "docs.jsonl"},
    "hooks": [{"layer": 1, "site": "resid_post"}],
    "sae": {"architectures": ["topk"], "expansion_factor": [4], "k": [4]},
}
LR = {"low": 1e-4, "high": 1e-2, "log": True}


def config(sweep=None, **sections):
    raw = {**BASE, **sections}
    if sweep is not None:
        raw["sweep"] = sweep
    return raw


def problems_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    return e.value.problems


def the_problem(raw, prefix: str) -> str:
    """The one problem that starts with `prefix`."""
    found = [p for p in problems_of(raw) if p.startswith(prefix)]
    assert len(found) == 1, problems_of(raw)
    return found[0]


def stacks_of(cfg, d_in: int = D_IN) -> list[Stack]:
    return pack_stacks(expand_trials(cfg.sae, {HOOK: d_in}), stack_limit(cfg))


# ---------------------------------------------------------------------------------------
# Config: defaults and rules
# ---------------------------------------------------------------------------------------

def test_defaults_are_the_plain_grid():
    cfg = validate_config(config())
    s = cfg.sweep
    assert (s.search, s.num_samples, s.scheduler, s.metric, s.mode, s.space) == ("grid", 1, "fifo", "fvu", "min", {})
    assert tune_parts(cfg) == TuneParts(None, None, 1, None)
    assert search_warnings(cfg) == []
    for model in (SearchConfig, Range):
        for name, field in model.model_fields.items():
            assert field.description, (model.__name__, name)


@pytest.mark.parametrize("field, value, accepted", [
    ("search", "bayes", ["'grid'", "'random'", "'optuna'"]),
    ("scheduler", "hyperband", ["'fifo'", "'asha'"]),
    ("metric", "accuracy", [f"'{m}'" for m in REPORTED_METRICS]),
    ("mode", "up", ["'min'", "'max'"]),
])
def test_unknown_choice_names_field_value_and_accepted(field, value, accepted):
    extra = {"scheduler": "asha"} if field == "metric" else {}  # ASHA with a metric no trial reports
    problem = the_problem(config({field: value, **extra}), f"sweep.{field}: value {value!r}")
    for a in accepted:
        assert a in problem, problem


@pytest.mark.parametrize("space, prefix, words", [
    ({"learning_rate": LR}, "sweep.space: key 'learning_rate'", ["unknown", "'lr'", "'k'", "'target_l0'"]),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "sweep.space.lr: value {low: 0.01, high: 0.0001}", ["low must be below high"]),
    ({"lr": {"low": 0.0, "high": 1e-3, "log": True}}, "sweep.space.lr.low: value 0", ["greater than 0"]),
    ({"k": {"low": 2.5, "high": 6}}, "sweep.space.k: value {low: 2.5, high: 6}", ["whole number"]),
    ({"lr": {"low": 1e-4}}, "sweep.space.lr.high: value <missing>", ["required"]),
])
def test_space_ranges_are_checked(space, prefix, words):
    problem = the_problem(config({"search": "random", "space": space}), prefix)
    for w in words:
        assert w in problem, problem


def test_space_needs_a_drawing_search_and_a_drawing_search_needs_a_space():
    problem = the_problem(config({"space": {"lr": LR}}), "sweep.space: keys ['lr']")
    assert "'grid'" in problem and "'random'" in problem and "'optuna'" in problem
    problem = the_problem(config({"search": "optuna"}), "sweep.search: value 'optuna'")
    assert "sweep.space" in problem and "empty" in problem
    problem = the_problem(config({"num_samples": 3}), "sweep.num_samples: value 3")
    assert "'grid'" in problem and "use 1" in problem


def test_a_bounded_window_takes_one_trial_per_stack_and_no_asha():
    window = {"max_gb": 1.0}
    problem = the_problem(config({"search": "random", "num_samples": 2, "space": {"lr": LR}}, buffer=window),
                          "sweep.search: value 'random'")
    assert "buffer.max_gb" in problem and "num_samples=2" in problem
    problem = the_problem(config({"search": "optuna", "space": {"lr": LR}}, buffer=window), "sweep.search: value 'optuna'")
    assert "buffer.max_gb" in problem
    problem = the_problem(config({"scheduler": "asha"}, buffer=window), "sweep.scheduler: value 'asha'")
    assert "buffer.max_gb" in problem and "'fifo'" in problem
    validate_config(config({"search": "random", "num_samples": 1, "space": {"lr": LR}}, buffer=window))


def test_a_drawn_knob_needs_one_grid_value_and_an_architecture_that_uses_it():
    # sae.k [4, 8]: one SAE per value in a stack; one drawn k for all of them is ambiguous
    problem = the_problem(config({"search": "random", "space": {"k": {"low": 2, "high": 6}}},
                                 sae={**BASE["sae"], "k": [4, 8]}), "sweep.space.k: value {low: 2, high: 6}")
    assert "sae.k lists [4, 8]" in problem and "one value" in problem
    problem = the_problem(config({"search": "random", "space": {"l1_coefficient": {"low": 1, "high": 10, "log": True}}}),
                          "sweep.space.l1_coefficient")
    assert "['topk']" in problem and "standard" in problem and "gated" in problem
    problem = the_problem(config({"search": "random", "space": {"target_l0": {"low": 2, "high": 6}}}),
                          "sweep.space.target_l0")
    assert "sae.target_l0" in problem
    # k must stay below d_sae when the widths are given as d_sae
    problem = the_problem(config({"search": "random", "space": {"k": {"low": 2, "high": 32}}},
                                 sae={"architectures": ["topk"], "d_sae": [32], "k": [4]}), "sweep.space.k")
    assert "below d_sae" in problem and "32" in problem


def test_an_architecture_nothing_drawn_touches_would_repeat_unchanged():
    sae = {"architectures": ["topk", "standard"], "expansion_factor": [4], "k": [4], "l1_coefficient": [1.0]}
    raw = config({"search": "random", "num_samples": 3, "space": {"k": {"low": 2, "high": 6}}}, sae=sae)
    problem = the_problem(raw, "sweep.space: keys ['k']")
    assert "'standard'" in problem and "l1_coefficient" in problem and "num_samples=3" in problem
    # lr touches every architecture: valid
    validate_config(config({"search": "random", "num_samples": 3, "space": {"k": {"low": 2, "high": 6}, "lr": LR}}, sae=sae))


def test_warnings_say_when_the_ranking_metric_is_not_fair():
    fair = validate_config(config({"search": "random", "num_samples": 4, "space": {"lr": LR}, "scheduler": "asha"}))
    assert search_warnings(fair) == []
    coefficients = validate_config(config({"search": "random", "num_samples": 4, "space": {"lr": LR}, "scheduler": "asha"},
                                          sae={"architectures": ["standard"], "expansion_factor": [4],
                                               "l1_coefficient": [1.0]}))
    (w,) = search_warnings(coefficients)
    assert w.startswith("sweep.metric: value 'fvu'") and "coefficient" in w and "target_l0" in w
    widths = validate_config(config({"search": "random", "num_samples": 4, "space": {"lr": LR}, "scheduler": "asha",
                                     "grace_fraction": 0.01}, sae={**BASE["sae"], "expansion_factor": [2, 4]}))
    text = "\n".join(search_warnings(widths))
    assert "sweep.scheduler: value 'asha'" in text and "2 stacks" in text
    assert "sweep.grace_fraction: value 0.01" in text
    drawn_k = validate_config(config({"search": "optuna", "num_samples": 4, "space": {"k": {"low": 2, "high": 6}}}))
    (w,) = search_warnings(drawn_k)
    assert w.startswith("sweep.space.k") and "largest k wins" in w


# ---------------------------------------------------------------------------------------
# param_space, draws, Tune's objects, resources
# ---------------------------------------------------------------------------------------

def two_stack_config(sweep=None, **changes):
    return validate_config(config(sweep, sae={**BASE["sae"], "expansion_factor": [2, 4]}, **changes))


def test_param_space_of_each_search():
    grid = two_stack_config()
    stacks = stacks_of(grid)
    assert len(stacks) == 2
    space = param_space(grid, stacks)
    assert space["stacks"] == [s.to_dict() for s in stacks]
    assert space["stack_index"] == {"grid_search": [0, 1]} and space["draw"] == {}

    random = two_stack_config({"search": "random", "num_samples": 3, "space": {"lr": LR, "k": {"low": 2, "high": 6}}})
    space = param_space(random, stacks)
    assert space["stack_index"] == {"grid_search": [0, 1]}
    lr, k = space["draw"]["lr"], space["draw"]["k"]
    assert isinstance(lr, sample.Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(lr.get_sampler(), sample.LogUniform)
    assert isinstance(k, sample.Integer) and (k.lower, k.upper) == (2, 7)  # high included
    assert isinstance(k.get_sampler(), sample.Uniform)
    log_k = two_stack_config({"search": "random", "space": {"lr": {"low": 1e-4, "high": 1e-2},
                                                            "k": {"low": 2, "high": 6, "log": True}}})
    lr, k = param_space(log_k, stacks)["draw"].values()
    assert isinstance(lr.get_sampler(), sample.Uniform) and isinstance(k.get_sampler(), sample.LogUniform)
    assert isinstance(k, sample.Integer) and (k.lower, k.upper) == (2, 7)

    optuna = two_stack_config({"search": "optuna", "num_samples": 5, "space": {"lr": LR}})
    space = param_space(optuna, stacks)
    index = space["stack_index"]
    assert isinstance(index, sample.Categorical) and index.categories == [0, 1]
    # what OptunaSearch makes of it: no grid_search (it refuses one), an index categorical, lr log-uniform
    from ray.tune.search.optuna import OptunaSearch

    converted = OptunaSearch.convert_search_space({**space, "run": {"train": {"lr": 3e-4}}})
    assert set(converted) == {"stack_index", "draw/lr"}
    assert converted["stack_index"].choices == (0, 1) and converted["draw/lr"].log
    with pytest.raises(ValueError, match="Grid search"):
        OptunaSearch.convert_search_space(param_space(random, stacks))


def test_apply_draw_sets_lr_and_every_member_of_the_knob():
    cfg = validate_config(config(sae={"architectures": ["topk", "standard"], "expansion_factor": [4], "k": [4],
                                      "l1_coefficient": [1.0], "max_stack": 4}))
    topk, standard = stacks_of(cfg)
    new_cfg, new_topk = apply_draw(cfg, topk, {"lr": 2e-3, "k": 6.0})
    assert new_cfg.train.lr == 2e-3 and cfg.train.lr == 3e-4  # the original is left alone
    assert [t.k for t in new_topk.trials] == [6] and isinstance(new_topk.trials[0].k, int)
    assert new_topk.name == f"topk-d32-k6@{HOOK}"
    _, new_standard = apply_draw(cfg, standard, {"k": 6, "l1_coefficient": 2.5})
    assert [t.l1_coefficient for t in new_standard.trials] == [2.5] and new_standard.trials[0].k is None
    assert apply_draw(cfg, topk, {}) == (cfg, topk)
    with pytest.raises(ValueError, match="d_sae 32"):
        apply_draw(cfg, topk, {"k": 32})
    with pytest.raises(ValueError, match="unknown names"):
        apply_draw(cfg, topk, {"momentum": 0.9})

    # in a trial: the config Tune resolved -> the RunConfig and Stack to train
    resolved = {"stacks": [topk.to_dict(), standard.to_dict()], "stack_index": 1,
                "draw": {"lr": 1e-3, "l1_coefficient": 4.0}, "run": cfg.model_dump(mode="json")}
    run, stack = trial_setup(resolved)
    assert run.train.lr == 1e-3 and [t.l1_coefficient for t in stack.trials] == [4.0]
    assert stack == stack_of(resolved) and trial_name(resolved) == f"standard-d32-l1_4@{HOOK} lr=0.001"


def test_a_drawn_target_l0_reaches_the_target_trials_and_k_where_k_is_the_target():
    cfg = validate_config(config({"search": "random", "num_samples": 2, "space": {"target_l0": {"low": 2, "high": 6}}},
                                 sae={"architectures": ["topk", "standard"], "expansion_factor": [4], "target_l0": [4]}))
    topk, standard = stacks_of(cfg)
    assert (topk.trials[0].k, topk.trials[0].target_l0, standard.trials[0].target_l0) == (4, 4, 4)
    (t,) = drawn_stack(topk, {"target_l0": 5}).trials
    assert (t.target_l0, t.k) == (5, 5) and t.name == f"topk-d32-L0_5@{HOOK}"
    (s,) = drawn_stack(standard, {"target_l0": 5}).trials
    # the coefficient architecture keeps its starting coefficient: the L0 controller moves it
    assert (s.target_l0, s.l1_coefficient) == (5, standard.trials[0].l1_coefficient)
    # a drawn k leaves a target trial alone, and reaches one that sae.k sets
    assert drawn_stack(topk, {"k": 3}) == topk
    plain = Trial("topk", 32, 4.0, "k", 8, HOOK, 1, D_IN)
    assert drawn_stack(Stack((plain,)), {"k": 3, "target_l0": 5}).trials[0].k == 3
    with pytest.raises(ValueError, match="target_l0 32"):
        drawn_stack(standard, {"target_l0": 32})

    # the config: target_l0 is drawn for the target architectures; k is not theirs to draw
    problem = the_problem(config({"search": "random", "space": {"k": {"low": 2, "high": 6}}},
                                 sae={"architectures": ["topk"], "expansion_factor": [4], "target_l0": [4]}),
                          "sweep.space.k")
    assert "space.target_l0" in problem
    problem = the_problem(config({"search": "random", "space": {"target_l0": {"low": 2, "high": 6}}},
                                 sae={"architectures": ["topk"], "expansion_factor": [4], "target_l0": [4, 8]}),
                          "sweep.space.target_l0")
    assert "sae.target_l0 lists [4, 8]" in problem
    # jumprelu set by its l0 list, nothing drawn for it: it would repeat unchanged
    problem = the_problem(config({"search": "random", "num_samples": 2, "space": {"k": {"low": 2, "high": 6}}},
                                 sae={"architectures": ["topk", "jumprelu"], "expansion_factor": [4], "k": [4],
                                      "l0_coefficient": [1.0]}), "sweep.space: keys ['k']")
    assert "'jumprelu'" in problem and "sae.l0_coefficient" in problem


def test_tune_parts_settings():
    random = two_stack_config({"search": "random", "num_samples": 3, "space": {"lr": LR}},
                              resources={"max_concurrent_trials": 2})
    parts = tune_parts(random)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    assert isinstance(parts.search_alg, BasicVariantGenerator) and parts.search_alg.max_concurrent == 2
    assert parts.scheduler is None and parts.num_samples == 3 and parts.max_concurrent_trials is None

    optuna = two_stack_config({"search": "optuna", "num_samples": 7, "space": {"lr": LR}, "scheduler": "asha",
                               "metric": "mse", "grace_fraction": 0.1, "reduction_factor": 3},
                              train={"total_tokens": 90_000, "seed": 5}, resources={"max_concurrent_trials": 2})
    parts = tune_parts(optuna)
    from ray.tune.schedulers import AsyncHyperBandScheduler
    from ray.tune.search.optuna import OptunaSearch

    assert isinstance(parts.search_alg, OptunaSearch)
    assert (parts.search_alg.metric, parts.search_alg.mode, parts.search_alg._seed) == ("mse", "min", 5)
    assert parts.num_samples == 7 and parts.max_concurrent_trials == 2  # TuneConfig wraps a Searcher in a limiter
    asha = parts.scheduler
    assert isinstance(asha, AsyncHyperBandScheduler)
    assert (asha._time_attr, asha.metric, asha._mode, asha._reduction_factor) == ("tokens", "mse", "min", 3)
    assert asha._stop_last_trials is False
    rungs = sorted(m for m, _ in asha._brackets[0]._rungs)
    # grace 9000 tokens, x3 per rung, all below total_tokens: ASHA never stops a trial that finished training
    assert rungs == pytest.approx([9_000, 27_000, 81_000])
    # a grace that lands a rung exactly on total_tokens (90000 = 10000 x 3^2) gets none there
    exact = two_stack_config({"search": "random", "space": {"lr": LR}, "scheduler": "asha", "grace_fraction": 1 / 9,
                              "reduction_factor": 3}, train={"total_tokens": 90_000})
    rungs = sorted(m for m, _ in tune_parts(exact).scheduler._brackets[0]._rungs)
    assert rungs == pytest.approx([10_000, 30_000]) and max(rungs) < 90_000


def test_trial_resources_one_bundle_with_a_gpu_share_or_none():
    share = trial_resources(validate_config(config(resources={"cpus_per_trial": 2, "gpus_per_trial": 0.25})))
    assert isinstance(share, tune.PlacementGroupFactory)
    assert share.bundles == [{"CPU": 2.0, "GPU": 0.25}] and share.required_resources == {"CPU": 2.0, "GPU": 0.25}
    cpu_only = trial_resources(validate_config(config(resources={"cpus_per_trial": 1})))
    assert cpu_only.bundles == [{"CPU": 1.0}]


def test_report_scalars_means_over_members_and_keeps_the_last_steps_figures():
    steps = [{"member": 0, "fvu": 0.2, "l0": 4.0, "loss": 1.0, "mse": 2.0, "dead_fraction": 0.0, "tokens": 800},
             {"member": 1, "fvu": 0.4, "l0": 8.0, "loss": 3.0, "mse": 4.0, "dead_fraction": 0.5, "tokens": 800}]
    last = report_scalars(steps)
    assert last == pytest.approx({"tokens": 800, "fvu": 0.3, "l0": 6.0, "loss": 2.0, "mse": 3.0, "dead_fraction": 0.25})
    # the final rows: held-out fvu/l0/dead_fraction, None for an SAE the monitor stopped; loss and mse stay
    finals = [{"fvu": 0.1, "l0": 5.0, "dead_fraction": 0.0, "tokens_seen": 1000},
              {"fvu": None, "l0": None, "dead_fraction": None, "tokens_seen": 400}]
    final = report_scalars(finals, previous=last)
    assert final == pytest.approx({"tokens": 1000, "fvu": 0.1, "l0": 5.0, "loss": 2.0, "mse": 3.0, "dead_fraction": 0.0})
    assert math.isnan(report_scalars([])["fvu"])


def test_plan_problems_catch_a_drawn_k_not_below_d_sae():
    cfg = validate_config(config({"search": "random", "space": {"k": {"low": 2, "high": 16}}},
                                 sae={**BASE["sae"], "expansion_factor": [2, 4]}))
    stacks = stacks_of(cfg)  # d_sae 16 and 32
    (problem,) = plan_problems(cfg, stacks)
    assert problem.startswith("sweep.space.k: value high 16") and "d_sae (16)" in problem
    assert plan_problems(cfg, stacks_of(cfg, d_in=16)) == []


# ---------------------------------------------------------------------------------------
# Real Tune runs (tiny function trainables, no SAE pipeline)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs and one logical GPU (Ray counts it; nothing touches a device)."""
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_tune(cfg, stacks, trainable, tmp_path, name):
    """Tuner over `trainable` the way a sweep builds it: resources, param_space and TuneConfig from `sweep`."""
    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_resources(cfg)),
        param_space={**param_space(cfg, stacks), "run": cfg.model_dump(mode="json")},
        tune_config=tune.TuneConfig(**tune_parts(cfg)._asdict()),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path / "tune"), verbose=0),
    )
    results = list(tuner.fit())
    assert [r.error for r in results if r.error is not None] == []
    return results


def report_draws():
    """A trainable that reports what it drew (closures travel to the workers by value)."""

    def trainable(config):
        draw = config["draw"]
        tune.report({"tokens": 1, "fvu": abs(math.log10(draw["lr"]) + 3), "lr": draw["lr"], "k": draw.get("k", -1)})

    return trainable


def test_random_search_draws_within_the_ranges_for_every_stack(local_ray, tmp_path):
    cfg = two_stack_config({"search": "random", "num_samples": 3, "space": {"lr": LR, "k": {"low": 2, "high": 6}}},
                           resources={"cpus_per_trial": 0.5})
    stacks = stacks_of(cfg)
    results = run_tune(cfg, stacks, report_draws(), tmp_path, "random")
    assert len(results) == 3 * len(stacks)
    assert sorted(r.config["stack_index"] for r in results) == [0, 0, 0, 1, 1, 1]
    lrs = [r.metrics["lr"] for r in results]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == len(lrs)
    assert all(r.metrics["k"] in range(2, 7) for r in results)
    for r in results:  # what the trial will train: the drawn values in its config and stack
        run, stack = trial_setup(r.config)
        assert run.train.lr == r.metrics["lr"] and [t.k for t in stack.trials] == [r.metrics["k"]]
        assert stack.trials[0].d_sae == stacks[r.config["stack_index"]].trials[0].d_sae


def test_optuna_runs_num_samples_trials_within_the_ranges(local_ray, tmp_path):
    cfg = two_stack_config({"search": "optuna", "num_samples": 4, "space": {"lr": LR, "k": {"low": 2, "high": 6}}},
                           resources={"cpus_per_trial": 0.5})
    stacks = stacks_of(cfg)
    results = run_tune(cfg, stacks, report_draws(), tmp_path, "optuna")
    assert len(results) == 4
    assert all(r.config["stack_index"] in (0, 1) for r in results)
    assert all(1e-4 <= r.metrics["lr"] <= 1e-2 and r.metrics["k"] in range(2, 7) for r in results)
    assert all(r.metrics["fvu"] == pytest.approx(abs(math.log10(r.metrics["lr"]) + 3)) for r in results)


def lr_curve():
    """fvu falls with tokens the same way for every trial; its floor grows with |log10(lr) + 3|
    (best at lr = 1e-3). Ten reports of 100 tokens each."""

    def trainable(config):
        lr = config["draw"]["lr"]
        for step in range(1, 11):
            tune.report({"tokens": 100 * step, "fvu": abs(math.log10(lr) + 3) + 1 / step})

    return trainable


def test_asha_stops_trials_that_trail_at_equal_tokens(local_ray, tmp_path):
    cfg = validate_config(config({"search": "random", "num_samples": 6, "scheduler": "asha", "grace_fraction": 0.2,
                                  "space": {"lr": {"low": 1e-5, "high": 1e-1, "log": True}}},
                                 train={"total_tokens": 1000}, resources={"max_concurrent_trials": 1}))
    stacks = stacks_of(cfg)
    rungs = sorted(m for m, _ in tune_parts(cfg).scheduler._brackets[0]._rungs)
    assert rungs == pytest.approx([200, 800])
    results = run_tune(cfg, stacks, lr_curve(), tmp_path, "asha")
    assert len(results) == 6
    floor = {r.config["draw"]["lr"]: abs(math.log10(r.config["draw"]["lr"]) + 3) for r in results}
    reached = {r.config["draw"]["lr"]: r.metrics["tokens"] for r in results}
    best = min(floor, key=floor.get)
    assert reached[best] == 1000  # the best is never stopped, and runs to the end
    stopped = [lr for lr, tokens in reached.items() if tokens < 1000]
    assert stopped, reached  # one trial at a time: a later trial worse than those before it stops
    for lr in stopped:  # stopped at a rung, with a worse floor than the best
        assert reached[lr] in (200, 800) and floor[lr] > floor[best]


def test_a_quarter_gpu_packs_four_trials_on_one_gpu(local_ray, tmp_path):
    cfg = validate_config(config(sae={**BASE["sae"], "expansion_factor": [1, 2, 3, 4, 5]},
                                 resources={"cpus_per_trial": 0.25, "gpus_per_trial": 0.25}))
    stacks = stacks_of(cfg)
    started, running = tmp_path / "started", tmp_path / "running"
    started.mkdir()
    running.mkdir()

    def trainable(config):
        import time

        me = str(config["stack_index"])
        (running / me).touch()
        seen = len(os.listdir(running))  # trials running now, this one included
        (started / me).touch()
        for _ in range(600):  # wait (30 s at most) until four trials have started
            if len(os.listdir(started)) >= 4:
                break
            time.sleep(0.05)
        together = len(os.listdir(running))
        (running / me).unlink()
        tune.report({"tokens": 1, "fvu": 0.0, "seen": seen, "together": together,
                     "gpu": ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)})

    results = run_tune(cfg, stacks, trainable, tmp_path, "gpu-share")
    assert len(results) == 5
    assert all(r.metrics["gpu"] == 0.25 for r in results)
    # CPUs would let 8 run; the one GPU lets 4 at once, never 5
    assert max(r.metrics["together"] for r in results) == 4
    assert max(r.metrics["seen"] for r in results) <= 4
