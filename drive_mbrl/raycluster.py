"""Starting or joining Ray, with the resource checks RLlib and actors need (they hang silently otherwise).

The one place that calls `ray.init`. A local cluster is started quietly (no dashboard, no usage stats, a small
object store); `address` joins an existing cluster instead, where drive_mbrl must be installed on every node.
"""

from __future__ import annotations

import os
from typing import Any

from drive_mbrl.errors import ConfigError


def start_ray(address: str, cpus_needed: int) -> tuple[Any, bool]:
    """Import and initialise Ray; returns (ray module, whether this call started it and should shut it down).

    Raises ConfigError when the cluster has fewer CPUs than `cpus_needed`, which would otherwise hang forever.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        available = os.cpu_count() or 1
        if cpus_needed > available:
            raise ConfigError(f"workers={cpus_needed} is more than this machine's {available} CPUs: use "
                              f"workers<={available}, or ray_address=HOST:PORT to use a cluster")
    import ray

    if ray.is_initialized():
        return ray, False
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        available = int(ray.cluster_resources().get("CPU", 0))
        if cpus_needed > available:
            ray.shutdown()
            raise ConfigError(f"workers={cpus_needed} is more than the {available} CPUs of the Ray cluster at "
                              f"{address}: lower workers")
    else:
        # Workers inherit the driver's environment: one BLAS/OpenMP thread each, as every worker owns a core.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        ray.init(address="local", num_cpus=cpus_needed, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, object_store_memory=256 * 2**20)
    return ray, True
