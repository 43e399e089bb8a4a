"""What a job sees of its Ray cluster: its nodes, CPUs and GPUs, and whether each node can run it.

Called once Ray is connected (the CLI connects); `emotr doctor` and every job report it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from emotr.errors import EmotrError

# A probe task is tiny; a node that has not run it by then is saturated or cannot start workers.
PROBE_TIMEOUT_S = 60


@dataclass(frozen=True)
class NodeProbe:
    """What a probe task found on one node."""

    node_ip: str
    python: str  # the worker's interpreter: the first `python` on the PATH of `ray start`
    missing: tuple[str, ...]  # modules the job needs that this interpreter cannot import


def describe_cluster(keras_backend: str) -> str:
    """Address, nodes, CPUs and GPUs; an EmotrError names a node that cannot run the job."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    shared = shared_session_dirs(nodes)
    if shared:
        where = "; ".join(f"{len(ids)} nodes on {place}" for place, ids in shared.items())
        raise EmotrError(
            f"{where}: nodes on one host that share a --temp-dir share the job's working_dir, "
            "and one deletes it under the driver (a bare [Errno 2] mid-job). Start each "
            "`ray start` on one host with its own --temp-dir"
        )
    lacking = [probe for probe in probe_nodes(nodes, keras_backend) if probe.missing]
    if lacking:
        raise EmotrError(
            "; ".join(
                f"node {p.node_ip} ({p.python}) lacks {', '.join(p.missing)}" for p in lacking
            )
            + ": install emotr's dependencies (the image's, or `pip install -c requirements.lock "
            "'.[jax]'`) into the python first on the PATH of that node's `ray start`"
        )
    resources = ray.cluster_resources()
    address = ray.get_runtime_context().gcs_address
    return (
        f"{address}: {len(nodes)} node(s), {resources.get('CPU', 0):g} CPUs, "
        f"{resources.get('GPU', 0):g} GPUs; keras and {keras_backend} import on every node"
    )


def shared_session_dirs(nodes: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Session folders used by more than one node of one host (nodes as `ray.nodes()` gives)."""
    by_place: dict[str, list[str]] = defaultdict(list)
    for node in nodes:
        # RayletSocketName is <temp-dir>/<session>/sockets/raylet[.N]
        session = Path(node["RayletSocketName"]).parent.parent
        by_place[f"{node['NodeManagerAddress']}:{session}"].append(node["NodeID"])
    return {place: ids for place, ids in by_place.items() if len(ids) > 1}


def probe_nodes(nodes: list[dict[str, Any]], keras_backend: str) -> list[NodeProbe]:
    """Run one probe task pinned to each node; raises EmotrError when a node does not answer."""
    modules = ("keras", keras_backend)
    refs = [
        _probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(modules)
        for node in nodes
    ]
    try:
        return ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise EmotrError(
            f"a node ran no probe task within {PROBE_TIMEOUT_S} s: its workers cannot start, or "
            "the cluster is busy (see `ray status` and the raylet logs)"
        ) from None


# num_cpus=0: the probe answers even while the cluster's CPUs are taken.
@ray.remote(num_cpus=0, max_retries=0)
def _probe(modules: tuple[str, ...]) -> NodeProbe:
    missing = tuple(name for name in modules if importlib.util.find_spec(name) is None)
    return NodeProbe(ray.util.get_node_ip_address(), sys.executable, missing)
