"""The front door: no config can crash, hang or slip through.

Each case names the problem's field path (or the file position) and shows the bad value;
a few go through the real `sae-ray validate` in a subprocess: exit code 2, one message on
stderr, no traceback, in a few seconds. World checks (resources, the tracking store) are
tested against a dict of resources and a real HTTP server on 127.0.0.1, never mocks.
"""

import copy
import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import yaml

from sae_ray.config import ConfigError, apply_overrides, load_config, validate_config
from sae_ray.preflight import available_resources, resource_problems, tracking_problems
from sae_ray.config.yamlload import MAX_DEPTH, YAMLLoadError, load_yaml

BASE = {
    "model": {"name": "some/model"},
    "data": {"path": "docs.jsonl"},
    "hooks": [{"layer": 1, "site": "resid_post"}],
    "sae": {"architectures": ["standard", "topk"], "expansion_factor": [4], "l1_coefficient": [1.0], "k": [8]},
}


def with_(section, **fields):
    raw = copy.deepcopy(BASE)
    if isinstance(raw.get(section), dict) or section not in raw:
        raw[section] = {**raw.get(section, {}), **fields}
    return raw


def problem(raw, path: str) -> str:
    """The one problem validate_config reports for `path` (asserting there is one)."""
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    found = [p for p in e.value.problems if p.startswith(path + ":") or p.startswith(path + " ")]
    assert found, (path, e.value.problems)
    return found[0]


def load_problems(tmp_path, text: str | bytes, overrides=None, name="c.yaml") -> list[str]:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return e.value.problems


def alias_bomb(levels: int = 9) -> str:
    lines = ["a: &a [" + ", ".join(['"x"'] * 9) + "]"]
    names = "abcdefghijklmnop"
    for i in range(1, levels):
        lines.append(f"{names[i]}: &{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# numbers: NaN, inf, booleans, huge integers
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, path, shown", [
    (with_("sae", l1_coefficient=[1.0, float("nan")]), "sae.l1_coefficient.1", "nan"),
    (with_("sae", architectures=["jumprelu"], l0_coefficient=[float("inf")]), "sae.l0_coefficient.0", "inf"),
    (with_("train", lr=float("nan")), "train.lr", "nan"),
    (with_("train", lr=float("-inf")), "train.lr", "-inf"),
    (with_("train", grad_clip_norm=float("inf")), "train.grad_clip_norm", "inf"),
    (with_("buffer", max_gb=float("inf")), "buffer.max_gb", "inf"),
    (with_("producers", num_cpus=float("nan")), "producers.num_cpus", "nan"),
    (with_("train", adam_betas=[float("nan"), 0.9]), "train.adam_betas.0", "nan"),
])
def test_nan_and_inf_are_refused_in_every_float_field(raw, path, shown):
    p = problem(raw, path)
    assert f"value {shown}" in p and "finite" in p, p


def test_nan_in_an_architecture_knob_is_refused():
    p = problem(with_("sae", extra={"topk": {"k_aux": float("nan")}}), "sae.extra.topk.k_aux")
    assert "nan" in p and "finite" in p


@pytest.mark.parametrize("raw, path", [
    (with_("producers", count=True), "producers.count"),
    (with_("train", lr=False), "train.lr"),
    (with_("sae", k=[True]), "sae.k"),
    ({**BASE, "hooks": [{"layer": True, "site": "resid_post"}]}, "hooks.0.layer"),
])
def test_booleans_are_not_numbers(raw, path):
    p = problem(raw, path)
    assert "boolean" in p and ("True" in p or "False" in p), p


def test_huge_integers_are_refused(tmp_path):
    p = problem(with_("buffer", n_tokens=10**30), "buffer.n_tokens")
    assert str(10**30) in p and "too large" in p
    # more digits than Python converts: refused while reading, with the field path
    (p,) = load_problems(tmp_path, yaml.safe_dump(BASE) + "buffer: {n_tokens: " + "9" * 5000 + "}\n")
    assert p.startswith("buffer.n_tokens: value 9999") and "5,000 digits" in p and "line" in p


def test_exponent_floats_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as a string; the loader reads it as YAML 1.2 does."""
    assert load_yaml("a: 1e-4\nb: 2E5\nc: -1.5e+3\nd: 1e\ne: 0x1F") == {"a": 1e-4, "b": 2e5, "c": -1500.0, "d": "1e", "e": 31}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE) + "buffer: {n_tokens: 1e6}\n")
    cfg = load_config(path, ["train.lr=1e-4", "sae.extra={topk: {k_aux: 1e2}}"])
    assert cfg.buffer.n_tokens == 1_000_000 and cfg.train.lr == 1e-4 and cfg.sae.extra["topk"]["k_aux"] == 100.0


# ---------------------------------------------------------------------------------------
# ranges
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("betas, path, shown", [
    ([0.9, 1.0], "train.adam_betas.1", "1.0"),
    ([-0.1, 0.999], "train.adam_betas.0", "-0.1"),
    ([1.5, 0.999], "train.adam_betas.0", "1.5"),
])
def test_adam_betas_outside_0_1_are_refused(betas, path, shown):
    p = problem(with_("train", adam_betas=betas), path)
    assert f"value {shown}" in p and "[0, 1)" in p, p


def test_adam_betas_in_range_are_accepted():
    assert validate_config(with_("train", adam_betas=[0.0, 0.999])).train.adam_betas == (0.0, 0.999)


@pytest.mark.parametrize("raw, path, shown, accepted", [
    (with_("producers", count=0), "producers.count", "0", "greater than 0"),
    (with_("producers", count=-2), "producers.count", "-2", "greater than 0"),
    (with_("train", seed=-1), "train.seed", "-1", "greater than or equal to 0"),
    (with_("producers", num_gpus=1.5), "producers.num_gpus", "1.5", "whole GPUs"),
    (with_("resources", gpus_per_trial=2.5), "resources.gpus_per_trial", "2.5", "whole GPUs"),
    (with_("resources", cpus_per_trial=0.00001), "resources.cpus_per_trial", "1e-05", "0.0001"),
    ({**BASE, "name": ""}, "name", "''", "at least 1 character"),
    (with_("tracking", experiment=""), "tracking.experiment", "''", "at least 1 character"),
])
def test_out_of_range_values_are_refused(raw, path, shown, accepted):
    p = problem(raw, path)
    assert f"value {shown}" in p and accepted in p, p


# ---------------------------------------------------------------------------------------
# choices
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("section", ["model", "train"])
def test_unknown_device_is_refused_with_the_accepted_ones(section):
    p = problem(with_(section, device="tpu"), f"{section}.device")
    assert "'tpu'" in p and "'auto'" in p and "'cpu'" in p and "'cuda'" in p and "cuda:N" in p


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_known_devices_are_accepted(device):
    assert validate_config(with_("model", device=device)).model.device == device


def test_cuda_index_beyond_the_gpus_ray_gives_is_refused():
    raw = {**with_("model", device="cuda:1"), "producers": {"num_gpus": 1}}
    p = problem(raw, "model.device")
    assert "'cuda:1'" in p and "producers.num_gpus" in p and "cuda:0" in p


@pytest.mark.parametrize("uri, says", [
    ("ftp://host/x", "unknown scheme 'ftp'"),
    ("s3://bucket/mlflow", "unknown scheme 's3'"),
    ("file:///tmp/mlruns", "MLflow 3"),
    ("./mlruns", "MLflow 3"),
    ("/abs/mlruns", "MLflow 3"),
    ("sqlite://", "sqlite:///"),
    ("http://", "needs a host"),
    ("", "empty"),
])
def test_tracking_uri_with_an_unusable_form_is_refused(uri, says):
    p = problem(with_("tracking", uri=uri), "tracking.uri")
    assert repr(uri) in p and says in p, p
    assert "sqlite:///" in p or "http" in p  # what is accepted


@pytest.mark.parametrize("uri", ["sqlite:///runs/mlflow.db", "sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000",
                                 "https://mlflow.example.org/prefix", "postgresql://u:p@db:5432/mlflow",
                                 "postgresql+psycopg2://u@db/mlflow", "mysql+pymysql://u@db/mlflow", "databricks"])
def test_tracking_uri_accepted_forms(uri):
    assert validate_config(with_("tracking", uri=uri)).tracking.uri == uri


@pytest.mark.parametrize("field, values, twice", [
    ("architectures", ["topk", "standard", "topk"], "'topk'"),
    ("k", [8, 16, 8], "8"),
    ("l1_coefficient", [1.0, 1.0], "1.0"),
])
def test_duplicates_in_the_grid_are_refused(field, values, twice):
    p = problem(with_("sae", **{field: values}), f"sae.{field}")
    assert str(values) in p and f"lists {twice}" in p


def test_the_same_hook_twice_is_refused():
    raw = {**BASE, "hooks": [{"layer": 1, "site": "resid_post"}, {"layer": 1, "site": "resid_post"}]}
    p = problem(raw, "hooks[1]")
    assert "resid_post" in p and "hooks[0]" in p


# ---------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------

def test_empty_hooks_is_a_problem_not_a_crash():
    p = problem({**BASE, "hooks": []}, "hooks")
    assert "value []" in p and "at least 1" in p and "layer" in p


@pytest.mark.parametrize("raw, path, shown", [
    ({**BASE, "hooks": [3]}, "hooks.0", "3"),
    ({**BASE, "hooks": {"layer": 1}}, "hooks", "{'layer': 1}"),
    ({**BASE, "train": 3}, "train", "3"),
    ({**BASE, "sae": ["topk"]}, "sae", "['topk']"),
])
def test_sections_of_the_wrong_shape(raw, path, shown):
    p = problem(raw, path)
    assert f"value {shown}" in p, p


def test_unknown_names_suggest_the_right_one():
    p = problem({**BASE, "trian": {}}, "trian")
    assert "did you mean 'train'" in p and "'resources'" in p
    p = problem(with_("train", lrr=1e-3), "train.lrr")
    assert "did you mean 'lr'" in p and "'batch_size'" in p and "value 0.001" in p


@pytest.mark.parametrize("raw, shown", [([1, 2], "[1, 2]"), ("hello", "'hello'"), (None, "None")])
def test_a_top_level_that_is_not_a_mapping(raw, shown):
    p = problem(raw, "top level")
    assert f"value {shown}" in p and "model, data and hooks" in p


def test_a_huge_value_is_shown_short():
    p = problem(list(range(100_000)), "top level")
    assert len(p) < 400 and "[0, 1, 2" in p


# ---------------------------------------------------------------------------------------
# YAML syntax and safety
# ---------------------------------------------------------------------------------------

def test_duplicate_keys_are_refused_with_key_and_line(tmp_path):
    text = "model: {name: m}\ndata: {path: d}\nhooks: [{layer: 1, site: resid_post}]\ntrain:\n  lr: 0.001\n  batch_size: 8\n  lr: 0.1\n"
    (p,) = load_problems(tmp_path, text)
    assert p.startswith("train.lr: duplicate key 'lr' at line 7") and "first at line 5" in p
    (p,) = load_problems(tmp_path, "model: {name: a}\ndata: {path: d}\nmodel: {name: b}\n")
    assert p.startswith("model: duplicate key 'model' at line 3") and "first at line 1" in p
    (p,) = load_problems(tmp_path, "model: {name: a, 'name': b}\n")
    assert p.startswith("model.name: duplicate key")


def test_merge_keys_that_override_are_not_duplicates():
    assert load_yaml("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n")["c"] == {"x": 3, "y": 2}


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    (p,) = load_problems(tmp_path, alias_bomb())
    assert "alias *" in p and "100,000 nodes" in p and "line" in p  # stopped at the node bound, while composing
    # a few ordinary aliases are fine
    assert load_yaml("a: &x [1, 2]\nb: *x\nc: *x\n") == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}


def test_a_recursive_alias_is_refused():
    with pytest.raises(YAMLLoadError, match="recursive"):
        load_yaml("a: &a [1, *a]\n")


@pytest.mark.parametrize("text", ["model: " + "[" * 5000 + "]" * 5000 + "\n",
                                  "model: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
                                  "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v\n"])
def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path, text):
    (p,) = load_problems(tmp_path, text)
    assert f"nested deeper than {MAX_DEPTH} levels" in p and p.startswith("line "), p


def test_not_utf8_names_the_byte_offset(tmp_path):
    (p,) = load_problems(tmp_path, "model:\n  name: 'caf\u00e9'\n".encode("latin-1"))
    assert "not UTF-8" in p and "0xe9" in p and "offset 19" in p and "line 2" in p  # len(b"model:\n  name: 'caf") == 19
    (p,) = load_problems(tmp_path, "model: {name: m}\n".encode("utf-16"))
    assert "offset 0" in p and "UTF-16" in p


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(BASE).encode())
    assert load_config(path).model.name == "some/model"


@pytest.mark.parametrize("text, says", [
    ("model:\n\tname: m\n", "tabs"),
    ("model: [1, 2\n", "line 2"),
    ("model: {name: m}\n---\nmodel: {name: n}\n", "another document"),
    ("model: !!python/object/apply:os.system ['true']\n", "!!python"),
    ("model: *nowhere\n", "undefined alias"),
    ("model: {name: \"m\x01\"}\n", "control character #x0001"),
])
def test_broken_yaml_is_one_line_with_a_position(tmp_path, text, says):
    (p,) = load_problems(tmp_path, text)
    assert says in p and "\n" not in p, p


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_file(tmp_path, text):
    (p,) = load_problems(tmp_path, text)
    assert "empty" in p and "model, data and hooks" in p


def test_files_that_are_not_configs(tmp_path):
    (tmp_path / "adir.yaml").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path / "adir.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (p,) = load_problems(tmp_path, b"# " + b"x" * (2 << 20) + b"\n", name="big.yaml")
    assert "larger than 1 MiB" in p


# ---------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("item, says", [
    ("hooks.5.layer=1", "hooks is a list of 1 item(s) (indices 0..0); '5' is not one of its indices"),
    ("hooks.x.layer=1", "hooks is a list of 1 item(s) (indices 0..0); 'x' is not one of its indices"),
    ("hooks.-1.layer=1", "'-1' is not one of its indices"),
    ("train.lr.x=1", "train.lr is a value (a number), not a section or a list; it has no 'x'"),
    ("model.name.x=1", "model.name is a value ('some/model'), not a section or a list; it has no 'x'"),
    ("sae.k.0.x=1", "sae.k.0 is a value (8), not a section or a list; it has no 'x'"),
    ("train.adam_betas.0=0.5", "train.adam_betas is not in the config"),
    ("train.lr=[1,", "is not valid YAML: line 1"),
    ("train={lr: 1, lr: 2}", "duplicate key 'lr'"),
    ("=3", "not a field path"),
    ("train..lr=3", "not a field path"),
    ("train.lr", "expected FIELD.PATH=VALUE"),
])
def test_bad_overrides_name_the_item_and_what_is_there(item, says):
    with pytest.raises(ConfigError) as e:
        apply_overrides(BASE, [item])
    (p,) = e.value.problems
    assert p.startswith(f"--set {item!r}: ") and says in p, p


def test_overrides_are_validated_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    for item, where, shown in [("train.lr=nan", "train.lr", "'nan'"), ("train.lr=.inf", "train.lr", "inf"),
                               ("producers.count=0", "producers.count", "0"), ("model.device=tpu", "model.device", "'tpu'")]:
        with pytest.raises(ConfigError) as e:
            load_config(path, [item])
        assert any(p.startswith(f"{where}: value {shown}") for p in e.value.problems), e.value.problems
    cfg = load_config(path, ["hooks.0.layer=2", "sae.extra={topk: {k_aux: 16}}", "train.adam_betas=[0, 0.99]"])
    assert cfg.hooks[0].layer == 2 and cfg.sae.extra == {"topk": {"k_aux": 16}} and cfg.train.adam_betas == (0.0, 0.99)


# ---------------------------------------------------------------------------------------
# resources (preflight: what Ray could never schedule)
# ---------------------------------------------------------------------------------------

MACHINE = {"CPU": 2, "GPU": 0, "where": "this machine"}
CLUSTER = {"CPU": 16, "GPU": 2, "nodes": [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}], "where": "the Ray cluster"}


def cfg_with(**sections):
    raw = copy.deepcopy(BASE)
    for key, fields in sections.items():
        raw[key] = {**raw.get(key, {}), **fields}
    return validate_config(raw)


def test_what_fits_is_accepted():
    assert resource_problems(cfg_with(), MACHINE) == []
    # the trial only has to fit alone: the producers release their share when they are done
    assert resource_problems(cfg_with(producers={"count": 2}, resources={"cpus_per_trial": 2}), MACHINE) == []
    assert resource_problems(cfg_with(producers={"count": 2, "num_gpus": 1}, resources={"gpus_per_trial": 1}), CLUSTER) == []


@pytest.mark.parametrize("sections, available, path, says", [
    ({"producers": {"num_cpus": 4}}, MACHINE, "producers", "num_cpus=4"),
    ({"producers": {"num_gpus": 1}}, MACHINE, "producers", "num_gpus=1"),
    ({"producers": {"count": 3}}, MACHINE, "producers.count", "value 3"),
    ({"producers": {"count": 3, "num_gpus": 1}}, CLUSTER, "producers.count", "3 GPUs"),
    ({"resources": {"cpus_per_trial": 3}}, MACHINE, "resources", "cpus_per_trial=3"),
    ({"resources": {"cpus_per_trial": 10}}, CLUSTER, "resources", "cpus_per_trial=10"),  # 16 in all, 8 per node
    ({"resources": {"gpus_per_trial": 2}}, CLUSTER, "resources", "gpus_per_trial=2"),
    ({"model": {"device": "cuda"}}, MACHINE, "model.device", "'cuda'"),
    ({"train": {"device": "cuda:0"}}, MACHINE, "train.device", "'cuda:0'"),
])
def test_what_never_fits_is_refused_saying_what_there_is(sections, available, path, says):
    problems = resource_problems(cfg_with(**sections), available)
    (p,) = [p for p in problems if p.startswith(path + ":")]
    assert says in p, p
    assert f"{available['where']} has {available['CPU']:g} CPUs" in p, p
    if "nodes" in available:
        assert "at most 8 CPUs and 1 GPU on one" in p


def test_available_resources_of_this_machine(monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    here = available_resources()
    assert here["CPU"] == os.cpu_count() and here["GPU"] == torch.cuda.device_count() and here["where"] == "this machine"
    # a cluster this process has not joined yet is unknown, so nothing is checked against the driver's machine
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert available_resources() is None
    assert resource_problems(cfg_with(producers={"num_cpus": 10_000})) == []
    monkeypatch.delenv("RAY_ADDRESS")
    assert resource_problems(cfg_with(producers={"num_cpus": 10_000}), address="ray://head:10001") == []
    assert resource_problems(cfg_with(producers={"num_cpus": 10_000})) != []


# ---------------------------------------------------------------------------------------
# tracking (preflight: does the store answer?)
# ---------------------------------------------------------------------------------------

class _MLflowLike(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path.startswith("/api/2.0/mlflow/experiments/search")
        body = json.dumps({"experiments": []} if ok else {"error_code": "ENDPOINT_NOT_FOUND"}).encode()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MLflowLike)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_server_that_answers(http_server):
    assert tracking_problems(cfg_with(tracking={"uri": http_server})) == []
    (p,) = tracking_problems(cfg_with(tracking={"uri": http_server + "/not-mlflow"}))
    assert p.startswith(f"tracking.uri: value {http_server + '/not-mlflow'!r}") and "404" in p


def test_nothing_listening_is_found_at_once():
    uri = f"http://127.0.0.1:{_free_port()}"
    (p,) = tracking_problems(cfg_with(tracking={"uri": uri}))
    assert p.startswith(f"tracking.uri: value {uri!r}") and "connection refused" in p
    uri = f"postgresql://user@127.0.0.1:{_free_port()}/mlflow"
    (p,) = tracking_problems(cfg_with(tracking={"uri": uri}))
    assert p.startswith(f"tracking.uri: value {uri!r}") and "connection refused" in p


def test_a_server_that_never_answers_times_out():
    with socket.socket() as s:  # accepts connections (the kernel's backlog) but never says a word
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        (p,) = tracking_problems(cfg_with(tracking={"uri": uri}), timeout=1.0)
    assert "no answer within 1 s" in p  # the bounded wait gave up and said so


def test_a_sqlite_store_that_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("")
    uri = f"sqlite:///{tmp_path / 'afile' / 'sub' / 'mlflow.db'}"
    (p,) = tracking_problems(cfg_with(tracking={"uri": uri, "artifact_location": str(tmp_path / "art")}))
    assert p.startswith(f"tracking.uri: value {uri!r}") and "not a directory" in p
    # the default: sqlite and artifacts under a workdir that does not exist yet
    assert tracking_problems(validate_config({**BASE, "workdir": str(tmp_path / "new" / "work")})) == []


# ---------------------------------------------------------------------------------------
# the real command: exit code 2, one message, no traceback, quickly
# ---------------------------------------------------------------------------------------

def _validate(path, *extra, static=True):
    """`sae-ray validate` in a subprocess (timeout=60 only guards the suite against a hang)."""
    return subprocess.run([sys.executable, "-m", "sae_ray.cli", "validate", str(path), *(["--static"] if static else []),
                           *extra], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name, content, says", [
    ("bomb.yaml", alias_bomb(), "alias bomb"),
    ("deep.yaml", "model: " + "[" * 10000 + "]" * 10000 + "\n", "nested deeper"),
    ("latin1.yaml", "model: {name: 'caf\u00e9'}\n".encode("latin-1"), "not UTF-8"),
    ("dup.yaml", "model: {name: m}\nmodel: {name: n}\n", "duplicate key 'model'"),
    ("hooks.yaml", "model: {name: m}\ndata: {path: d}\nhooks: []\n", "hooks: value []"),
])
def test_cli_refuses_cleanly(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    out = _validate(path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and says in out.stderr, out.stderr
    assert out.stderr.startswith("error: ")


def test_cli_without_static_and_with_bad_overrides(tmp_path):
    path = tmp_path / "hooks.yaml"
    path.write_text("model: {name: m}\ndata: {path: d}\nhooks: []\n")
    out = _validate(path, static=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "hooks: value []" in out.stderr
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    out = _validate(good, "--set", "hooks.5.layer=1")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--set 'hooks.5.layer=1'" in out.stderr
    (tmp_path / "adir.yaml").mkdir()
    out = _validate(tmp_path / "adir.yaml")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "is a directory" in out.stderr
