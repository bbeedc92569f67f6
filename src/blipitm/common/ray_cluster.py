"""Joining or starting Ray for a command's ``--ray [ADDRESS]``, and sizing its actors.

Shared by ``blipitm filter --ray`` and ``blipitm batch run --ray``, so that both read the same
address forms (none: a local Ray; ``auto``, ``HOST:6379``, ``ray://HOST:10001``: a cluster) and
give their actors CPUs by the same rule. Ray is imported when a run asks for it, never at import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from blipitm.errors import InvalidInputError

# ``--ray`` without an address: join the Ray this process already runs, or start one here.
LOCAL = "local"


def check_workers(workers: int, cpus_per_worker: float | None) -> None:
    """Refuse a pool no Ray could place, naming the option."""
    if workers < 1:
        raise InvalidInputError("workers must be positive", loc=("workers",))
    if cpus_per_worker is not None and cpus_per_worker <= 0:
        raise InvalidInputError("cpus_per_worker must be positive", loc=("cpus_per_worker",))


@contextmanager
def ray_cluster(address: str, workers: int, cpus_per_worker: float | None) -> Iterator[float]:
    """Ray joined or started for a pool of ``workers`` actors; yields the CPUs each actor gets,
    and stops Ray afterwards if this call started it."""
    started = connect(address, workers, cpus_per_worker)
    try:
        yield worker_cpus(workers, cpus_per_worker)
    finally:
        if started:
            import ray

            ray.shutdown()


def connect(address: str, workers: int, cpus_per_worker: float | None) -> bool:
    """Join the Ray the caller already runs, or the cluster at ``address``, or start a local
    one (``address="local"``). Returns whether this call started Ray (and so must stop it)."""
    try:
        import ray
    except ImportError:
        raise InvalidInputError(
            "--ray needs Ray Data: pip install 'ray[data]'", loc=("ray",)
        ) from None
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a self-hosted tool sends nothing
    if address == LOCAL:
        num_cpus = None
        if cpus_per_worker is not None:  # enough for the pool the caller asked for
            num_cpus = max(int(os.cpu_count() or 1), int(workers * cpus_per_worker))
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True


def worker_cpus(workers: int, cpus_per_worker: float | None) -> float:
    """``cpus_per_worker``, or when None: a one-machine Ray's CPUs shared by the ``workers``
    (the run has the machine), 1 on a cluster (Ray's own default; other jobs share it)."""
    if cpus_per_worker is not None:
        return cpus_per_worker
    import ray

    one_node = len([n for n in ray.nodes() if n.get("Alive")]) == 1
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1.0, cpus // workers) if one_node else 1.0
