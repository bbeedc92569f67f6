"""The record :meth:`blipitm.Engine.explain` returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from blipitm.errors import InvalidInputError
from blipitm.explain.render import overlay

DEFAULT_LAYER = 6  # LAVIS's default (block_num=6 in its ITM demos)


def resolve_layer(layer: int | None, num_layers: int) -> int:
    """``layer``, checked; None: LAVIS's layer 6, or the second to last layer of a shallower model
    (the last layer's maps are zero for the caption's tokens: only the first token's row of its
    cross-attention reaches the ITM head)."""
    if layer is None:
        return max(0, min(DEFAULT_LAYER, num_layers - 2))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise InvalidInputError(
            f"must be a text-encoder layer from 0 to {num_layers - 1}, got {layer!r}",
            loc=("layer",),
        )
    return layer


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
    text_tokens: int  # tokens the model read, [CLS]/[ENC] and [SEP] included (as count_tokens)

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
