"""Dataset filtering: score image–caption datasets with the ITM head and keep the matches.

:func:`filter_dataset` is the local pipeline behind ``blipitm filter``; :func:`score_batch` is
the per-batch primitive (samples -> score rows) that any runner calls; :func:`score_shard`
scores and commits one shard. See docs/filtering.md.
"""

from blipitm.filtering.readers import Columns, Sample, Shard, expand_inputs, read_shard
from blipitm.filtering.runner import FilterError, FilterProgress, filter_dataset, score_shard
from blipitm.filtering.scoring import score_batch

__all__ = [
    "Columns",
    "FilterError",
    "FilterProgress",
    "Sample",
    "Shard",
    "expand_inputs",
    "filter_dataset",
    "read_shard",
    "score_batch",
    "score_shard",
]
