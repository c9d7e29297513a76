"""The configs a cluster user starts from (cluster/), checked offline: no network, no cloud
credentials, no Kubernetes.

- cluster/aws.yaml: through Ray's own `prepare_config` (merges the AWS defaults Ray ships; reads
  only files) and `validate_config` (jsonschema against the ray-schema.json Ray ships, plus its
  cross-field rules), with every socket connection refused while they run; the raw file also
  against the schema alone. Not run: the AWS provider's bootstrap (`ray up` calls boto3 there to
  resolve instance types, AMIs, subnets, IAM), which needs AWS.
- The custom resources `producer` and `trainer` are declared on the node types meant for them (and
  on no other), and cluster/sweep.yaml, a valid sae-ray RunConfig, asks for exactly those.
- cluster/kuberay/*.yaml: parsed, and their `spec` validated with jsonschema against the
  openAPIV3Schema of KubeRay's v1 CRDs (v1.7.0), pruned (tests/kuberay_crd_v1.7.0.json, made by
  `python tests/test_cluster_configs.py --regenerate KUBERAY_CHECKOUT`) and made strict (unknown
  fields refused, as `kubectl apply`'s default strict field validation does). Not checked: the
  CRD's CEL rules (two, both about immutability or managedBy, which these manifests do not set)
  and what the operator's webhook checks beyond the schema.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import socket
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
FIXTURE = Path(__file__).with_name("kuberay_crd_v1.7.0.json")
IMAGE_HOME = "/home/ray/sae-ray"  # where cluster/kuberay/Dockerfile puts the checkout
PLACEHOLDERS = {"buffer.path": "s3://YOUR-BUCKET/sae-ray/buffers/pythia-70m", "tracking.uri": "http://YOUR-MLFLOW-HOST:5000"}


def _yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during an offline check: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------------------------------
# cluster/aws.yaml: Ray's own validation
# ---------------------------------------------------------------------------------------

def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_aws_config_passes_rays_own_validation(no_network):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(CLUSTER / "aws.yaml")
    jsonschema.validate(raw, _ray_schema())  # the file as written
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` validates: merged with aws/defaults.yaml
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    # ours replaced the defaults, not merged into them
    assert set(prepared["available_node_types"]) == {"head", "producer_gpu", "trainer_cpu"}
    assert any("boto3" in c for c in prepared["head_setup_commands"])  # the autoscaler needs it on the head


def test_rays_validation_would_catch_a_wrong_aws_config(no_network):
    """The check above is not vacuous: Ray's validation refuses a misspelt field and a resource
    count that is not a whole number."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(CLUSTER / "aws.yaml")
    typo = copy.deepcopy(raw)
    typo["available_node_types"]["trainer_cpu"]["min_worker"] = 1
    half = copy.deepcopy(raw)
    half["available_node_types"]["producer_gpu"]["resources"] = {"producer": 0.5}
    for bad in (typo, half):
        with pytest.raises(jsonschema.ValidationError):
            validate_config(prepare_config(bad))


def test_custom_resources_are_declared_on_the_intended_aws_node_types():
    cfg = _yaml(CLUSTER / "aws.yaml")
    types = cfg["available_node_types"]
    declared = {name: {k: v for k, v in t["resources"].items() if k not in ("CPU", "GPU", "memory")}
                for name, t in types.items()}
    assert declared == {"head": {}, "producer_gpu": {"producer": 1}, "trainer_cpu": {"trainer": 1}}
    assert types["producer_gpu"]["node_config"]["InstanceType"].startswith(("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p5."))
    assert not types["trainer_cpu"]["node_config"]["InstanceType"].startswith(("g", "p"))  # CPU only
    assert not types["head"]["node_config"]["InstanceType"].startswith(("g", "p"))


def test_aws_nodes_run_token_auth_with_the_token_copied_to_them():
    cfg = _yaml(CLUSTER / "aws.yaml")
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert any('sae-ray[s3]' in c for c in cfg["setup_commands"])


# ---------------------------------------------------------------------------------------
# cluster/sweep.yaml: a valid sae-ray config that asks for what the clusters declare
# ---------------------------------------------------------------------------------------

def _sweep(overrides: list[str] | None = None):
    from sae_ray.config import load_config

    return load_config(CLUSTER / "sweep.yaml", overrides)


def test_the_cluster_sweep_asks_for_the_custom_resources_the_clusters_declare(no_network):
    cfg = _sweep()
    aws = _yaml(CLUSTER / "aws.yaml")["available_node_types"]
    kuberay = _kuberay_groups(_yaml(CLUSTER / "kuberay" / "raycluster.yaml")["spec"])
    assert dict(cfg.producers.resources) == {"producer": 1} and cfg.producers.num_gpus == 1
    assert dict(cfg.resources.trial_resources) == {"trainer": 1} and cfg.resources.gpus_per_trial == 0
    for producer, trainer in ((aws["producer_gpu"]["resources"], aws["trainer_cpu"]["resources"]),
                              (kuberay["producer-gpu"], kuberay["trainer-cpu"])):
        assert all(producer.get(k, 0) >= v for k, v in cfg.producers.resources.items())
        assert all(trainer.get(k, 0) >= v for k, v in cfg.resources.trial_resources.items())
    # sae-ray checks at submission that every producer fits on the nodes alive then
    assert aws["producer_gpu"]["min_workers"] >= cfg.producers.count
    rc = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    gpu_group = next(g for g in rc["workerGroupSpecs"] if g["groupName"] == "producer-gpu")
    assert gpu_group["minReplicas"] >= cfg.producers.count
    # a g5.xlarge has 4 vCPUs, a c6i.xlarge 4; the KubeRay pods ask for as many
    assert cfg.producers.num_cpus <= 4 and cfg.resources.cpus_per_trial <= 4
    assert cfg.buffer.path.startswith("s3://") and cfg.tracking_uri().startswith("http://")
    assert cfg.artifact_location().startswith("mlflow-artifacts:")


# ---------------------------------------------------------------------------------------
# KubeRay: the manifests against the CRDs' schema
# ---------------------------------------------------------------------------------------

def _strict(schema):
    """`schema` with unknown fields refused wherever the CRD lists an object's fields (Kubernetes
    prunes or, under strict field validation, refuses them)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    fragment = json.loads(FIXTURE.read_text())
    schema = _strict({"$ref": f"#/definitions/{kind}Spec", "definitions": fragment["definitions"]})
    return jsonschema.Draft7Validator(schema)


def _problems(kind: str, spec: dict) -> list[str]:
    return [f"spec.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _crd_validator(kind).iter_errors(spec)]


def _kuberay_groups(spec: dict) -> dict[str, dict[str, float]]:
    """groupName -> the custom resources its rayStartParams declare (KubeRay's quoting: a JSON
    object inside a JSON string, '"{\\"producer\\": 1}"')."""
    groups = {}
    for g in spec["workerGroupSpecs"]:
        value = g.get("rayStartParams", {}).get("resources")
        groups[g["groupName"]] = json.loads(json.loads(value)) if value else {}
    return groups


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests_match_the_crd_schema(name, kind):
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    assert len(docs) == 1
    doc = docs[0]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    assert _problems(kind, doc["spec"]) == []


def test_the_crd_check_would_catch_a_wrong_manifest():
    spec = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    missing = copy.deepcopy(spec)
    del missing["workerGroupSpecs"][0]["maxReplicas"]
    typo = copy.deepcopy(spec)
    typo["workerGroupSpecs"][1]["rayStartParam"] = typo["workerGroupSpecs"][1].pop("rayStartParams")
    no_name = copy.deepcopy(spec)
    del no_name["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    bad_auth = copy.deepcopy(spec)
    bad_auth["authOptions"]["mode"] = "tokens"
    for bad, where in ((missing, "workerGroupSpecs.0"), (typo, "workerGroupSpecs.1"),
                       (no_name, "headGroupSpec.template.spec.containers.0"), (bad_auth, "authOptions.mode")):
        problems = _problems("RayCluster", bad)
        assert problems and all(p.startswith(f"spec.{where}") for p in problems), problems


def test_the_crd_fragment_keeps_the_fields_kuberay_requires():
    d = json.loads(FIXTURE.read_text())["definitions"]
    rc = d["RayClusterSpec"]
    assert rc["required"] == ["headGroupSpec"]
    assert "template" in rc["properties"]["headGroupSpec"]["required"]
    assert set(rc["properties"]["workerGroupSpecs"]["items"]["required"]) == {"groupName", "maxReplicas", "minReplicas", "template"}
    assert rc["properties"]["headGroupSpec"]["properties"]["template"] == {"$ref": "#/definitions/PodTemplateSpec"}
    pod = d["PodTemplateSpec"]["properties"]["spec"]
    assert pod["required"] == ["containers"] and pod["properties"]["containers"]["items"]["required"] == ["name"]
    assert d["RayJobSpec"]["properties"]["rayClusterSpec"] == {"$ref": "#/definitions/RayClusterSpec"}


def test_raycluster_declares_the_custom_resources_on_the_intended_groups():
    spec = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    assert _kuberay_groups(spec) == {"producer-gpu": {"producer": 1}, "trainer-cpu": {"trainer": 1}}
    assert "resources" not in spec["headGroupSpec"].get("rayStartParams", {})
    groups = {g["groupName"]: g["template"]["spec"]["containers"][0]["resources"] for g in spec["workerGroupSpecs"]}
    assert groups["producer-gpu"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in groups["trainer-cpu"]["limits"]
    assert spec["authOptions"]["mode"] == "token"


def test_rayjob_runs_the_repository_entrypoint_on_the_raycluster(no_network):
    job = _yaml(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]
    cluster = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"{IMAGE_HOME}/jobs/sweep.py"
    assert (ROOT / "jobs" / "sweep.py").is_file()
    config = Path(argv[2]).relative_to(IMAGE_HOME)
    assert (ROOT / config).is_file()
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert {s.split("=", 1)[0]: s.split("=", 1)[1] for s in sets} == PLACEHOLDERS
    cfg = _sweep(sets)  # the entrypoint's config and overrides validate
    assert cfg.buffer.path == PLACEHOLDERS["buffer.path"]


def test_ray_versions_agree_across_the_cluster_configs():
    """Client, cluster and image must run the same Ray and Python: the launcher's image, the
    Dockerfile's base and the RayCluster's rayVersion name one, the Ray installed here."""
    import ray

    aws_image = _yaml(CLUSTER / "aws.yaml")["docker"]["image"]
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    ray_version = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]["rayVersion"]
    for image in (aws_image, base):
        assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_version)}-py311-(gpu|cpu)", image), image
    assert ray_version == ray.__version__
    assert f"WORKDIR {IMAGE_HOME}" in dockerfile and "COPY --chown=ray:users jobs ./jobs" in dockerfile
    assert 'pip install --no-cache-dir ".[s3]"' in dockerfile


# ---------------------------------------------------------------------------------------
# Making the fixture: python tests/test_cluster_configs.py --regenerate KUBERAY_CHECKOUT
# ---------------------------------------------------------------------------------------

KUBERAY_TAG = "v1.7.0"
_KEEP = ("type", "required", "enum", "format", "additionalProperties", "anyOf", "pattern",
         "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "nullable")


def _prune(schema: dict, depth: int) -> dict:
    """`schema` down to `depth` levels of fields (names, types, required lists, enums), each field
    below that cut to its type (whatever it holds is then accepted)."""
    if "$ref" in schema:
        return {"$ref": schema["$ref"]}
    out = {k: v for k, v in schema.items() if k in _KEEP}
    if depth <= 0:
        return {"type": schema["type"]} if "type" in schema else {}
    if "properties" in schema:
        out["properties"] = {k: _prune(v, depth - 1) for k, v in schema["properties"].items()}
    if "items" in schema:
        out["items"] = _prune(schema["items"], depth)
    return out


def _with_refs(schema: dict, pod: dict) -> dict:
    """`schema` with every Pod template (a field whose schema is `pod`) replaced by a reference to
    the one PodTemplateSpec definition."""
    if schema == pod:
        return {"$ref": "#/definitions/PodTemplateSpec"}
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: _with_refs(v, pod) for k, v in schema["properties"].items()}
    if "items" in schema:
        out["items"] = _with_refs(schema["items"], pod)
    return out


def regenerate(kuberay: Path) -> None:
    import subprocess

    def spec_of(crd: str) -> dict:
        text = subprocess.run(["git", "-C", str(kuberay), "show", f"{KUBERAY_TAG}:ray-operator/config/crd/bases/{crd}"],
                              check=True, capture_output=True, text=True).stdout
        version = next(v for v in yaml.safe_load(text)["spec"]["versions"] if v["name"] == "v1")
        return version["schema"]["openAPIV3Schema"]["properties"]["spec"]

    commit = subprocess.run(["git", "-C", str(kuberay), "rev-list", "-n1", KUBERAY_TAG], check=True,
                            capture_output=True, text=True).stdout.strip()
    cluster, job = spec_of("ray.io_rayclusters.yaml"), spec_of("ray.io_rayjobs.yaml")
    assert job["properties"]["rayClusterSpec"] == cluster, "RayJob.spec.rayClusterSpec differs from RayCluster.spec"
    pod = cluster["properties"]["headGroupSpec"]["properties"]["template"]
    assert job["properties"]["submitterPodTemplate"] == pod
    job["properties"]["rayClusterSpec"] = {"$ref": "#/definitions/RayClusterSpec"}
    # the pod template is cut after the refs are in place: _prune keeps no $ref
    cluster, job = _with_refs(cluster, pod), _with_refs(job, pod)
    fragment = {
        "_source": (f"Derived from ray-project/kuberay {KUBERAY_TAG} (commit {commit}), "
                    "ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml, "
                    "Copyright The KubeRay Authors, licensed under the Apache License 2.0 "
                    "(http://www.apache.org/licenses/LICENSE-2.0). Changes: only the v1 openAPIV3Schema "
                    "of spec, without descriptions; the specs cut to four levels of fields and the Pod template "
                    "(one definition, referenced where the CRDs repeat it) to five, each field below cut to "
                    "its type (see _prune in tests/test_cluster_configs.py, which regenerates this file); "
                    "RayJob's rayClusterSpec replaced by a reference to the identical RayCluster spec."),
        "definitions": {"RayClusterSpec": _prune(cluster, 4), "RayJobSpec": _prune(job, 4),
                        "PodTemplateSpec": _prune(pod, 5)},
    }
    FIXTURE.write_text(json.dumps(fragment, indent=0, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size:,} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--regenerate":
        sys.exit("usage: python tests/test_cluster_configs.py --regenerate KUBERAY_GIT_CHECKOUT")
    regenerate(Path(sys.argv[2]))
