"""Dataset filtering: score image–caption datasets with the ITM head and keep the matches.

:func:`filter_dataset` is the pipeline behind ``blipitm filter``: what to keep is a
:class:`Threshold` or a :class:`KeepFraction` on one score (:class:`By`), where to score a
:class:`LocalRun` or a :class:`RayRun`, and the result a :class:`FilterStats`. The input formats
are the entries of :data:`FORMATS`. :func:`score_batch` is the per-batch primitive (samples ->
score rows) that every runner calls; :func:`score_shard` scores and commits one shard;
:class:`RayScorer` is the per-batch scoring as a callable class for users' own Ray Data
pipelines. :class:`CapFilt` turns a run into BLIP's CapFilt bootstrap (synthetic captions from
a captioner, scored beside the originals). See docs/filtering.md and docs/capfilt.md.
"""

from blipitm.filtering.capfilt import CapFilt
from blipitm.filtering.formats import FORMATS, Format
from blipitm.filtering.inputs import Shard, expand_inputs, read_shard
from blipitm.filtering.policy import KeepFraction, KeepPolicy, Threshold
from blipitm.filtering.ray_scorer import RayScorer
from blipitm.filtering.readers import Columns, Sample
from blipitm.filtering.runner import filter_dataset
from blipitm.filtering.runs import LocalRun, RayRun
from blipitm.filtering.scoring import By, score_batch
from blipitm.filtering.shards import FilterError, FilterProgress, score_shard
from blipitm.filtering.stats import FilterStats, Throughput

__all__ = [
    "FORMATS",
    "By",
    "CapFilt",
    "Columns",
    "FilterError",
    "FilterProgress",
    "FilterStats",
    "Format",
    "KeepFraction",
    "KeepPolicy",
    "LocalRun",
    "RayRun",
    "RayScorer",
    "Sample",
    "Shard",
    "Threshold",
    "Throughput",
    "expand_inputs",
    "filter_dataset",
    "read_shard",
    "score_batch",
    "score_shard",
]
