"""The Ray cluster every stage runs on: starting (or joining) it, where replicas go, and facts
checked before any work starts.

`ensure_ray` joins the cluster of RAY_ADDRESS (or a `ray.init` the caller made) or starts a local
one; `placement_for` sizes the model replicas of profiling and evaluation to the cluster.

On more than one node, Ray Train's workers write their checkpoints into the run directory from
their own nodes and the driver reads them back from its node (export, resume, recovery after a
lost node). A run directory on a node's local disk therefore breaks a multi-node run late: the
first checkpoint "succeeds" on the node that wrote it and restoring it fails somewhere else.
`check_visible_from_every_node` finds that out in a second, before any model is loaded.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from pipeline.config import ConfigError

PROBE_TIMEOUT_S = 120.0  # a node that cannot start a zero-CPU task in this time is not usable anyway


def working_nodes() -> list[dict]:
    """The alive nodes that can run work (CPUs or GPUs): where workers and replicas may land."""
    import ray

    return [node for node in ray.nodes()
            if node["Alive"] and (node["Resources"].get("CPU", 0) > 0 or node["Resources"].get("GPU", 0) > 0)]


def largest_node_cpus() -> float:
    """The most CPUs one node offers: a replica or a training worker is one process on one node, so
    it can never ask for more (Ray would wait for such a node forever)."""
    return max((node["Resources"].get("CPU", 0) for node in working_nodes()), default=0.0)


def _read_marker(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def nodes_not_seeing(marker: Path, token: str) -> list[str]:
    """The working nodes on which `marker` does not hold `token` (node id and address), probed by a
    zero-CPU task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
    nodes = working_nodes()
    probes = [read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(str(marker))
              for node in nodes]
    seen = ray.get(probes, timeout=PROBE_TIMEOUT_S)
    return [f"{node['NodeID'][:12]} ({node['NodeManagerAddress']})" for node, content in zip(nodes, seen) if content != token]


def check_visible_from_every_node(directory: Path, what: str) -> None:
    """Refuse a `directory` that some working node of the cluster does not see (same path, same
    files). Nothing to check on one node. Writes and removes one small marker file."""
    if len(working_nodes()) <= 1:
        return
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    marker = directory / f".esft-visible-{token}"
    marker.write_text(token)
    try:
        blind = nodes_not_seeing(marker, token)
    finally:
        marker.unlink(missing_ok=True)
    refuse_blind_nodes(directory, what, blind)


def refuse_blind_nodes(directory: Path, what: str, blind: list[str]) -> None:
    """The error for nodes (as `nodes_not_seeing` names them) that do not see `directory`."""
    if blind:
        raise ConfigError(
            f"{what} {directory} is not visible from {len(blind)} Ray node(s): {', '.join(blind)}; on a multi-node "
            "cluster put it on storage every node mounts at the same path (NFS, a shared volume)")


def ensure_ray() -> None:
    """Join the cluster of RAY_ADDRESS (or the caller's own `ray.init`), or start a local one, and set
    what every stage relies on: Ray Data keeps row order, and our progress lines replace its logs."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own progress lines replace its INFO logs
    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # rows merge in a fixed order, whatever the replicas
    context.enable_progress_bars = False  # the driver prints its own progress


# A CPU replica's start-up (worker process, torch and transformers imports, model load: ~5 CPU-seconds on the
# development machine) is repaid by its share of the compute only at budgets this large per replica
# (bench/README.md, profiling: at 1M tokens two one-thread replicas beat one two-thread replica by ~18%).
TOKENS_PER_CPU_REPLICA = 262144


def auto_cpu_replicas(budget_tokens: int, model_bytes: int) -> int:
    """How many CPU replicas to profile `budget_tokens` with when the user did not say: one replica per
    TOKENS_PER_CPU_REPLICA of budget, at most one per CPU of the cluster, and no more than the cluster's
    memory holds at twice the model's size each (weights plus a batch's temporaries). The replicas share
    the cores (`placement_for`), so at one per CPU each runs one thread: on small models, whose GEMMs are
    too small for threads to scale, several one-thread replicas beat one replica using every thread."""
    import ray

    resources = ray.cluster_resources()
    by_cpus = int(resources.get("CPU", 1))
    by_memory = int(resources.get("memory", 0) // max(1, 2 * model_bytes))
    return max(1, min(budget_tokens // TOKENS_PER_CPU_REPLICA, by_cpus, by_memory))


def placement_for(replicas: int, gpus_per_replica: float, cpus_per_replica: float | None, threads: int | None = None,
                  reading_cpus: float = 1.0) -> dict:
    """Resources of each model replica (profiling and evaluation share this). `threads`: torch
    threads per CPU replica; default the node's cores shared between the replicas. `reading_cpus`:
    what Ray Data's read and pack tasks need beside the pool (0 when the rows come from memory)."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
    if gpus_per_replica * replicas > gpus:
        raise ConfigError(
            f"{replicas} replicas x {gpus_per_replica} GPUs need {replicas * gpus_per_replica:g} GPUs; the cluster "
            f"has {gpus:g} GPUs (lower --replicas or --gpus-per-replica, or add GPU nodes)"
        )
    largest_node = largest_node_cpus()
    if cpus_per_replica is not None:
        per_replica = cpus_per_replica
    elif gpus_per_replica > 0:
        per_replica = 1.0
    else:  # CPU replicas: leave one CPU for reading and packing, or the stream starves (ARCHITECTURE §6)
        # and never ask for more than one node has: a replica is one process on one node.
        per_replica = min(max(0.25, (cpus - 1) / replicas), largest_node)
    if per_replica > largest_node + 1e-9:
        raise ConfigError(f"a replica x {per_replica:g} CPUs does not fit on any node of the Ray cluster (the largest has "
                          f"{largest_node:g} CPUs); lower --cpus-per-replica")
    # Ray does not refuse a pool larger than the cluster: the stream waits for CPUs forever (and a
    # pool holding every CPU starves the read tasks), so refuse here, before any model is loaded.
    needed = replicas * per_replica + reading_cpus
    if needed > cpus + 1e-9:  # the tolerance absorbs rounding in (cpus - 1) / replicas * replicas
        reading = f" + {reading_cpus:g} CPU to read the data" if reading_cpus else ""
        raise ConfigError(
            f"{replicas} replicas x {per_replica:g} CPUs{reading} need {needed:g} CPUs; the Ray cluster offers "
            f"{cpus:g} (lower --replicas{'' if cpus_per_replica is None else ' or --cpus-per-replica'}, or add nodes)"
        )
    if threads is None:
        threads = max(1, int(os.cpu_count() or 1) // replicas) if gpus_per_replica == 0 else 2
    return {"num_cpus": per_replica, "threads": threads}
