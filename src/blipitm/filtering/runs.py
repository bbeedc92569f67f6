"""Where a run scores (:class:`LocalRun`: in this process; :class:`RayRun`: on Ray Data) and
which model it loads when given none. The outputs do not depend on the choice: both score each
shard with :func:`~blipitm.filtering.shards.score_shard` and commit it with the same marker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from blipitm.common.ray_cluster import RayPool
from blipitm.engine.options import FILTERING_PRESET, LoadOptions
from blipitm.errors import InvalidInputError

if TYPE_CHECKING:
    from blipitm.engine import Engine
    from blipitm.engine.captioner import Captioner

# What a run loads when not told: the default model, with the filter's image cache (the preset
# beside LoadOptions says why it is small).
DEFAULT_OPTIONS = FILTERING_PRESET


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
class RayRun(RayPool):
    """Score on Ray Data: a :class:`~blipitm.common.ray_cluster.RayPool` of actors (``address``,
    ``workers``, ``gpus_per_worker``, ``cpus_per_worker``), ``batch_size`` samples per engine
    call in each."""

    batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_batch_size(self.batch_size)


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
