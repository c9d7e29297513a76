"""A sweep on a real multi-node Ray (Ray's own `cluster_utils.Cluster`: a head and two worker
nodes, each its own raylet on this machine) whose producers must run on one node and trials on
another, by custom resources; the placement is read back from the recorded node ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from sae_ray import tracking
from sae_ray.config import ConfigError
from sae_ray.sweep import run_sweep
from tests.test_end_to_end import sweep_config
from tests.tiny_models import write_jsonl


def no_lm_eval(cfg):
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"lm": False})})


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs for work), a producer node {producer: 1} and a trainer node {trainer: 2}."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    producer = c.add_node(num_cpus=1, resources={"producer": 1})
    trainer = c.add_node(num_cpus=2, resources={"trainer": 2})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, producer.node_id, trainer.node_id
    ray.shutdown()
    c.shutdown()


def test_producers_and_trials_land_on_the_nodes_that_declare_their_resources(cluster, tmp_path, tiny_model_factory,
                                                                             sample_texts):
    _, producer_node, trainer_node = cluster
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts * 3)
    cfg = sweep_config(tmp_path / "work", tiny_model_factory("gpt2"), data,
                       producers={"count": 1, "num_cpus": 1, "resources": {"producer": 1}},
                       resources={"cpus_per_trial": 1, "trial_resources": {"trainer": 1}},
                       sae={"architectures": ["topk"], "k": [4, 8], "max_stack": 1},
                       buffer={"n_tokens": 3000})
    result = run_sweep(no_lm_eval(cfg))
    assert [p["node_id"] for p in result.producer_stats] == [producer_node]
    assert {r["node_id"] for r in result.rows} == {trainer_node} and len(result.rows) == 2
    client = tracking.client_for(cfg.tracking_uri())
    for row in result.rows:
        assert client.get_run(row["mlflow_run_id"]).data.tags["sae_ray.node_id"] == trainer_node
        assert row["version"]  # registered
    summary = json.loads(Path(client.download_artifacts(result.parent_run_id, "summary.json", str(tmp_path))).read_text())
    assert summary["producers"][0]["node_id"] == producer_node


def test_a_resource_no_node_offers_is_refused_at_submission_naming_it(cluster, tmp_path, tiny_model_factory, sample_texts):
    data = write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    cfg = sweep_config(tmp_path / "work", tiny_model_factory("gpt2"), data,
                       producers={"count": 1, "num_cpus": 1, "resources": {"a100": 1}})
    with pytest.raises(ConfigError) as e:
        run_sweep(no_lm_eval(cfg))
    message = str(e.value)
    assert "producers.resources" in message and "'a100'" in message and "producer: 1" in message and "trainer: 2" in message

