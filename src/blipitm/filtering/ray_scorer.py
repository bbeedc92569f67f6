"""``RayScorer``: the filter's per-batch scoring as a callable class for users' own Ray Data
pipelines (``ds.map_batches(RayScorer, fn_constructor_kwargs={"model": ...}, ...)``).

It turns a batch's image and caption columns into :class:`Sample` records and calls the same
:func:`~blipitm.filtering.scoring.score_batch` as ``blipitm filter``, so the numbers are the
filter's. Works on any mapping of columns, so it runs without Ray too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from blipitm.engine.options import DEFAULT_MODEL, LoadOptions
from blipitm.errors import InvalidInputError
from blipitm.filtering.readers import Sample, set_captions
from blipitm.filtering.runner import DEFAULT_CACHE_MB
from blipitm.filtering.scoring import BY_COLUMN, SCORE_COLUMNS, score_batch

MIB = 1 << 20


class RayScorer:
    """Adds score columns to batches of (image, caption) rows, one output row per input row.

    ``image_col``: encoded image bytes or a path; ``caption_col``: a caption, or a list of
    candidate captions (then every score column holds a list, one entry per candidate).
    Added columns: ``itm_probability``, ``itm_logit`` (the match logit), ``itc_cosine``,
    ``blip_score``, ``status`` (``ok`` or why there is no score: ``missing_image``,
    ``bad_image``, ``no_caption``, ``bad_caption``) and ``error``; with ``threshold``, also
    ``kept`` (``by``'s score >= threshold). A bad row gets a status; the actor goes on.

    The model is loaded once per actor: ``model`` is a hub id or local path, ``protocol``,
    ``dtype`` and ``device`` as in :func:`blipitm.load` (``device=None``: the GPU Ray gave
    this actor, else the CPU), ``cache_mb`` the engine's image cache (identical images across
    batches are encoded once while it holds them; within a batch always). Any other
    :class:`~blipitm.LoadOptions` field may be passed in ``load``.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        image_col: str = "image",
        caption_col: str = "caption",
        by: str = "itm",
        threshold: float | None = None,
        protocol: str = "blip",
        dtype: str = "float32",
        device: str | None = None,
        cache_mb: float = DEFAULT_CACHE_MB,
        load: Mapping[str, Any] | None = None,
    ) -> None:
        if by not in BY_COLUMN:
            raise InvalidInputError(
                f"by must be one of {sorted(BY_COLUMN)}, got {by!r}", loc=("by",)
            )
        if device is None:
            device = "cuda" if _ray_gave_gpu() else "cpu"
        options = LoadOptions(
            model,
            protocol=protocol,  # type: ignore[arg-type]
            dtype=dtype,  # type: ignore[arg-type]
            device=device,
            cache_bytes=int(cache_mb * MIB),
            **dict(load or {}),
        )
        from blipitm.engine import load_options  # torch: in the actor, not at import

        self.engine = load_options(options)
        self.image_col, self.caption_col = image_col, caption_col
        self.by, self.threshold = BY_COLUMN[by], threshold

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        for col in (self.image_col, self.caption_col):
            if col not in batch:
                raise InvalidInputError(
                    f"the batch has no column {col!r} (it has {sorted(batch)}); name the "
                    "columns with RayScorer's image_col and caption_col",
                    loc=(col,),
                )
        images, captions = batch[self.image_col], batch[self.caption_col]
        samples = [_sample(i, images[i], captions[i]) for i in range(len(images))]
        rows = score_batch(self.engine, samples)
        out: dict[str, Any] = dict(batch)
        listed = [not isinstance(_plain(c), str) for c in captions]
        for name in (
            *SCORE_COLUMNS,
            "status",
            "error",
            *(["kept"] if self.threshold is not None else []),
        ):
            per_sample: list[list[Any]] = [[] for _ in samples]
            for r, i in enumerate(rows["sample"]):
                value = rows[self.by][r] >= self.threshold if name == "kept" else rows[name][r]
                per_sample[i].append(value)
            cells = [v if listed[i] else v[0] for i, v in enumerate(per_sample)]
            out[name] = _column(cells, name)
        return out


def _ray_gave_gpu() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and bool(ray.get_gpu_ids())


def _plain(cell: Any) -> Any:
    """Ray hands list cells over as numpy arrays and bytes as numpy scalars."""
    if isinstance(cell, np.ndarray):
        return cell.tolist()
    if isinstance(cell, np.generic):
        return cell.item()
    return cell


def _sample(i: int, image: Any, caption: Any) -> Sample:
    sample = Sample(str(i), None, [])
    set_captions(sample, _plain(caption))
    image = _plain(image)
    if isinstance(image, (bytes, bytearray)) and image:
        sample.image = bytes(image)
    elif isinstance(image, str) and image:
        sample.image = image
    elif sample.status == "ok":
        sample.status, sample.error = "missing_image", f"no image bytes or path in row {i}"
    return sample


def _column(cells: Sequence[Any], name: str) -> np.ndarray:
    if all(not isinstance(c, list) for c in cells):
        dtype = {"status": object, "error": object, "kept": bool}.get(name, np.float32)
        return np.asarray(cells, dtype=dtype)
    out = np.empty(len(cells), dtype=object)  # ragged: one list per row
    out[:] = [np.asarray(c) if isinstance(c, list) else c for c in cells]
    return out
