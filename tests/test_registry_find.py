"""The registry you can query (`sae-ray registry find / compare`, `sae_ray.find_saes`) and the
aliases each sweep sets, against a real sqlite MLflow store. Versions are registered with the
repo's own `register_sae`, tagged as a trial tags them; one carries a real SAE artifact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import sae_ray
from sae_ray import tracking
from sae_ray.cli import main
from sae_ray.formats import save_saelens
from sae_ray.sae import ARCHITECTURES, SAEConfig, create_sae
from sae_ray.sweep.plan import Trial
from sae_ray.tracking.registry import BEST_FVU, QueryError, find_saes, refresh_model
from sae_ray.tracking.report import log_summary

MODEL = "EleutherAI/pythia-70m"
L1, L3 = "blocks.1.hook_resid_post", "blocks.3.hook_resid_post"
D_IN = 8


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An sqlite file with MLflow's tables and nothing else: creating them takes seconds, copying it none."""
    path = tmp_path_factory.mktemp("empty-db") / "mlflow.db"
    tracking.client_for(f"sqlite:///{path}").search_experiments()  # creates the schema
    return path


def new_store(empty_db, path) -> tuple[str, str]:
    """(tracking URI, experiment id) of a fresh sqlite store in `path`, with its artifacts under `path`."""
    shutil.copy(empty_db, path / "mlflow.db")
    uri = f"sqlite:///{path / 'mlflow.db'}"
    return uri, tracking.ensure_experiment(uri, "registry-find", str(path / "artifacts"))


@pytest.fixture
def store(empty_db, tmp_path):
    return new_store(empty_db, tmp_path)


def register(store, tmp_path, *, architecture="topk", d_sae=32, hook=L3, target_l0=None, k=None, l0, fvu,
             verdict="ok", model=MODEL, artifact=False, **extra) -> int:
    """Register one SAE the way `sweep.trainable` does (Trial tags + figures + quality); with
    `artifact`, a real saved SAE of that shape goes into its run. Returns the version."""
    uri, experiment_id = store
    client = tracking.client_for(uri)
    param = ARCHITECTURES[architecture].sparsity_param
    sparsity = k if k is not None else (target_l0 or 4) if param == "k" else 0.1
    trial = Trial(architecture, d_sae, d_sae / D_IN, param, sparsity, hook, int(hook.split(".")[1]), D_IN, target_l0)
    run_id = tracking.start_run(uri, experiment_id, trial.name)
    if artifact:
        sae = create_sae(SAEConfig(architecture, D_IN, d_sae, **{param: sparsity}, model_name=model, hook_name=hook))
        out = tmp_path / f"sae-{run_id}"
        save_saelens(sae, out)
        client.log_artifacts(run_id, str(out), tracking.SAE_ARTIFACT_PATH)
    tags = {**trial.tags(), "l0": l0, "fvu": fvu, "dead_fraction": 0.01, "tokens_seen": 4096, "eval_split": "held-out",
            "eval_rows": 256, "run_id": run_id, "verdict": verdict, "reasons": "" if verdict == "ok" else "dense", **extra}
    return int(tracking.register_sae(client, tracking.registry_name(model, hook), run_id, tags))


@pytest.fixture
def registry(store, tmp_path):
    """Six SAEs on two hooks of one model, and one on another model."""
    r = lambda **kw: register(store, tmp_path, **kw)  # noqa: E731
    versions = {
        "topk8": r(d_sae=32, target_l0=8, l0=8.0, fvu=0.30, artifact=True),
        "topk16": r(d_sae=32, target_l0=16, l0=16.0, fvu=0.20),
        "topk64": r(d_sae=64, target_l0=64, l0=64.0, fvu=0.08),
        "jump": r(architecture="jumprelu", d_sae=64, target_l0=64, l0=71.5, fvu=0.05, verdict="warn"),
        "jump_free": r(architecture="jumprelu", d_sae=64, l0=120.0, fvu=0.04, tokens_seen=8192),
        "layer1": r(hook=L1, d_sae=32, target_l0=8, l0=8.0, fvu=0.10),
        "other": r(model="gpt2", d_sae=32, target_l0=8, l0=8.0, fvu=0.5),
    }
    return store[0], versions


def aliases(registered) -> dict[str, int]:
    """{alias: version} of a RegisteredModel (MLflow hands versions out as str or int)."""
    return {a: int(v) for a, v in (registered.aliases or {}).items()}


@pytest.fixture(scope="module")
def small_registry(empty_db, tmp_path_factory):
    """Two SAEs, for the tests that only read (one store for all of them)."""
    path = tmp_path_factory.mktemp("small-registry")
    store = new_store(empty_db, path)
    for fvu in (0.2, 0.1):
        register(store, path, target_l0=8, l0=8.0, fvu=fvu)
    return store[0]


def uris(rows):
    return [r["uri"] for r in rows]


def test_find_filters(registry):
    uri, v = registry
    name3 = tracking.registry_name(MODEL, L3)
    everything = find_saes(uri)
    assert len(everything) == 7
    row = next(r for r in everything if r["uri"] == f"models:/{name3}/{v['topk16']}")
    assert {k: row[k] for k in ("name", "model", "hook", "layer", "architecture", "d_sae", "d_in", "target_l0", "l0",
                                "fvu", "verdict")} == {
        "name": name3, "model": tracking.model_key(MODEL), "hook": L3, "layer": 3, "architecture": "topk", "d_sae": 32, "d_in": D_IN,
        "target_l0": 16, "l0": 16.0, "fvu": 0.2, "verdict": "ok"}
    assert row["version"] == int(v["topk16"]) and row["tags"]["eval_split"] == "held-out" and row["tags"]["k"] == "16"
    # the model as the run config named it, once a sweep's end (refresh_model) has tagged the registered model
    refresh_model(tracking.client_for(uri), name3, model=MODEL)
    assert {r["model"] for r in find_saes(uri, hook=L3, model=MODEL)} == {MODEL}

    assert len(find_saes(uri, model=MODEL)) == 6
    assert len(find_saes(uri, model="/some/checkout/gpt2/")) == 1  # a local path: its folder name
    assert {r["hook"] for r in find_saes(uri, layer=1)} == {L1}
    assert len(find_saes(uri, hook=L3, model=MODEL)) == 5
    assert {r["architecture"] for r in find_saes(uri, architecture="jumprelu")} == {"jumprelu"}
    assert len(find_saes(uri, d_sae=64)) == len(find_saes(uri, d_sae="64")) == 3
    assert {r["l0"] for r in find_saes(uri, max_l0=16)} == {8.0, 16.0}
    assert {r["l0"] for r in find_saes(uri, min_l0="64", max_l0=100)} == {64.0, 71.5}
    assert len(find_saes(uri, target_l0=64)) == 2
    assert uris(find_saes(uri, verdict="warn")) == [f"models:/{name3}/{v['jump']}"]
    # tags compare as numbers when both are: "8.0" is the tag "8"; text tags as text
    assert len(find_saes(uri, tags={"d_in": "8.0", "eval_split": "held-out"})) == 7
    assert len(find_saes(uri, tags={"tokens_seen": 8192})) == 1
    assert find_saes(uri, tags={"eval_split": "train"}) == []
    assert len(find_saes(uri, layer=3, architecture="topk", verdict="ok", tags={"k": 8})) == 2  # and gpt2's
    assert len(find_saes(uri, model=MODEL, layer=3, architecture="topk", verdict="ok", tags={"k": 8})) == 1


def test_find_sort_desc_limit(registry):
    uri, v = registry
    by_fvu = find_saes(uri, model=MODEL, sort="fvu")
    assert [r["fvu"] for r in by_fvu] == sorted(r["fvu"] for r in by_fvu)
    assert [r["fvu"] for r in find_saes(uri, model=MODEL, sort="fvu", desc=True)] == [0.3, 0.2, 0.1, 0.08, 0.05, 0.04]
    best = find_saes(uri, layer=3, max_l0=64, sort="fvu", limit=2)
    assert [r["fvu"] for r in best] == [0.08, 0.2]
    # a tag no row lacks sorts as a number; rows without the key (the jumprelu ones have no k) go last
    by_k = find_saes(uri, model=MODEL, hook=L3, sort="k", desc=True)
    assert [r["tags"].get("k") for r in by_k] == ["64", "16", "8", None, None]
    assert [r["target_l0"] for r in find_saes(uri, model=MODEL, hook=L3, sort="target_l0")] == [8, 16, 64, 64, None]
    assert len(find_saes(uri, limit=3)) == 3


def test_find_row_loads_with_load_sae(registry):
    uri, v = registry
    (row,) = find_saes(uri, model=MODEL, layer=3, target_l0=8)
    sae = sae_ray.load_sae(row["uri"], tracking_uri=uri)
    assert sae.cfg.d_sae == row["d_sae"] == 32 and sae.cfg.hook_name == row["hook"]
    assert sae(torch.randn(3, D_IN)).x_hat.shape == (3, D_IN)


def test_cli_find_table_and_json(registry, capsys):
    uri, v = registry
    capsys.readouterr()
    assert main(["registry", "find", "--layer", "3", "--max-l0", "64", "--sort", "fvu", "--limit", "2",
                 "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["uri", "architecture", "d_sae", "target_l0", "l0", "fvu", "dead_fraction", "verdict",
                                "aliases"]
    assert len(lines) == 4 and "0.08" in lines[2] and "0.2" in lines[3]

    assert main(["registry", "find", "--architecture", "jumprelu", "--tag", "verdict=ok", "--sort", "tokens_seen",
                 "--json", "--tracking-uri", uri]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    name3 = tracking.registry_name(MODEL, L3)
    assert row["uri"] == f"models:/{name3}/{v['jump_free']}" and row["tags"]["tokens_seen"] == "8192"
    assert set(row) >= {"name", "version", "uri", "model", "hook", "layer", "architecture", "d_sae", "l0", "fvu",
                        "target_l0", "verdict", "aliases", "tags"}
    assert main(["registry", "find", "--d-sae", "4096", "--tracking-uri", uri]) == 0
    assert "no registered SAE matches" in capsys.readouterr().out
    assert main(["registry", "find", "--d-sae", "4096", "--json", "--tracking-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_compare(registry, capsys):
    uri, v = registry
    name3 = tracking.registry_name(MODEL, L3)
    refresh_model(tracking.client_for(uri), name3, model=MODEL)
    capsys.readouterr()
    refs = [f"models:/{name3}/{v['topk8']}", f"{name3}/{v['topk64']}", f"{name3}@{BEST_FVU}"]
    assert main(["registry", "compare", *refs, "--json", "--tracking-uri", uri]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == [int(v["topk8"]), int(v["topk64"]), int(v["jump_free"])]
    assert [r["fvu"] for r in rows] == [0.3, 0.08, 0.04] and rows[2]["aliases"] == [BEST_FVU]

    assert main(["registry", "compare", *refs, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == name3
    assert out[1].split() == [f"v{v['topk8']}", f"v{v['topk64']}", f"v{v['jump_free']}"]
    table = {line.split()[0]: line.split()[1:] for line in out[3:]}
    assert table["fvu"] == ["0.3", "0.08", "0.04"] and table["architecture"] == ["topk", "topk", "jumprelu"]
    assert table["l0"] == ["8", "64", "120"] and table["k"] == ["8", "64", "-"]

    # two registered models: each column says which
    name1 = tracking.registry_name(MODEL, L1)
    assert main(["registry", "compare", f"{name1}/{v['layer1']}", f"{name3}/{v['topk8']}", "--tracking-uri", uri]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == [f"{name1}/{v['layer1']}", f"{name3}/{v['topk8']}"]


def sweep_end(client, uri, model=MODEL, hook=L3):
    """What a sweep's end does for the registry: log_summary over its rows (the hook's versions)."""
    experiment_id = tracking.ensure_experiment(uri, "registry-find", None)
    parent = tracking.start_run(uri, experiment_id, "sweep")
    name = tracking.registry_name(model, hook)
    rows = [{"hook": hook, "version": mv.version, "l0": float(mv.tags["l0"]), "fvu": float(mv.tags["fvu"]),
             "architecture": mv.tags["architecture"], "target_l0": None}
            for mv in client.search_model_versions(f"name = '{name}'")]
    log_summary(client, parent, rows, [], model, register_models=True)
    return tracking.retry(lambda: client.get_registered_model(name))


def test_sweep_aliases_pick_ok_versions_and_move_when_a_better_one_arrives(store, tmp_path):
    uri, _ = store
    client = tracking.client_for(uri)
    r = lambda **kw: register(store, tmp_path, **kw)  # noqa: E731
    # sweep 1: the lowest FVU of all (and of target 8) is a warn version: it gets no alias
    v1 = r(target_l0=8, l0=8.0, fvu=0.30)
    r(target_l0=8, l0=9.5, fvu=0.10, verdict="warn")
    v3 = r(target_l0=16, l0=16.0, fvu=0.20)
    model = sweep_end(client, uri)
    assert aliases(model) == {BEST_FVU: v3, "l0-8-best": v1, "l0-16-best": v3}

    # sweep 2 into the same registered model: a better target-8 SAE moves two aliases; a worse
    # target-16 one moves none
    v4 = r(target_l0=8, l0=8.0, fvu=0.05)
    r(target_l0=16, l0=16.0, fvu=0.50)
    r(target_l0=32, l0=33.0, fvu=0.01, verdict="warn")  # a new target with no ok version: no alias
    model = sweep_end(client, uri)
    assert aliases(model) == {BEST_FVU: v4, "l0-8-best": v4, "l0-16-best": v3}
    assert sae_ray.find_saes(uri, sort="fvu")[1]["aliases"] == [BEST_FVU, "l0-8-best"]

    # the description and tags say what the model's versions are
    assert MODEL in model.description and L3 in model.description and f"d_in {D_IN}" in model.description
    assert "6 versions" in model.description and "target L0 8, 16, 32" in model.description
    assert model.tags == {"model": MODEL, "hook": L3, "d_in": str(D_IN)}


def test_alias_never_stays_on_a_non_ok_version(store, tmp_path):
    uri, _ = store
    client = tracking.client_for(uri)
    v1 = register(store, tmp_path, target_l0=8, l0=8.0, fvu=0.2, verdict="warn")
    name = tracking.registry_name(MODEL, L3)
    # as the sweeps before this one set it: best-fvu on the lowest FVU, whatever its verdict
    client.set_registered_model_alias(name, BEST_FVU, str(v1))
    client.set_registered_model_alias(name, "champion", str(v1))  # a user's own alias is left alone
    model = sweep_end(client, uri)
    assert aliases(model) == {"champion": v1}
    v2 = register(store, tmp_path, target_l0=8, l0=8.0, fvu=0.4)
    assert refresh_model(client, name) == {BEST_FVU: v2, "l0-8-best": v2}
    assert aliases(client.get_registered_model(name)) == {
        "champion": v1, BEST_FVU: v2, "l0-8-best": v2}


def test_a_new_registered_model_has_a_description(store, tmp_path):
    uri, _ = store
    register(store, tmp_path, hook=L1, l0=4.0, fvu=0.3)
    model = tracking.client_for(uri).get_registered_model(tracking.registry_name(MODEL, L1))
    assert L1 in model.description and f"d_in {D_IN}" in model.description and "best-fvu" in model.description
    assert model.tags["hook"] == L1 and model.tags["d_in"] == str(D_IN)


def test_registry_list_shows_every_alias(registry, capsys):
    uri, v = registry
    name1 = tracking.registry_name(MODEL, L1)
    refresh_model(tracking.client_for(uri), name1, model=MODEL)
    capsys.readouterr()
    assert main(["registry", "list", "--tracking-uri", uri]) == 0
    assert f"v{v['layer1']} @best-fvu @l0-8-best " in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag, value, accepted", [
    (["find", "--max-l0", "abc"], "--max-l0", "abc", "expected a number"),
    (["find", "--min-l0", "nan"], "--min-l0", "nan", "expected a number"),
    (["find", "--d-sae", "3.5"], "--d-sae", "3.5", "expected an integer"),
    (["find", "--layer", "three"], "--layer", "three", "expected an integer"),
    (["find", "--limit", "0"], "--limit", "0", "expected an integer >= 1"),
    (["find", "--target-l0", "x"], "--target-l0", "x", "expected a number"),
    (["find", "--verdict", "great"], "--verdict", "great", "expected one of ok, warn, stopped"),
    (["find", "--tag", "novalue"], "--tag", "novalue", "expected KEY=VALUE"),
    (["find", "--sort", "fvuu"], "--sort", "fvuu", "expected a field or tag of the matching SAEs: "),
    (["compare", "nope/1"], "REF", "nope/1", "not in the registry"),
    (["compare", "X@best-fvu"], "REF", "X@best-fvu", "expected NAME/VERSION, NAME@ALIAS or models:/NAME/VERSION"),
    (["show", "nope@best-fvu"], "REF", "nope@best-fvu", "not in the registry"),
])
def test_bad_values_are_one_line_naming_the_flag(small_registry, capsys, argv, flag, value, accepted):
    uri = small_registry
    capsys.readouterr()
    assert main(["registry", *argv, "--tracking-uri", uri]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith(f"error: {flag}: value {value!r}: ") and accepted in line, line
    assert captured.out == ""


def test_bad_sort_key_lists_what_is_accepted(small_registry):
    uri = small_registry
    with pytest.raises(QueryError, match=r"sort: value 'fvuu': expected a field or tag .*fvu.*tokens_seen"):
        find_saes(uri, sort="fvuu")
    with pytest.raises(QueryError, match="max_l0: value 'abc'"):
        find_saes(uri, max_l0="abc")
