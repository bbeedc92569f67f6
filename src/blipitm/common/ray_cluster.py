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
from dataclasses import dataclass, replace

from blipitm.engine.options import LoadOptions
from blipitm.errors import InvalidInputError

# ``--ray`` without an address: join the Ray this process already runs, or start one here.
LOCAL = "local"


@dataclass(frozen=True)
class RayPool:
    """A pool of actors, each loading the model once: ``workers`` of them, with
    ``gpus_per_worker`` GPUs (then on ``cuda``) and ``cpus_per_worker`` CPUs (None: a
    one-machine Ray's CPUs / workers, 1 on a cluster). ``address``: ``"local"`` joins the Ray
    this process runs or starts one; anything else is a cluster's address (``auto``,
    ``ray://head:10001``)."""

    address: str = LOCAL
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InvalidInputError("workers must be positive", loc=("workers",))
        if self.gpus_per_worker < 0:
            raise InvalidInputError("must be >= 0", loc=("gpus_per_worker",))
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise InvalidInputError("must be positive", loc=("cpus_per_worker",))

    def actor_options(self, options: LoadOptions) -> LoadOptions:
        """What an actor loads: ``options``, on the GPU it was given when it was given one."""
        if self.gpus_per_worker > 0 and options.device == "cpu":
            return replace(options, device="cuda")
        return options


@contextmanager
def ray_cluster(pool: RayPool) -> Iterator[float]:
    """Ray joined or started for ``pool``; yields the CPUs each of its actors gets, and stops
    Ray afterwards if this call started it."""
    started = connect(pool.address, pool.workers, pool.cpus_per_worker)
    try:
        yield worker_cpus(pool.workers, pool.cpus_per_worker)
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
