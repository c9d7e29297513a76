"""Config validation: every rule, all problems reported at once, overrides."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sae_ray.config import ConfigError, apply_overrides, load_config, validate_config
from sae_ray.sweep.plan import Stack, expand_trials, pack_stacks, trial_problems

HOOK = "blocks.1.hook_resid_post"

BASE = {
    "model": {"name": "some/model"},
    "data": {"path": "docs.jsonl"},
    "hooks": [{"layer": 1, "site": "resid_post"}],
    "sae": {"architectures": ["standard", "topk"], "expansion_factor": [4], "l1_coefficient": [1.0], "k": [8]},
}


def problems_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    return e.value.problems


def with_sae(**sae):
    return {**BASE, "sae": {**BASE["sae"], **sae}}


def test_valid_config_expands_to_grid():
    cfg = validate_config(BASE)
    trials = expand_trials(cfg.sae, {HOOK: 32})
    assert [(t.architecture, t.d_sae) for t in trials] == [("standard", 128), ("topk", 128)]
    assert trials[0].l1_coefficient == 1.0 and trials[0].k is None
    assert trials[1].k == 8


@pytest.mark.parametrize("value", [None, [], [0.0], [1.0, 0.0]])
def test_l1_without_coefficient_or_zero_is_an_error(value):
    problems = problems_of(with_sae(architectures=["standard"], l1_coefficient=value))
    assert any(p.startswith("sae.l1_coefficient") and "standard" in p for p in problems), problems


@pytest.mark.parametrize("value", [None, []])
def test_topk_without_k_is_an_error(value):
    problems = problems_of(with_sae(architectures=["topk"], k=value))
    assert any(p.startswith("sae.k") and "topk" in p for p in problems), problems


def test_k_not_below_d_sae_is_an_error():
    raw = with_sae(architectures=["topk"], expansion_factor=None, d_sae=[64], k=[8, 64])
    problems = problems_of(raw)
    assert any("sae.k" in p and "64" in p and "d_sae" in p for p in problems), problems


def test_sae_extra_reaches_each_sae_and_is_checked():
    raw = with_sae(architectures=["jumprelu", "topk"], l0_coefficient=[1.0], k=[8],
                   extra={"jumprelu": {"bandwidth": 0.05, "auxk_coefficient": 1.0}, "topk": {"k_aux": 16}})
    cfg = validate_config(raw)
    trials = expand_trials(cfg.sae, {HOOK: 32})
    assert trial_problems(cfg, trials) == []
    jump, topk = trials[0].sae_config(cfg), trials[1].sae_config(cfg)
    assert jump.extra["bandwidth"] == 0.05 and jump.extra["auxk_coefficient"] == 1.0
    assert topk.extra["k_aux"] == 16 and "bandwidth" not in topk.extra

    # a knob for an architecture not swept, and a misspelt one: found with the config alone
    problems = problems_of(with_sae(architectures=["jumprelu"], l0_coefficient=[1.0],
                                    extra={"gated": {"bandwidth": 1}, "jumprelu": {"bandwith": 0.05}}))
    assert any(p.startswith("sae.extra: key 'gated'") for p in problems), problems
    assert any(p.startswith("sae.extra.jumprelu: key 'bandwith'") and "'bandwidth'" in p for p in problems), problems

    # a bad value: found once d_in is known (preflight, before Ray starts)
    bad = validate_config(with_sae(architectures=["jumprelu"], l0_coefficient=[1.0],
                                   extra={"jumprelu": {"bandwidth": -1.0}}))
    (problem,) = trial_problems(bad, expand_trials(bad.sae, {HOOK: 32}))
    assert problem.startswith("sae.extra.jumprelu: value {'bandwidth': -1.0}") and "bandwidth" in problem


def test_unknown_architecture_lists_valid_ones():
    problems = problems_of(with_sae(architectures=["relu6"]))
    assert any("relu6" in p and "topk" in p and "standard" in p for p in problems), problems


def test_every_problem_is_reported_at_once():
    raw = {
        "model": {"name": "m", "dtype": "float64"},
        "data": {"path": "x", "context_size": 0},
        "hooks": [{"layer": 1, "site": "resid_middle"}],
        "train": {"lr": -1},
        "sae": {"architectures": ["standard"], "expansion_factor": [4], "l1_coefficient": [0]},
        "bogus": {},
    }
    problems = problems_of(raw)
    text = "\n".join(problems)
    for path in ["model.dtype", "data.context_size", "hooks.0.site", "train.lr", "sae.l1_coefficient", "bogus"]:
        assert path in text, (path, text)
    # the bad value and what is accepted are named
    assert "'float64'" in text and "bfloat16" in text
    assert "resid_middle" in text and "resid_post" in text


def test_missing_sections_and_width_rules():
    problems = problems_of({"hooks": [{"layer": 0}], "sae": {"architectures": ["topk"], "k": [4]}})
    text = "\n".join(problems)
    assert "model" in text and "data" in text
    assert "expansion_factor" in text  # neither width given
    assert "hooks[0]" in text  # layer without site


def test_overrides_apply_and_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, ["train.lr=1e-4", "sae.k=[4, 16]", "hooks.0.layer=0"])
    assert cfg.train.lr == 1e-4 and cfg.sae.k == [4, 16] and cfg.hooks[0].layer == 0
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(path, ["train.batch_size=-3"])
    with pytest.raises(ConfigError, match="FIELD.PATH=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_validate_command_reports_problems_and_exit_code(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_sae(architectures=["standard"], l1_coefficient=[0])))
    out = subprocess.run([sys.executable, "-m", "sae_ray.cli", "validate", str(path), "--static"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "sae.l1_coefficient" in out.stderr


def test_shipped_configs_are_valid():
    quickstart = load_config(Path(__file__).parent.parent / "jobs" / "configs" / "quickstart.yaml")
    assert quickstart.sae.architectures == ["standard", "topk"]
    assert len(quickstart.sae.target_l0) == 2 and quickstart.sae.l1_coefficient is None and quickstart.sae.k is None
    pythia = load_config(Path(__file__).parent.parent / "jobs" / "configs" / "pythia-70m.yaml")
    assert pythia.sae.architectures == ["standard", "topk"]
    assert len(pythia.sae.l1_coefficient) == 2 and len(pythia.sae.k) == 2


def test_plan_packs_names_and_travels_as_plain_json():
    cfg = validate_config(with_sae(architectures=["topk", "standard"], k=[8, 16, 32], l1_coefficient=[1.0, 2.5]))
    trials = expand_trials(cfg.sae, {HOOK: 32, "blocks.2.hook_resid_post": 32}, {HOOK: 1, "blocks.2.hook_resid_post": 2})
    assert len(trials) == 2 * (3 + 2)
    stacks = pack_stacks(trials, max_stack=2)
    # one architecture, width and hook per stack, at most max_stack, every trial exactly once, grid order kept
    assert sorted((t for s in stacks for t in s.trials), key=trials.index) == trials
    for s in stacks:
        assert 1 <= len(s.trials) <= 2 and len({(t.architecture, t.d_sae, t.hook) for t in s.trials}) == 1
    first = stacks[0]
    assert first.name == f"topk-d128-k8,k16@{HOOK}" and first.trials[0].name == f"topk-d128-k8@{HOOK}"
    assert [s.name for s in stacks if s.trials[0].architecture == "standard"][0] == f"standard-d128-l1_1,l1_2.5@{HOOK}"
    # what Tune carries: plain JSON, rebuilt to the same plan
    import json

    assert [Stack.from_dict(json.loads(json.dumps(s.to_dict()))) for s in stacks] == stacks
    # the one SAEConfig builder: hook, layer, sparsity and provenance from the plan and the config
    sae_cfg = first.trials[1].sae_config(cfg)
    assert (sae_cfg.hook_name, sae_cfg.hook_layer, sae_cfg.k, sae_cfg.d_in, sae_cfg.d_sae) == (HOOK, 1, 16, 32, 128)
    assert sae_cfg.l1_coefficient is None and sae_cfg.model_name == cfg.model.name


def test_stack_rule_stacks_on_gpus_and_with_a_window_and_not_on_cpu():
    """sweep.plan.stack_limit: 8 with GPUs per trial, a bounded window or a search; 1 on CPU;
    an explicit sae.max_stack wherever trials run."""
    from sae_ray.sweep.plan import stack_limit

    cfg = validate_config(with_sae(architectures=["topk", "standard"], k=[8, 16, 32, 64], l1_coefficient=[1.0, 2.0,
                                                                                                        3.0, 4.0]))
    trials = expand_trials(cfg.sae, {HOOK: 32})
    assert cfg.sae.max_stack is None and cfg.resources.gpus_per_trial == 0 and len(trials) == 8
    assert stack_limit(cfg) == 1 and len(pack_stacks(trials, stack_limit(cfg))) == 8  # CPU: one SAE per trial
    gpu = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"gpus_per_trial": 0.25})})
    assert stack_limit(gpu) == 8 and len(pack_stacks(trials, stack_limit(gpu))) == 2  # one launch per stack
    window = cfg.model_copy(update={"buffer": cfg.buffer.model_copy(update={"max_gb": 1.0})})
    assert stack_limit(window) == 8  # every trial of a window must run at once: few of them
    for sweep in ({"search": "random"}, {"scheduler": "asha"}):  # drawn and ranked as stacks
        searched = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update=sweep)})
        assert stack_limit(searched) == 8
    for base in (cfg, gpu):  # the user's number holds everywhere
        assert stack_limit(base.model_copy(update={"sae": base.sae.model_copy(update={"max_stack": 3})})) == 3
