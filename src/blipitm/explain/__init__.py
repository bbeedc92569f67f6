"""Explanations of a match: Grad-CAM maps of one cross-attention layer, as LAVIS computes them,
and their rendering over the image. Torch-free: the engine computes the maps
(:mod:`blipitm.engine.gradcam`), this package holds and draws them."""

from __future__ import annotations

from blipitm.explain.explanation import DEFAULT_LAYER, Explanation, resolve_layer
from blipitm.explain.render import gaussian_blur, overlay, token_grid

__all__ = [
    "DEFAULT_LAYER",
    "Explanation",
    "gaussian_blur",
    "overlay",
    "resolve_layer",
    "token_grid",
]
