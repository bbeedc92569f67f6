"""Drawing a map over an image the way LAVIS's ``lavis/common/gradcam.py: getAttMap`` does.

getAttMap: min-max normalise the map; resize it to the image (bicubic); Gaussian blur with
``sigma = 0.02 * max(H, W)``; min-max normalise again; colour it with matplotlib's ``jet``; blend
``(1 - a**0.7) * img + a**0.7 * jet(a)`` with ``img`` in [0, 1]. Two deliberate differences: the
resize is PIL's bicubic (getAttMap uses scikit-image's cubic spline; both interpolate with cubics),
and a map that is constant stays all zeros where getAttMap would divide by zero (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

BLUR_SIGMA = 0.02  # of the image's longer side (getAttMap)
GAMMA = 0.7  # blend weight a**0.7 (getAttMap)
TRUNCATE = 4.0  # kernel radius in sigmas, as scikit-image / scipy.ndimage


def _unit(x: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; all zeros when ``x`` is constant."""
    x = x - x.min()
    top = x.max()
    return x / top if top > 0 else x


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``[n, n]`` matrix applying a 1-D Gaussian along an axis, edges extended ("nearest").

    As a matrix, one blur is two matrix products, fast for any sigma; scikit-image's ``gaussian``
    (scipy.ndimage's mode="nearest", truncate=4) gives the same numbers.
    """
    radius = int(TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    m = np.zeros((n, n), dtype=np.float64)
    rows = np.arange(n)
    for o, w in zip(offsets, weights, strict=True):
        np.add.at(m, (rows, np.clip(rows + o, 0, n - 1)), w)
    return m


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """2-D Gaussian blur of ``x [H, W]`` (edges extended), float64."""
    if sigma <= 0:
        return x.astype(np.float64)
    h, w = x.shape
    return _blur_matrix(h, sigma) @ x.astype(np.float64) @ _blur_matrix(w, sigma).T


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` float64 in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
    return image.astype(np.float64) / 255


def heat(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """getAttMap's blend weight ``a [H, W]`` in [0, 1] for ``cam [g, g]`` over an image of
    ``size = (W, H)``."""
    width, height = size
    a = _unit(np.asarray(cam, dtype=np.float32))
    up = Image.fromarray(a, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    blurred = gaussian_blur(np.asarray(up), BLUR_SIGMA * max(width, height))
    return _unit(blurred)


def overlay(image: Image.Image | np.ndarray, cam: np.ndarray) -> Image.Image:
    """``cam [g, g]`` drawn over ``image`` (PIL image or HxWx3 uint8), at the image's size."""
    from matplotlib import colormaps  # only when drawing

    rgb = _as_rgb(image)  # [H, W, 3]
    a = heat(cam, (rgb.shape[1], rgb.shape[0]))[..., None]  # [H, W, 1]
    jet = colormaps["jet"](a[..., 0])[..., :3]  # [H, W, 3], alpha dropped
    blend = (1 - a**GAMMA) * rgb + a**GAMMA * jet
    return Image.fromarray(np.round(np.clip(blend, 0, 1) * 255).astype(np.uint8), "RGB")


def token_grid(
    image: Image.Image | np.ndarray,
    cams: Sequence[np.ndarray],
    titles: Sequence[str],
    *,
    columns: int = 6,
    tile_inches: float = 2.0,
) -> Image.Image:
    """One overlay per map in a grid, each titled (per-token maps titled with their words)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, safe off the main thread

    n = max(1, len(cams))
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(cols * tile_inches, rows * (tile_inches + 0.3)), dpi=100)
    canvas = FigureCanvasAgg(fig)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i < len(cams):
            ax.imshow(overlay(image, cams[i]))
            ax.set_title(titles[i], fontsize=10)
    fig.tight_layout()
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy(), "RGB")
