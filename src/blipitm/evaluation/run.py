"""One evaluation run end to end: annotations in, recalls and report files out."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipitm.common.progress import Progress, no_progress
from blipitm.common.version import __version__
from blipitm.evaluation.dataset import RetrievalDataset, load_annotations
from blipitm.evaluation.matrices import DEFAULT_CHUNK_PAIRS, DEFAULT_K_TEST, compute_scores
from blipitm.evaluation.metrics import itm_eval, retrieval_ranks
from blipitm.evaluation.report import curves_from_ranks, write_outputs

if TYPE_CHECKING:
    from blipitm.engine import Engine  # torch: for annotations only

WORK = ".work"
PLOT_MAX_K = 50


@dataclass(frozen=True)
class EvalRun:
    results: dict[str, Any]  # what results.json holds
    dataset: RetrievalDataset


def evaluate(
    engine: Engine,
    annotations: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    k_test: int = DEFAULT_K_TEST,
    limit_images: int | None = None,
    image_batch: int | None = None,
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
    progress: Progress = no_progress,
    dataset: RetrievalDataset | None = None,
) -> EvalRun:
    """Evaluate ``engine`` on a retrieval set; resumable through ``output/.work``.

    ``dataset``: ``annotations`` as :func:`load_annotations` already read it with this
    ``image_root`` and ``limit_images`` (the CLI checks the file before loading the model), so that
    it is not read twice.

    Writes ``output/results.json`` (ITM-reranked and ITC-only recalls, config, model, timings,
    pairs/s) and ``output/report.md`` with a recall-at-K plot.
    """
    started = time.perf_counter()
    data = dataset or load_annotations(annotations, image_root, limit_images=limit_images)
    out = Path(output)
    scores = compute_scores(
        engine,
        data.images,
        data.texts,
        k_test=k_test,
        progress=progress,
        work_dir=out / WORK,
        chunk_pairs=chunk_pairs,
        image_batch=image_batch,
        fingerprint={"annotations_sha256": data.sha256, "limit_images": limit_images},
    )
    itm = itm_eval(scores.scores_i2t, scores.scores_t2i, data.txt2img, data.img2txt)
    itc = itm_eval(scores.sims, scores.sims.T, data.txt2img, data.img2txt)
    tr_itm, ir_itm = retrieval_ranks(
        scores.scores_i2t, scores.scores_t2i, data.txt2img, data.img2txt
    )
    tr_itc, ir_itc = retrieval_ranks(scores.sims, scores.sims.T, data.txt2img, data.img2txt)
    max_k = min(PLOT_MAX_K, max(len(data.images), len(data.texts)))
    curves = curves_from_ranks(
        {"TR, ITM": tr_itm, "IR, ITM": ir_itm, "TR, ITC": tr_itc, "IR, ITC": ir_itc}, max_k
    )
    results: dict[str, Any] = {
        "itm": itm,
        "itc": itc,
        "config": {
            "annotations": str(annotations),
            "annotations_sha256": data.sha256,
            "format": data.format,
            "image_root": str(image_root),
            "images": len(data.images),
            "texts": len(data.texts),
            "k_test": k_test,
            "k_i2t": scores.k_i2t,
            "k_t2i": scores.k_t2i,
            "limit_images": limit_images,
            "chunk_pairs": chunk_pairs,
            "image_batch": image_batch or engine.batch_sizes.images,
        },
        "model": engine.info.as_dict(),
        "pairs": {
            "protocol": scores.pairs_protocol,
            "scored": scores.pairs_scored,
            "scored_this_run": scores.pairs_this_run,
        },
        "pairs_per_s": scores.pairs_per_second,
        "timings": {
            "images_s": scores.seconds["images"],
            "texts_s": scores.seconds["texts"],
            "itm_s": scores.seconds["itm"],
            "this_run_s": time.perf_counter() - started,
            "resumed": scores.resumed,
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "blipitm_version": __version__,
    }
    write_outputs(out, results, curves)
    return EvalRun(results, data)
