"""BLIP's retrieval evaluation (Flickr30k / COCO Karpathy test): score matrices and recalls.

>>> from blipitm.evaluation import score_matrices, itm_eval
>>> i2t, t2i = score_matrices(engine, image_paths, captions, k_test=128)
>>> itm_eval(i2t, t2i, txt2img, img2txt)["r_mean"]
"""

from blipitm.evaluation.dataset import RetrievalDataset, load_annotations
from blipitm.evaluation.matrices import EvalScores, compute_scores, score_matrices
from blipitm.evaluation.metrics import itm_eval, retrieval_ranks
from blipitm.evaluation.run import EvalRun, evaluate

__all__ = [
    "EvalRun",
    "EvalScores",
    "RetrievalDataset",
    "compute_scores",
    "evaluate",
    "itm_eval",
    "load_annotations",
    "retrieval_ranks",
    "score_matrices",
]
