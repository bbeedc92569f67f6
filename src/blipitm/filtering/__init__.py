"""Dataset filtering: score image–caption datasets with the ITM head and keep the matches.

:func:`filter_dataset` is the local pipeline behind ``blipitm filter``; :func:`score_batch` is
the per-batch primitive (samples -> score rows) that any runner calls; :func:`score_shard`
scores and commits one shard; :class:`RayScorer` is the per-batch scoring as a callable class
for users' own Ray Data pipelines. See docs/filtering.md.
"""

from blipitm.filtering.ray_scorer import RayScorer
from blipitm.filtering.readers import Columns, Sample, Shard, expand_inputs, read_shard
from blipitm.filtering.runner import filter_dataset
from blipitm.filtering.scoring import score_batch
from blipitm.filtering.shards import FilterError, FilterProgress, score_shard

__all__ = [
    "Columns",
    "FilterError",
    "FilterProgress",
    "RayScorer",
    "Sample",
    "Shard",
    "expand_inputs",
    "filter_dataset",
    "read_shard",
    "score_batch",
    "score_shard",
]
