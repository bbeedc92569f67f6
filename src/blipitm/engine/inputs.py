"""What the public API accepts, told apart and checked before any work starts.

One image or a list of them, one text or a list; a path read into bytes where it is decoded. Each
failure is an :class:`InvalidInputError` naming the argument (``images[1]``), so every entry
point reports a bad input the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from blipitm.errors import InvalidInputError, Loc
from blipitm.processing.image import ResizedImage

IMAGE_KINDS = "PIL.Image, path, encoded bytes or HxWx3 uint8 array"


def is_image(x: Any) -> bool:
    """One image, as opposed to a list of them (an array of 2 or 3 dimensions is one)."""
    if isinstance(x, np.ndarray):
        return x.ndim in (2, 3)
    return isinstance(
        x, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview, ResizedImage)
    )


def is_text(x: Any) -> bool:
    return isinstance(x, str)


def as_list(x: Any, is_single: Callable[[Any], bool]) -> tuple[list[Any], bool]:
    """``x`` as a list, and whether it was a single item (which callers may broadcast)."""
    if is_single(x):
        return [x], True
    if isinstance(x, (list, tuple)):
        return list(x), False
    if isinstance(x, np.ndarray) and x.ndim == 4:
        return list(x), False  # [N, H, W, 3]: N images
    raise InvalidInputError(f"expected one item or a list of items, got {type(x).__name__}")


def check_images(images: Any, loc: Loc) -> None:
    """Every item of ``images`` is one image; else the first that is not, by position."""
    for i, item in enumerate(images):
        if not is_image(item):
            raise InvalidInputError(
                f"expected an image ({IMAGE_KINDS}), got {type(item).__name__}", loc=(*loc, i)
            )


def reject_single(candidates: Any, is_single: Callable[[Any], bool], loc: Loc, hint: str) -> None:
    # A lone str (or image) would otherwise be iterated character by character (or row by row).
    if is_single(candidates):
        raise InvalidInputError(
            f"expected a list of candidates, got a single {type(candidates).__name__}; "
            f"wrap it in a list: {hint}",
            loc=loc,
        )


def check_rank_ks(top_k: int | None, rerank_k: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise InvalidInputError(f"must be >= 1 or None, got {top_k}", loc=("top_k",))
    if rerank_k is not None and rerank_k < 1:
        raise InvalidInputError(f"must be >= 1 or None, got {rerank_k}", loc=("rerank_k",))


def read_if_path(item: Any, loc: Loc) -> Any:
    """A path's bytes (so its cache key is its content, not its name); anything else as is."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            return path.read_bytes()
        except IsADirectoryError:
            raise InvalidInputError(f"{path} is a directory, not an image file", loc=loc) from None
        except OSError as e:
            raise InvalidInputError(
                f"cannot read image file {path}: {e.strerror or e}", loc=loc
            ) from None
    return item
