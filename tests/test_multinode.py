"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): a head that runs nothing and three
one-CPU worker nodes, so two profiling replicas, or two training workers, are necessarily on
different nodes. Profiling and training there give exactly what one node gives; losing a node in the
middle of training resumes from the last checkpoint and ends bit-identical; the run directory must be
visible from every node."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.cluster import check_visible_from_every_node, nodes_not_seeing, refuse_blind_nodes, working_nodes
from pipeline.config import ConfigError
from pipeline.profile import run_profile
from pipeline.train import RUN_NAME, run_train
from tests.test_profile import config as profile_config
from tests.test_profile import make_profile_assets
from tests.test_train import adapter_tensors, make_assets
from tests.test_train import config as train_config

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
WORKER_NODES = 3


@pytest.fixture(scope="module")
def cluster(one_node_adapter):
    """Started after the one-node reference run (each needs its own Ray)."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head (and the driver) run no work
    for _ in range(WORKER_NODES):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    for part in ("train", "profile"):
        (root / part).mkdir()
    make_assets(root / "train")  # the training model, data and expert config (tests/test_train.py)
    return {**make_profile_assets(root / "profile"), "train": root / "train"}


@pytest.fixture(scope="module")
def one_node_adapter(assets, tmp_path_factory):
    """The reference: the same training on a one-node cluster with 3 CPUs (same worker count and
    threads), before the multi-node cluster starts."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=WORKER_NODES, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        out = tmp_path_factory.mktemp("one-node") / "esft"
        run_train(train_config(assets["train"], out))
        return adapter_tensors(out / "adapter")
    finally:
        ray.shutdown()


def assert_same_adapter(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def map_workers() -> dict[str, str]:
    """Every Ray Data map actor (a profiling replica) so far, dead or alive: actor id -> node id."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(limit=10000) if a.class_name.startswith("MapWorker(")}


def nodes_of(class_name: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")], limit=1000)}


def test_the_cluster_has_three_one_cpu_worker_nodes(cluster):
    nodes = working_nodes()
    assert len(nodes) == WORKER_NODES and all(n["Resources"]["CPU"] == 1 for n in nodes)


def test_profiling_replicas_on_two_nodes_give_the_one_replica_scores(assets, cluster, tmp_path, monkeypatch):
    """2 replicas x 1 CPU + 1 CPU for reading = the three one-CPU nodes: one replica per node, each fed
    its share of the corpus's blocks; the sums are the one-replica sums, bit for bit."""
    import pipeline.data

    monkeypatch.setattr(pipeline.data, "BLOCK_BYTES", 2048)  # the corpus becomes several blocks, for both replicas
    before = map_workers()
    two = run_profile(profile_config(assets, tmp_path / "two", replicas=2, threads_per_replica=1, n_sample_tokens=4000))[0].scores
    replica_nodes = {node for actor, node in map_workers().items() if actor not in before}
    assert len(replica_nodes) == 2, f"the two replicas ran on {len(replica_nodes)} node(s)"
    one = run_profile(profile_config(assets, tmp_path / "one", replicas=1, threads_per_replica=1, n_sample_tokens=4000))[0].scores
    assert one.total_tokens >= 4000
    for name in ("tokens_L", "selections_LE", "gate_mass_fixed_LE", "seq_mean_selections_LE", "seq_mean_gate_LE"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name


def test_training_workers_on_two_nodes_give_the_one_node_adapter(assets, one_node_adapter, cluster, tmp_path):
    out = tmp_path / "esft"
    run_train(train_config(assets["train"], out))  # 2 workers x 1 CPU: necessarily two nodes
    assert_same_adapter(one_node_adapter, adapter_tensors(out / "adapter"))


def test_a_node_lost_mid_training_resumes_from_its_checkpoint_bit_identical(assets, one_node_adapter, cluster, tmp_path):
    out = tmp_path / "esft"
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["metrics"] = run_train(train_config(assets["train"], out))
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 300
    # Wait for the step-4 checkpoint (save_every=4 of 8 steps), then kill a node that runs a training
    # worker and not the Train controller (losing the controller loses the run, as losing the driver does).
    while not list((out / "ray" / RUN_NAME).glob("checkpoint_*")) and thread.is_alive():
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.2)
    assert thread.is_alive(), f"training ended before a node could be removed: {outcome}"
    workers = nodes_of("RayTrainWorker") - nodes_of("TrainController")
    victim = next(node for node in cluster.worker_nodes if node.node_id in workers)
    cluster.remove_node(victim, allow_graceful=False)
    cluster.add_node(num_cpus=1)  # the autoscaler would bring a replacement; Ray Train waits for it
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert [r["step"] for r in outcome["metrics"]["history"]] == list(range(1, 9))
    assert_same_adapter(one_node_adapter, adapter_tensors(out / "adapter"))


def test_a_run_directory_some_node_cannot_see_is_refused(cluster, tmp_path):
    check_visible_from_every_node(tmp_path / "shared", "train: the run directory")  # one filesystem here: visible
    assert not list((tmp_path / "shared").iterdir()), "the visibility marker was left behind"
    # What a node with its own local disk sees: no marker, or another file under the same name.
    # The probes run on every node and every node reports it, by id and address.
    absent = nodes_not_seeing(tmp_path / "nowhere" / ".esft-visible-x", "x")
    other = tmp_path / ".esft-visible-y"
    other.write_text("another run's token")
    assert len(absent) == len(nodes_not_seeing(other, "y")) == WORKER_NODES
    node_ids = {n["NodeID"][:12] for n in working_nodes()}
    assert {entry.split()[0] for entry in absent} == node_ids
    with pytest.raises(ConfigError, match=r"run directory .* is not visible from 3 Ray node\(s\): .*NFS") as error:
        refuse_blind_nodes(tmp_path, "train: the run directory", absent)
    assert all(node in str(error.value) for node in node_ids)
