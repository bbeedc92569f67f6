"""What ``index build SRC`` / ``index add SRC`` read: a folder of images, a captions file, JSONL.

Every item gets a stable ``source`` key (absolute image path, or ``file:line`` for a caption from
a file) so that a rerun after an interruption skips what is already indexed, and each image the
path search results show (never a server's absolute paths): for a folder, the folder's name and
the path inside it (``photos/2024/a.jpg``), so that images of two folders are told apart; for a
JSONL file, the path as the file wrote it, relative to the file's folder. Items that cannot even be
described (a malformed JSONL line, nested JSON included) are returned as skipped with a reason,
never fatal; files in a folder without an image extension are counted (``ignored``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from blipitm.common.safeio import loads_json
from blipitm.errors import InvalidInputError
from blipitm.retrieval.store import NewItem

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".ppm", ".pgm"}
)
TEXT_EXTENSIONS = frozenset({".txt", ".text", ".captions"})
JSONL_EXTENSIONS = frozenset({".jsonl", ".ndjson"})


@dataclass
class SourceListing:
    items: list[NewItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    ignored: int = 0  # files of a folder without an image extension (hidden ones not counted)


def list_source(src: str | os.PathLike[str]) -> SourceListing:
    """Items of ``src``: a folder (images, recursive, sorted), a text file (one caption a line),
    a JSONL file (``{"image": path}`` or ``{"text": ...}`` per line, other keys kept as metadata;
    relative image paths are relative to the JSONL file), or a single image file."""
    path = Path(src)
    if path.is_dir():
        return _list_folder(path)
    if not path.exists():
        raise InvalidInputError(f"{src} does not exist", loc=("source",))
    if not path.is_file():  # a FIFO or a device: opening or reading it would never end
        raise InvalidInputError(f"{src} is not a regular file or a folder", loc=("source",))
    suffix = path.suffix.lower()
    if suffix in JSONL_EXTENSIONS:
        return _list_jsonl(path)
    if suffix in TEXT_EXTENSIONS:
        return _list_captions(path)
    if suffix in IMAGE_EXTENSIONS:
        p = str(path.resolve())
        return SourceListing([NewItem("image", p, path=p, relpath=path.name)])
    raise InvalidInputError(
        f"{src}: cannot tell what this is from its extension; pass a folder of images, a "
        f"captions file ({', '.join(sorted(TEXT_EXTENSIONS))}) or JSONL "
        f"({', '.join(sorted(JSONL_EXTENSIONS))})",
        loc=("source",),
    )


def _list_folder(root: Path) -> SourceListing:
    found: list[tuple[str, str]] = []  # (absolute, what results show)
    prefix = root.resolve().name  # "" for "/"
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # e.g. .git, .cache
        for name in filenames:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            file = Path(dirpath) / name
            rel = file.relative_to(root).as_posix()
            found.append((str(file.resolve()), f"{prefix}/{rel}" if prefix else rel))
    items = [NewItem("image", p, path=p, relpath=rel) for p, rel in sorted(found)]
    return SourceListing(items, ignored=ignored)


def _list_captions(path: Path) -> SourceListing:
    out = SourceListing()
    base = str(path.resolve())
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                out.items.append(NewItem("text", f"{base}:{lineno}", text=text))
    return out


def _list_jsonl(path: Path) -> SourceListing:
    out = SourceListing()
    base = path.resolve()
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            key = f"{base}:{lineno}"
            try:
                obj = loads_json(line)  # nesting past the stack is a ValueError here too
            except ValueError as e:
                out.skipped.append((key, f"invalid JSON: {getattr(e, 'msg', e)}"))
                continue
            if not isinstance(obj, dict) or ("image" in obj) == ("text" in obj):
                out.skipped.append((key, 'expected an object with exactly one of "image", "text"'))
                continue
            meta = {k: v for k, v in obj.items() if k not in ("image", "text")}
            if "image" in obj:
                if not isinstance(obj["image"], str) or not obj["image"]:
                    out.skipped.append((key, '"image" must be a non-empty path string'))
                    continue
                file = base.parent / obj["image"]
                p = str(file.resolve())
                rel = Path(os.path.relpath(file, base.parent)).as_posix()
                out.items.append(NewItem("image", p, path=p, metadata=meta, relpath=rel))
            else:
                if not isinstance(obj["text"], str):
                    out.skipped.append((key, '"text" must be a string'))
                    continue
                out.items.append(NewItem("text", key, text=obj["text"], metadata=meta))
    return out
