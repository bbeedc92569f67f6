"""What makes an index trustworthy: the manifest's shape, and checksums of everything committed.

Each committed batch records, in the same SQLite transaction as its rows, the SHA-256 of the bytes
it appended to the array files; creating an index records the SHA-256 of ``manifest.json``.
Damage that keeps every size intact (a zeroed block, reordered rows, NaN over a vector, an edited
manifest) therefore shows as a mismatch instead of as quietly wrong rankings.

What is checked when:

- every open (reader or writer): the manifest's shape and checksum, the SQLite schema and row
  counts, that every item's metadata is a JSON object, file sizes, and the embeddings' checksums
  (the same bytes one search scans, so opening costs about one query);
- ``blipitm index verify`` (:meth:`Index.verify`): all of that, plus the features' checksums
  (~0.9 MB per image, too much to read on every open) and SQLite's own ``integrity_check``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipitm.retrieval.errors import IndexDamagedError, IndexFormatError

READ_CHUNK = 1 << 22  # bytes hashed per read; bounds memory for any batch size


@dataclass(frozen=True)
class Batch:
    """One committed batch: where its rows start in each array file and their checksums."""

    first_row: int
    rows: int
    first_feature_row: int
    feature_rows: int
    embeddings_sha256: str
    features_sha256: str | None


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path, offset: int, length: int) -> str:
    """SHA-256 of ``length`` bytes of ``path`` from ``offset`` (read in bounded chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                break  # a short file hashes differently from what was committed
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def parse_manifest(root: Path, raw: bytes, *, format_name: str, version: int) -> dict[str, Any]:
    """``manifest.json``'s content, or IndexFormatError naming the index and what is wrong."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise IndexDamagedError(f"index {root}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise IndexDamagedError(
            f"index {root}: manifest.json holds a {type(manifest).__name__}, not an object"
        )
    if manifest.get("format") != format_name:
        raise IndexFormatError(
            f"{root} is not a blipitm index (manifest format {manifest.get('format')!r}); "
            "create one with 'blipitm index build SRC --out INDEX'"
        )
    if manifest.get("format_version") != version:
        raise IndexFormatError(
            f"index {root} has format version {manifest.get('format_version')!r}, this blipitm "
            f"reads version {version} (indexes with checksums); rebuild it with "
            "'blipitm index build SRC --out NEW_INDEX'"
        )
    problems = _manifest_problems(manifest)
    if problems:
        raise IndexDamagedError(f"index {root}: manifest.json is damaged: {'; '.join(problems)}")
    return manifest


def check_tiling(root: Path, batches: Sequence[Batch], rows: int, feature_rows: int) -> None:
    """The batches must cover rows [0, rows) and feature rows [0, feature_rows) in order."""
    row = frow = 0
    for b in batches:
        if b.first_row != row or b.first_feature_row != frow:
            break
        row, frow = row + b.rows, frow + b.feature_rows
    if (row, frow) != (rows, feature_rows):
        raise IndexDamagedError(
            f"index {root}: the checksummed batches cover {row} rows and {frow} feature rows "
            f"but {rows} and {feature_rows} are committed; the database is damaged, rebuild "
            "the index"
        )


def check_checksums(
    root: Path, batches: Sequence[Batch], file: Path, row_bytes: int, *, features: bool = False
) -> None:
    """Each batch's rows of ``file`` (embeddings, or features) against its recorded checksum."""
    for b in batches:
        first, n, want = (
            (b.first_feature_row, b.feature_rows, b.features_sha256)
            if features
            else (b.first_row, b.rows, b.embeddings_sha256)
        )
        if file_digest(file, first * row_bytes, n * row_bytes) != want:
            raise IndexDamagedError(
                f"index {root}: {file.name} rows {first}..{first + n - 1} do not match their "
                "checksum (the file was changed after they were written); rebuild the index"
            )


def _is_int(v: Any, *, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _manifest_problems(m: dict[str, Any]) -> list[str]:
    out: list[str] = []
    model = m.get("model")
    if not isinstance(model, dict):
        out.append("'model' is missing or not an object")
        model = {}
    for key in ("source", "protocol", "dtype"):
        if not isinstance(model.get(key), str):
            out.append(f"'model.{key}' is missing or not a string")
    if not isinstance(model.get("probe"), dict):
        out.append("'model.probe' is missing or not an object")
    dim = m.get("embedding_dim")
    if not _is_int(dim):
        out.append("'embedding_dim' is missing or not a positive integer")
    elif model.get("embedding_dim") != dim:
        out.append(
            f"'embedding_dim' {dim} differs from 'model.embedding_dim' {model.get('embedding_dim')}"
        )
    if m.get("embedding_dtype") != "float32":
        out.append("'embedding_dtype' must be 'float32'")
    features = m.get("store_features")
    if not isinstance(features, bool):
        out.append("'store_features' is missing or not true/false")
    elif features:
        shape = m.get("feature_shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(map(_is_int, shape))):
            out.append("'feature_shape' must be [tokens, width] when features are stored")
        if m.get("feature_dtype") != "float16":
            out.append("'feature_dtype' must be 'float16' when features are stored")
    return out
