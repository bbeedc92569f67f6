"""The image side of a checkpoint's preprocessing: output size and normalisation constants,
read from a Hugging Face processor config, refusing any config that asks for another pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from blipitm.config import IMAGE_MEAN, IMAGE_STD
from blipitm.errors import InvalidInputError


@dataclass(frozen=True)
class ImageSettings:
    """The image side of a checkpoint's preprocessing: output size and normalisation constants.

    Resize filter (bicubic), rescale (1/255) and RGB handling are not settings: BLIP's pipeline
    fixes them, and :meth:`from_processor_dict` rejects configs that ask for anything else rather
    than silently computing different pixels.
    """

    size: int = 384
    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise InvalidInputError(f"must be a positive int, got {self.size!r}", loc=("size",))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise InvalidInputError(f"needs 3 values (R, G, B), got {value!r}", loc=(name,))
        if any(s <= 0 for s in self.std):
            raise InvalidInputError(f"values must be positive, got {self.std!r}", loc=("std",))

    @classmethod
    def from_processor_dict(cls, d: dict[str, Any]) -> ImageSettings:
        """Read a Hugging Face ``preprocessor_config.json`` (or ``processor_config.json``) dict.

        ``processor_config.json`` nests the image processor under ``"image_processor"``. Missing
        keys keep the BLIP defaults, as transformers' ``BlipImageProcessor`` would.
        """
        if isinstance(d.get("image_processor"), dict):
            d = d["image_processor"]
        _check_pipeline_flags(d)
        size = cls.size
        if "size" in d:
            size = _square_size(d["size"])
        mean = _rgb_triple(d["image_mean"], "image_mean") if "image_mean" in d else cls.mean
        std = _rgb_triple(d["image_std"], "image_std") if "image_std" in d else cls.std
        return cls(size=size, mean=mean, std=std)


def _square_size(value: Any) -> int:
    """``size`` as transformers writes it: ``{"height": h, "width": w}`` (or a bare int, older)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict) and "height" in value and "width" in value:
        height, width = value["height"], value["width"]
        if height != width:
            raise InvalidInputError(
                f"BLIP resizes to a square, but the config asks for {height}x{width}",
                loc=("size",),
            )
        return int(height)
    raise InvalidInputError(
        f'expected {{"height": N, "width": N}} or an int, got {value!r}', loc=("size",)
    )


def _rgb_triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        value = [value] * 3  # transformers broadcasts a scalar to every channel
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise InvalidInputError(f"expected 3 numbers, got {value!r}", loc=(name,))
    r, g, b = (float(v) for v in value)
    return (r, g, b)


def _check_pipeline_flags(d: dict[str, Any]) -> None:
    """Refuse processor configs that describe a pipeline other than BLIP's."""
    expected: dict[str, Any] = {
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "do_center_crop": False,
        "resample": int(Image.Resampling.BICUBIC),
    }
    for key, want in expected.items():
        if key in d and d[key] is not None and d[key] != want:
            raise InvalidInputError(
                f"blipitm implements BLIP's fixed preprocessing, which needs {key}={want!r}; "
                f"the config says {d[key]!r}",
                loc=(key,),
            )
    factor = d.get("rescale_factor")
    if factor is not None and abs(float(factor) - 1 / 255) > 1e-12:
        raise InvalidInputError(
            f"blipitm rescales by 1/255 as BLIP does; the config says {factor!r}",
            loc=("rescale_factor",),
        )
