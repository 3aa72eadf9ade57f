"""A Ray cluster of two nodes on this machine, started by the tests that need one (no mocks).

``ray_cluster`` is module-scoped: a module pays for one start (a few seconds) and shares the
cluster among its tests. Ray missing fails the tests that need it (it is in the ``dev``
extra), unless ``CRUCIBLE_SKIP_RAY=1``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

HEAD_CPUS = 2  # logical CPUs: what the hosts reserve, not what they use (each tree needs little)
# a node that dies is declared dead after about 3 missed checks of 0.5 s (Ray's default: 15 s)
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}


def ray_or_skip() -> Any:
    try:
        import ray
    except ImportError:
        if os.environ.get("CRUCIBLE_SKIP_RAY") == "1":
            pytest.skip("ray is not installed (CRUCIBLE_SKIP_RAY=1)")
        raise
    return ray


@pytest.fixture(scope="module")
def ray_cluster(ray_turn: None) -> Iterator[Any]:
    """A running ``ray.cluster_utils.Cluster`` (head only; tests add nodes) joined by this process."""
    ray = ray_or_skip()
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": HEAD_CPUS, "include_dashboard": False, "_system_config": FAST_HEALTH},
    )
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
