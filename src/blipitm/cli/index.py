"""``blipitm index build|add|remove|info|verify``: the on-disk retrieval index.

The ``run_*`` functions import :mod:`blipitm.retrieval` themselves; torch loads with the model.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from blipitm.cli.common import add_model_options, check_positive, load_engine, plural
from blipitm.cli.progress import ConsoleProgress
from blipitm.common.progress import no_progress
from blipitm.retrieval.ingest import DEFAULT_BATCH  # torch-free

if TYPE_CHECKING:
    from blipitm.retrieval import AddReport, Index

SOURCE_HELP = (
    "a folder of images (recursive), a captions file (.txt, one per line) or a JSONL file of "
    '{"image": path} / {"text": caption} objects (other keys are kept as metadata)'
)
SHOW_SKIPPED = 20


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description="Build and maintain an on-disk index of image and caption embeddings.",
    )
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = isub.add_parser(
        "build",
        help="create an index (or resume an interrupted build)",
        description="Embed SRC into a new index at --out. Rerun the same command to resume "
        "after an interruption; an existing index built from other sources is refused ('index "
        "add' adds to it). Unreadable files (and anything that is not a regular file, or is over "
        "512 MiB) are skipped and listed; files without an image extension are counted.",
    )
    b.add_argument("sources", nargs="+", metavar="SRC", help=SOURCE_HELP)
    b.add_argument("--out", required=True, metavar="INDEX", help="index folder")
    b.add_argument(
        "--store-features",
        action="store_true",
        help="also keep half-precision vision tokens, so text->image reranking never re-encodes "
        "images (base model: ~0.9 MB per image)",
    )
    _common(b, from_index=False)
    b.set_defaults(run=run_build)

    a = isub.add_parser("add", help="add items to an index", description="Add SRC to INDEX.")
    a.add_argument("index", metavar="INDEX")
    a.add_argument("sources", nargs="+", metavar="SRC", help=SOURCE_HELP)
    a.add_argument(
        "--include-removed",
        action="store_true",
        help="also re-add items that were removed from the index (skipped by default)",
    )
    _common(a, from_index=True)
    a.set_defaults(run=run_add)

    r = isub.add_parser(
        "remove",
        help="remove items by id or path",
        description="Remove items (by id, image path or source key); they are never returned "
        "by searches again.",
    )
    r.add_argument("index", metavar="INDEX")
    r.add_argument("refs", nargs="+", metavar="ID_OR_PATH")
    r.set_defaults(run=run_remove)

    i = isub.add_parser("info", help="describe an index", description="Describe INDEX.")
    i.add_argument("index", metavar="INDEX")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(run=run_info)

    v = isub.add_parser(
        "verify",
        help="check an index for damage",
        description="Check INDEX against the checksums recorded when each batch was committed "
        "(embeddings and stored features) and run SQLite's integrity check. Exit 0 when all "
        "is intact, 2 with one line saying what is damaged.",
    )
    v.add_argument("index", metavar="INDEX")
    v.set_defaults(run=run_verify)


def _common(p: argparse.ArgumentParser, *, from_index: bool) -> None:
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"items per committed batch (default {DEFAULT_BATCH})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    add_model_options(p, from_index=from_index)


def run_build(args: argparse.Namespace) -> int:
    from blipitm.retrieval import build_index, check_build_target, list_sources

    # Everything that fails without the model fails before it loads.
    check_positive(args.batch_size, "batch_size")
    listing = list_sources(args.sources)
    check_build_target(args.sources, args.out)
    engine = load_engine(args)
    progress = ConsoleProgress()
    try:
        index, report = build_index(
            engine,
            args.sources,
            args.out,
            store_features=args.store_features,
            batch_size=args.batch_size,
            progress=no_progress if args.no_progress else progress,
            listing=listing,
        )
    finally:
        progress.close()
    with index:
        _print_report(index, report)
    return 0


def run_add(args: argparse.Namespace) -> int:
    from blipitm.retrieval import Index, add_sources, list_sources

    # Everything that fails without the model fails before it loads.
    check_positive(args.batch_size, "batch_size")
    with Index.open(args.index) as opened:  # missing or damaged: one line, exit 2
        manifest = opened.manifest
    listing = list_sources(args.sources)
    engine = load_engine(args, manifest=manifest)
    progress = ConsoleProgress()
    with Index.open(args.index, engine, writable=True) as index:
        try:
            report = add_sources(
                index,
                engine,
                args.sources,
                batch_size=args.batch_size,
                include_removed=args.include_removed,
                progress=no_progress if args.no_progress else progress,
                listing=listing,
            )
        finally:
            progress.close()
        _print_report(index, report)
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from blipitm.retrieval import Index

    with Index.open(args.index, writable=True) as index:
        removed, missing = index.remove(args.refs)
    for item in removed:
        print(f"removed {item.id}\t{item.kind}\t{item.path or item.text}")
    for ref in missing:
        print(f"not found: {ref}")
    return 0 if not missing else 1


def run_info(args: argparse.Namespace) -> int:
    from blipitm.retrieval import Index

    with Index.open(args.index) as index:
        info = describe(index)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    m = info["model"]
    print(f"index:     {info['path']}")
    print(
        f"items:     {plural(info['images'], 'image')}, {plural(info['texts'], 'text')} "
        f"({info['removed']} removed)"
    )
    print(f"model:     {m['source']} (revision {m['revision']}, commit {m['commit']})")
    print(f"protocol:  {m['protocol']}, built in {m['dtype']}, {info['embedding_dim']}-d")
    print(f"features:  {'stored (float16)' if info['store_features'] else 'not stored'}")
    print(f"created:   {info['created']} with blipitm {info['blipitm_version']}")
    print(f"skipped:   {len(info['skipped'])}")
    for s in info["skipped"][:SHOW_SKIPPED]:
        print(f"  {s['source']}: {s['reason']}")
    if len(info["skipped"]) > SHOW_SKIPPED:
        print(f"  ... and {len(info['skipped']) - SHOW_SKIPPED} more (--json lists all)")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from blipitm.retrieval import Index

    with Index.open(args.index) as index:  # raises IndexDamagedError: main prints it, exit 2
        checked = index.verify()
    frows = plural(checked["feature_rows"], "feature row")
    features = f" and {frows}" if index.has_features else ""
    print(
        f"{index.path}: ok ({plural(checked['rows'], 'row')}{features} in "
        f"{plural(checked['batches'], 'batch', 'batches')} match their checksums; SQLite "
        "integrity ok)"
    )
    return 0


def describe(index: Index) -> dict[str, Any]:
    counts = index.counts()
    model = {k: v for k, v in index.manifest["model"].items() if k != "probe"}
    return {
        "path": str(index.path),
        "images": counts["image"],
        "texts": counts["text"],
        "removed": counts["removed"],
        "rows": index.committed()[0],
        "model": model,
        "embedding_dim": index.dim,
        "store_features": index.has_features,
        "created": index.manifest.get("created"),
        "blipitm_version": index.manifest.get("blipitm_version"),
        "skipped": [{"source": s, "reason": r} for s, r in index.skipped()],
    }


def _print_report(index: Index, report: AddReport) -> None:
    counts = index.counts()
    print(
        f"{index.path}: added {report.added}, already indexed {report.already}, skipped "
        f"{len(report.skipped)}; now {plural(counts['image'], 'image')}, "
        f"{plural(counts['text'], 'text')}"
    )
    if report.ignored:
        print(
            f"  ignored {plural(report.ignored, 'file')} without an image extension (not indexed)"
        )
    if report.removed_before:
        were = "item was" if report.removed_before == 1 else "items were"
        print(
            f"  {report.removed_before} {were} removed earlier and were not re-added "
            "(index add --include-removed re-adds them)"
        )
    for source, reason in report.skipped[:SHOW_SKIPPED]:
        print(f"  skipped {source}: {reason}")
    if len(report.skipped) > SHOW_SKIPPED:
        print(f"  ... and {len(report.skipped) - SHOW_SKIPPED} more ('blipitm index info')")
