"""Facts about the Ray cluster a stage runs on, checked before any work starts.

On more than one node, Ray Train's workers write their checkpoints into the run directory from
their own nodes and the driver reads them back from its node (export, resume, recovery after a
lost node). A run directory on a node's local disk therefore breaks a multi-node run late: the
first checkpoint "succeeds" on the node that wrote it and restoring it fails somewhere else.
`check_visible_from_every_node` finds that out in a second, before any model is loaded.
"""

from __future__ import annotations

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
