"""Reading input files: WebDataset tars as img2dataset writes them, and Parquet / JSONL / CSV
tables. One public ``read_*`` function per kind of file; :mod:`blipitm.filtering.formats` pairs
each with the file names it reads and the writer of its kept samples.

A reader yields :class:`Sample` records in order, one at a time (memory does not grow with the
file). An image is handed on undecoded (its bytes, or a path the engine reads on its decode
threads); a sample that cannot be scored carries a ``status`` instead of being dropped.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from blipitm.common.safeio import JSONDepthError, loads_json, read_regular_file

# What img2dataset writes (its encode formats) and what Pillow decodes.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Caps on what is read into memory. An encoded image (a tar member or a file a table names);
# a caption or metadata member (.txt, .json, .cls, ...), a JSONL line; a CSV field.
MAX_IMAGE_BYTES = 64 << 20
MAX_TEXT_BYTES = 1 << 20
MAX_LINE_BYTES = 16 << 20
# A CSV record spanning more lines than this is an unbalanced quote swallowing rows, not a
# caption with line breaks.
MAX_CSV_RECORD_LINES = 16
# img2dataset's parquet layout first, then common names.
IMAGE_COLS = ("jpg", "png", "webp", "image", "image_path", "path")
CAPTION_COL = "caption"
ID_COLS = ("key", "id")


@dataclass
class Sample:
    """One input sample. ``image``: bytes or a path (None when missing); ``captions``: the
    candidate captions (one for a plain caption, several for CapFilt lists)."""

    key: str
    image: bytes | str | None
    captions: list[str]
    status: str = "ok"  # "ok", or why the sample has no score
    error: str = ""
    # The original fields, in the shape of the reader that made the sample (tar members, a
    # table row): only the same format's kept-sample writer reads them.
    raw: Any = None


@dataclass(frozen=True)
class Columns:
    """Which table columns (or tar extension / KEY.json field) hold the image, caption(s) and
    id; None: the defaults (:data:`IMAGE_COLS`, :data:`CAPTION_COL`, :data:`ID_COLS`)."""

    image: str | None = None
    caption: str | None = None
    id: str | None = None


DEFAULT_COLUMNS = Columns()


# -- WebDataset ---------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def _member_cap(ext: str) -> int:
    last = ext.rsplit(".", 1)[-1]
    return MAX_IMAGE_BYTES if last in IMAGE_EXTS or ext not in _TEXT_EXTS else MAX_TEXT_BYTES


_TEXT_EXTS = ("txt", "json", "cls", "caption", "text")
_MAGIC: tuple[tuple[bytes, Callable[[Any], Any]], ...] = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
# tarfile's "a zero block": the end-of-archive marker (private in the stubs, public in the code).
_END_OF_ARCHIVE: type[Exception] = getattr(tarfile, "EOFHeaderError", tarfile.HeaderError)


def read_tar(path: str, columns: Columns, load_images: bool = True) -> Iterator[Sample]:
    """Members grouped by key (consecutive, as webdataset requires), streamed; ``.tar`` plain
    or compressed (gzip, bzip2, xz: found by content). ``load_images`` changes nothing: a
    tar's images are its members.

    Strict where ``tarfile`` is lenient: an archive must end with its end-of-archive block (a tar
    cut at or inside a member header otherwise just ends early), a compressed stream must end
    with its trailer (gzip/bz2/xz raise ``EOFError`` when cut), and a member's data must be whole.
    Members over their cap (:func:`_member_cap`) are skipped unread and make a status."""
    ends: list[Exception] = []  # the header error that ended the archive

    class Info(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> Any:
            try:
                return super().fromtarfile(tf)
            except tarfile.HeaderError as e:
                ends.append(e)
                raise

    key: str | None = None
    group: list[tuple[tarfile.TarInfo, bytes]] = []
    skipped: list[tuple[str, str]] = []  # (ext, why) of members over their cap
    seen: set[str] = set()  # keys of the groups before: one that comes back is not consecutive
    with open(path, "rb") as raw:
        head = raw.peek(6)[:6]
        opener = next((o for magic, o in _MAGIC if head.startswith(magic)), None)
        stream: Any = raw if opener is None else opener(raw)
        with stream, tarfile.open(fileobj=stream, mode="r|", tarinfo=Info) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = _split_name(info.name)
                if key is not None and k != key:
                    yield _tar_sample(key, group, skipped, columns, key in seen)
                    seen.add(key)
                    group, skipped = [], []
                key = k
                cap = _member_cap(ext)
                if info.size > cap:  # left unread: tarfile skips it in bounded reads
                    skipped.append(
                        (
                            ext,
                            f"{info.name} is {info.size} bytes, over the limit of "
                            f"{cap} for a .{ext} member",
                        )
                    )
                    continue
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is cut short")
                group.append((info, data))
            if not ends or not isinstance(ends[-1], _END_OF_ARCHIVE):
                why = f" ({ends[-1]})" if ends else ""
                raise tarfile.ReadError(
                    f"the archive ends at byte {tar.offset} without its end-of-archive block"
                    f"{why}: it was cut short"
                )
            while stream.read(1 << 20):  # the rest, so that a compressed stream's end is checked
                pass
    if key is not None:
        yield _tar_sample(key, group, skipped, columns, key in seen)


def _tar_sample(
    key: str,
    members: list[tuple[tarfile.TarInfo, bytes]],
    skipped: list[tuple[str, str]],
    cols: Columns,
    again: bool = False,
) -> Sample:
    fields = {_split_name(info.name)[1]: data for info, data in members}
    image = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
    if cols.image is not None:
        image = fields.get(cols.image)
    sample = Sample(key, image, [], raw=members)
    caption_ext = "json" if cols.caption is not None else "txt"
    for ext, why in skipped:
        if ext in IMAGE_EXTS or ext == cols.image:
            return _bad(sample, "bad_image", why)
        return _bad(sample, "bad_caption" if ext == caption_ext else "bad_sample", why)
    if again:
        return _bad(
            sample, "bad_sample", f"key {key} appears again: a sample's members must be consecutive"
        )
    exts = [_split_name(info.name)[1] for info, _ in members]
    twice = sorted({e for e in exts if exts.count(e) > 1})
    if twice:
        names = ", ".join(f"{key}.{e}" for e in twice)
        return _bad(sample, "bad_sample", f"{names} appear more than once in one sample")
    if cols.caption is not None:  # a field of KEY.json: a string or a list of candidates
        try:
            meta = loads_json(fields.get("json", b"{}"))
        except ValueError as e:
            return _bad(sample, "bad_caption", f"{key}.json is not JSON: {e}")
        set_captions(sample, meta.get(cols.caption) if isinstance(meta, dict) else None)
    elif "txt" in fields:  # a .txt is one caption, whatever it looks like
        set_captions(sample, fields["txt"].decode("utf-8", errors="replace"), json_list=False)
    else:
        _bad(sample, "no_caption", f"no {key}.txt")
    if image is None and sample.status == "ok":
        _bad(sample, "missing_image", f"no image member ({'/'.join(IMAGE_EXTS)}) for {key}")
    return sample


# -- tables -------------------------------------------------------------------------------


def read_parquet(path: str, columns: Columns, load_images: bool = True) -> Iterator[Sample]:
    """A Parquet table's rows as samples; see :func:`_table_samples`."""
    yield from _table_samples(_parquet_rows(path), path, columns, load_images)


def read_jsonl(path: str, columns: Columns, load_images: bool = True) -> Iterator[Sample]:
    """A JSONL table's rows as samples; see :func:`_jsonl_rows` and :func:`_table_samples`."""
    yield from _table_samples(_jsonl_rows(path), path, columns, load_images)


def read_delimited(
    path: str, columns: Columns, load_images: bool = True, *, dialect: type[csv.Dialect]
) -> Iterator[Sample]:
    """A CSV-like table's rows as samples (``dialect``: its delimiter and quoting); see
    :func:`_delimited_rows` and :func:`_table_samples`."""
    yield from _table_samples(_delimited_rows(path, dialect), path, columns, load_images)


class Tsv(csv.Dialect):
    """Tab-separated values as the IANA type defines them: no quoting (a field holds no tab
    and no line break), so a caption starting with a quote is read as written."""

    delimiter = "\t"
    quoting = csv.QUOTE_NONE
    lineterminator = "\n"
    strict = True


def _table_samples(
    rows: Iterator[dict[str, Any]], path: str, columns: Columns, load_images: bool
) -> Iterator[Sample]:
    """A table's image paths are read here (regular files under :data:`MAX_IMAGE_BYTES` only,
    relative to the table's folder), unless ``load_images`` is false (then ``image`` is the
    path)."""
    base = os.path.dirname(os.path.abspath(path))
    for i, row in enumerate(rows):
        yield _table_sample(row, i, base, columns, load_images)


def _parquet_rows(path: str) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=256):
            yield from batch.to_pylist()


def _jsonl_rows(path: str) -> Iterator[dict[str, Any]]:
    """One dict per non-blank line; a line that is not a JSON object (or nests too deep, or is
    over :data:`MAX_LINE_BYTES`) is a ``bad_row``."""
    with open(path, "rb") as f:
        line_no = 0
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            line_no += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of the line unread
                yield {"__error__": f"line {line_no} is over the limit of {MAX_LINE_BYTES} bytes"}
                continue
            if not line.strip():
                continue
            try:
                row = loads_json(line)
            except ValueError as e:
                yield {"__error__": f"line {line_no} is not JSON: {e}"}
                continue
            yield row if isinstance(row, dict) else {"__error__": f"line {line_no}: not an object"}


def _delimited_rows(path: str, dialect: type[csv.Dialect]) -> Iterator[dict[str, Any]]:
    """Rows by header. An unbalanced quote (a record running to the end of the file, or over
    :data:`MAX_CSV_RECORD_LINES` lines, or a field over the csv module's limit) raises
    ``csv.Error`` naming the line the record starts on; a row with too few or too many fields is
    a ``bad_row``."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, dialect, strict=True)
        header: list[str] | None = None
        last = 0
        while True:
            start = last + 1
            try:
                record = next(reader, None)
            except csv.Error as e:
                raise csv.Error(f"line {start}: {e} (an unbalanced quote?)") from None
            if record is None:
                return
            if reader.line_num - last > MAX_CSV_RECORD_LINES:
                raise csv.Error(
                    f"line {start}: a record spans {reader.line_num - last} lines (more than "
                    f"{MAX_CSV_RECORD_LINES}): an unbalanced quote?"
                )
            last = reader.line_num
            if header is None:
                header = record
                continue
            if not record:
                continue
            if len(record) != len(header):
                yield {
                    "__error__": f"line {start} has {len(record)} fields, the header {len(header)}"
                }
                continue
            yield dict(zip(header, record, strict=True))


def _pick(row: dict[str, Any], name: str | None, defaults: Sequence[str]) -> str | None:
    if name is not None:
        return name
    return next((c for c in defaults if c in row), None)


def _table_sample(
    row: dict[str, Any], i: int, base: str, cols: Columns, load_images: bool = True
) -> Sample:
    id_col = _pick(row, cols.id, ID_COLS)
    key = str(row[id_col]) if id_col is not None and row.get(id_col) is not None else str(i)
    sample = Sample(key, None, [], raw=row)
    if "__error__" in row:
        return _bad(sample, "bad_row", row["__error__"])
    set_captions(sample, row.get(cols.caption or CAPTION_COL))
    image_col = _pick(row, cols.image, IMAGE_COLS)
    cell = row.get(image_col) if image_col is not None else None
    if isinstance(cell, dict):  # Hugging Face datasets' Image struct
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)) and cell:
        sample.image = bytes(cell)
    elif isinstance(cell, str) and cell:
        path = cell if os.path.isabs(cell) else os.path.join(base, cell)
        sample.image = path
        if load_images and sample.status == "ok":
            _load_path(sample, path, i)
    elif sample.status == "ok":
        _bad(sample, "missing_image", f"row {i} has no image in column {image_col!r}")
    return sample


def _load_path(sample: Sample, path: str, i: int) -> None:
    """Read the image file a table row names: a regular file (symlinks followed) under
    :data:`MAX_IMAGE_BYTES`; a FIFO, a device, a folder or a missing file is a ``bad_image``."""
    try:
        sample.image = read_regular_file(path, max_bytes=MAX_IMAGE_BYTES, what="image file")
    except FileNotFoundError:
        _bad(sample, "bad_image", f"row {i}: no such image file {path!r}")
    except (OSError, ValueError) as e:
        _bad(sample, "bad_image", f"row {i}: {e}")


def set_captions(sample: Sample, cell: Any, *, json_list: bool = True) -> None:
    """``cell``'s captions: a string, a list of strings, or (``json_list``: table cells, CSV's
    only way to hold a list) a JSON list written as text."""
    if json_list and isinstance(cell, str) and cell.startswith("["):
        try:
            cell = loads_json(cell)
        except JSONDepthError as e:
            _bad(sample, "bad_caption", f"a caption list nested too deep: {e}")
            return
        except ValueError:
            pass  # a caption that starts with "[": one caption, as written
    if isinstance(cell, str):
        cell = [cell]
    if not isinstance(cell, (list, tuple)) or not cell:
        _bad(sample, "no_caption", "no caption")
        return
    if not all(isinstance(c, str) for c in cell):
        _bad(sample, "bad_caption", "captions must be strings")
        return
    sample.captions = list(cell)


def _bad(sample: Sample, status: str, error: str) -> Sample:
    sample.status, sample.error = status, error
    return sample
