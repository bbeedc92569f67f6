"""Retrieval evaluation sets: BLIP's Karpathy-split JSON and COCO's captions JSON.

Ids follow BLIP's ``flickr30k_retrieval_eval`` / ``coco_karpathy_retrieval_eval``: images are
numbered in file order, captions in order within each image, so ``img2txt[i]`` lists image i's
caption ids and ``txt2img[t]`` is caption t's image. Captions are kept raw; the engine cleans
them (``pre_caption``, 30 words) under protocol blip, as BLIP's datasets do.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipitm.common.safeio import JSONDepthError, UnreadableFileError, loads_json, read_regular_file
from blipitm.errors import InvalidInputError

log = logging.getLogger("blipitm")

# Far above any real annotation file (COCO's largest captions file is ~100 MB).
MAX_ANNOTATION_BYTES = 2 << 30


@dataclass(frozen=True)
class RetrievalDataset:
    images: list[str]  # paths (image_root joined)
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[int]
    format: str  # "karpathy" or "coco"
    sha256: str  # of the annotation file


def load_annotations(
    annotations: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    *,
    limit_images: int | None = None,
    check_files: bool = True,
) -> RetrievalDataset:
    """Read ``annotations`` (either format) and resolve image paths under ``image_root``.

    Karpathy format: a list of ``{"image": relpath, "caption": [str, ...] | str}``; an image
    listed several times (the train-split layout, one caption per entry) has its captions
    merged in order. COCO format: ``{"images": [{"id", "file_name"}], "annotations":
    [{"image_id", "caption"}]}``. ``limit_images`` keeps the first N images and their captions.
    """
    path = Path(annotations)
    raw = _read(path)
    data = _parse(raw, path)
    if isinstance(data, list):
        fmt, entries = "karpathy", _karpathy(data, path)
    elif isinstance(data, dict) and "images" in data and "annotations" in data:
        fmt, entries = "coco", _coco(data, path)
    else:
        raise InvalidInputError(
            f"{path}: expected a Karpathy-split list of {{'image', 'caption'}} objects or a "
            "COCO captions file with 'images' and 'annotations'",
            loc=("annotations",),
        )
    if limit_images is not None:
        if limit_images < 1:
            raise InvalidInputError(f"must be >= 1, got {limit_images}", loc=("limit_images",))
        entries = entries[:limit_images]
    root = Path(image_root)
    images: list[str] = []
    texts: list[str] = []
    img2txt: list[list[int]] = []
    txt2img: list[int] = []
    for img_id, (rel, captions) in enumerate(entries):
        images.append(str(root / rel))
        ids = []
        for caption in captions:
            ids.append(len(texts))
            txt2img.append(img_id)
            texts.append(caption)
        img2txt.append(ids)
    if not images:
        raise InvalidInputError(f"{path} lists no images", loc=("annotations",))
    no_captions = sum(not ids for ids in img2txt)
    if no_captions:
        log.warning("%d images have no captions; they count as misses, as in BLIP", no_captions)
    if check_files:
        _check_files(images, root)
    digest = hashlib.sha256(raw).hexdigest()
    return RetrievalDataset(images, texts, img2txt, txt2img, fmt, digest)


def _read(path: Path) -> bytes:
    try:
        return read_regular_file(path, max_bytes=MAX_ANNOTATION_BYTES, what="annotation file")
    except UnreadableFileError as e:
        raise InvalidInputError(str(e), loc=("annotations",)) from None
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror or e}"
        raise InvalidInputError(msg, loc=("annotations",)) from None


def _parse(raw: bytes, path: Path) -> Any:
    """The JSON in ``raw``; every way it can be unreadable is one line naming the file."""
    try:
        return loads_json(raw)
    except UnicodeDecodeError as e:
        why = f"is not UTF-8 (byte {e.start} is {e.object[e.start : e.start + 1]!r})"
    except JSONDepthError as e:
        why = f"is not an annotation file: {e}"
    except ValueError as e:  # JSONDecodeError, or an integer over Python's 4300 digits
        if "4300" in str(e) or "digits" in str(e):
            why = "holds a number over 4300 digits long, more than Python reads as an integer"
        else:
            why = f"is not JSON: {e}"
    raise InvalidInputError(f"{path} {why}", loc=("annotations",))


def _karpathy(data: list[Any], path: Path) -> list[tuple[str, list[str]]]:
    by_image: dict[str, list[str]] = {}
    for n, ann in enumerate(data):
        if not isinstance(ann, dict) or not isinstance(ann.get("image"), str):
            raise InvalidInputError(f"{path}: entry {n} has no 'image' path", loc=("annotations",))
        caption = ann.get("caption", [])
        captions = [caption] if isinstance(caption, str) else caption
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise InvalidInputError(
                f"{path}: entry {n}: 'caption' must be a string or a list of strings",
                loc=("annotations",),
            )
        by_image.setdefault(ann["image"], []).extend(captions)
    return list(by_image.items())


def _coco(data: dict[str, Any], path: Path) -> list[tuple[str, list[str]]]:
    def bad(message: str) -> InvalidInputError:
        return InvalidInputError(f"{path}: {message}", loc=("annotations",))

    for key in ("images", "annotations"):
        if not isinstance(data[key], list):
            raise bad(f"'{key}' must be a list, got {_json_type(data[key])}")
    order: dict[int | str, str] = {}
    first: dict[int | str, int] = {}
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise bad(f"images[{n}] needs 'id' and 'file_name'")
        image_id = img["id"]
        if not _is_id(image_id):
            raise bad(f"images[{n}].id must be an integer or a string, got {_json_type(image_id)}")
        if image_id in first:
            raise bad(f"images[{n}].id {image_id!r} repeats images[{first[image_id]}].id")
        if not isinstance(img["file_name"], str):
            got = _json_type(img["file_name"])
            raise bad(f"images[{n}].file_name must be a string, got {got}")
        first[image_id] = n
        order[image_id] = img["file_name"]
    captions: dict[int | str, list[str]] = {k: [] for k in order}
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise bad(f"annotations[{n}] must be an object, got {_json_type(ann)}")
        image_id = ann.get("image_id")
        if not _is_id(image_id):
            got = _json_type(image_id)
            raise bad(f"annotations[{n}].image_id must be an integer or a string, got {got}")
        if image_id not in captions:
            raise bad(f"annotations[{n}] refers to no listed image")
        if not isinstance(ann.get("caption"), str):
            raise bad(f"annotations[{n}] has no caption string")
        captions[image_id].append(ann["caption"])
    return [(order[k], captions[k]) for k in order]


def _is_id(value: Any) -> bool:
    """COCO ids are integers; strings are accepted too. Not bools (``True == 1``) nor floats."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    names.update({int: "an integer", float: "a number", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _check_files(images: list[str], root: Path) -> None:
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        raise InvalidInputError(
            f"{len(missing)} of {len(images)} images are missing under {root}: {shown}; check "
            "--image-root",
            loc=("image_root",),
        )
