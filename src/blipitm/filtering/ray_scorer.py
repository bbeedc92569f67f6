"""``RayScorer``: the filter's per-batch scoring as a callable class for users' own Ray Data
pipelines (``ds.map_batches(RayScorer, fn_constructor_kwargs={"model": ...}, ...)``).

It turns a batch's image and caption columns into :class:`Sample` records and calls the same
:func:`~blipitm.filtering.scoring.score_batch` as ``blipitm filter``, so the numbers are the
filter's. Works on any mapping of columns, so it runs without Ray too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from blipitm.engine.options import LoadOptions
from blipitm.errors import InvalidInputError
from blipitm.filtering.policy import Threshold
from blipitm.filtering.readers import Sample, set_captions
from blipitm.filtering.runs import DEFAULT_OPTIONS
from blipitm.filtering.scoring import SCORE_COLUMNS, score_batch


class RayScorer:
    """Adds score columns to batches of (image, caption) rows, one output row per input row.

    ``image_col``: encoded image bytes or a path; ``caption_col``: a caption, or a list of
    candidate captions (then every score column holds a list, one entry per candidate).
    Added columns: ``itm_probability``, ``itm_logit`` (the match logit), ``itc_cosine``,
    ``blip_score``, ``status`` (``ok`` or why there is no score: ``missing_image``,
    ``bad_image``, ``no_caption``, ``bad_caption``) and ``error``; with ``keep`` (a
    :class:`~blipitm.filtering.Threshold`), also ``kept``. A bad row gets a status; the actor
    goes on.

    The model is loaded once per actor from ``model``, a :class:`~blipitm.LoadOptions`
    (default: the default model with the filter's 64 MiB image cache; identical images across
    batches are encoded once while the cache holds them, within a batch always). An actor that
    Ray gave a GPU loads it there when the options say ``device="cpu"`` (their default).
    """

    def __init__(
        self,
        model: LoadOptions = DEFAULT_OPTIONS,
        *,
        image_col: str = "image",
        caption_col: str = "caption",
        keep: Threshold | None = None,
    ) -> None:
        if not isinstance(model, LoadOptions):
            raise InvalidInputError(
                "model must be a LoadOptions: LoadOptions(source) names a checkpoint",
                loc=("model",),
            )
        if model.device == "cpu" and _ray_gave_gpu():
            model = replace(model, device="cuda")
        from blipitm.common.memory import apply_memory_policy
        from blipitm.engine import load_options  # torch: in the actor, not at import

        apply_memory_policy()  # the actor is its own process: an entry point like the CLI's

        self.engine = load_options(model)
        self.image_col, self.caption_col = image_col, caption_col
        self.keep = keep

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
            *(["kept"] if self.keep is not None else []),
        ):
            per_sample: list[list[Any]] = [[] for _ in samples]
            for r, i in enumerate(rows["sample"]):
                per_sample[i].append(self._kept(rows, r) if name == "kept" else rows[name][r])
            cells = [v if listed[i] else v[0] for i, v in enumerate(per_sample)]
            out[name] = _column(cells, name)
        return out

    def _kept(self, rows: dict[str, list[Any]], r: int) -> bool:
        assert self.keep is not None
        return bool(rows[self.keep.by.column][r] >= self.keep.value)  # NaN (no score): False


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
