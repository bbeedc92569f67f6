"""Where a run scores (:class:`LocalRun`: in this process; :class:`RayRun`: on Ray Data) and
which model it loads when given none. The outputs do not depend on the choice: both score each
shard with :func:`~blipitm.filtering.shards.score_shard` and commit it with the same marker."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from blipitm.engine.options import FILTERING_PRESET, LoadOptions
from blipitm.errors import InvalidInputError

if TYPE_CHECKING:
    from blipitm.engine import Engine
    from blipitm.engine.captioner import Captioner

# What a run loads when not told: the default model, with the filter's image cache (the preset
# beside LoadOptions says why it is small).
DEFAULT_OPTIONS = FILTERING_PRESET
LOCAL = "local"


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise InvalidInputError("batch_size must be positive", loc=("batch_size",))


@dataclass(frozen=True)
class LocalRun:
    """Score in this process, ``batch_size`` samples per engine call."""

    batch_size: int = 256

    def __post_init__(self) -> None:
        _check_batch_size(self.batch_size)


@dataclass(frozen=True)
class RayRun:
    """Score on Ray Data: ``workers`` actors, each loading the model once, with
    ``gpus_per_worker`` GPUs (then on ``cuda``) and ``cpus_per_worker`` CPUs (None: a
    one-machine Ray's CPUs / workers, 1 on a cluster), ``batch_size`` samples per engine call.
    ``address``: ``"local"`` joins the Ray this process runs or starts one; anything else is a
    cluster's address (``auto``, ``ray://head:10001``)."""

    address: str = LOCAL
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check_batch_size(self.batch_size)
        if self.workers < 1:
            raise InvalidInputError("workers must be positive", loc=("workers",))

    def actor_options(self, options: LoadOptions) -> LoadOptions:
        """What an actor loads: ``options``, on the GPU it was given when it was given one."""
        if self.gpus_per_worker > 0 and options.device == "cpu":
            return replace(options, device="cuda")
        return options


Run = LocalRun | RayRun
DEFAULT_RUN = LocalRun()


def options_of(engine: Engine | Captioner) -> LoadOptions:
    """What a Ray actor loads to get ``engine``'s model (checked against it by the probe), or a
    captioner's (checked by its manifest record)."""
    info = engine.info
    return LoadOptions(
        info.source,
        revision=info.revision,
        protocol=info.protocol,
        dtype=info.dtype,
        compute_dtype=info.compute_dtype,
        cache_bytes=FILTERING_PRESET.cache_bytes,
    )
