"""The record :meth:`blipitm.Engine.explain` returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from blipitm.errors import InvalidInputError
from blipitm.explain.render import overlay


@dataclass(frozen=True, eq=False)
class Explanation:
    """Where a caption matches an image, by LAVIS's Grad-CAM on one cross-attention layer.

    ``token_maps[i]`` is the map of ``tokens[i]``, the caption's word pieces as the model read
    them (after the protocol's cleanup and truncation; not the first token, not ``[SEP]``);
    ``map`` is their mean. Maps are over the image's patch grid (24x24 for 384/16), row-major from
    the top left, non-negative, and unnormalised (their scale is the gradient's).
    """

    text: str
    tokens: list[str]  # [L] word pieces
    token_maps: np.ndarray  # [L, grid, grid] float32
    map: np.ndarray  # [grid, grid] float32, mean of token_maps (zeros when L == 0)
    itm_probability: float
    itm_logits: np.ndarray  # [2] float32, class 1 = match
    itc_cosine: float
    layer: int  # text-encoder layer, 0-based
    image: np.ndarray  # [S, S, 3] uint8: the model's input (resized) image the maps cover

    @property
    def grid(self) -> int:
        return int(self.map.shape[-1])

    def overlay(
        self, token: int | None = None, *, image: Image.Image | np.ndarray | None = None
    ) -> Image.Image:
        """The caption's map (or ``tokens[token]``'s) over the image, as LAVIS's ``getAttMap``
        draws it; over ``image`` (any size, e.g. the original) instead of the model's input when
        given."""
        if token is None:
            cam = self.map
        elif -len(self.tokens) <= token < len(self.tokens):
            cam = self.token_maps[token]
        else:
            raise InvalidInputError(
                f"token {token} is out of range: the caption has {len(self.tokens)} tokens",
                loc=("token",),
            )
        return overlay(self.image if image is None else image, cam)
