"""``blipitm keys``: per-key API keys in the SQLite store that ``blipitm serve --keys-db`` reads.

``create`` prints the new secret once, alone on stdout (``KEY=$(blipitm keys create NAME ...)``);
only its hash is stored. ``list`` and ``usage`` never show secrets. A running server picks up
changes within about a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from blipitm.errors import InvalidInputError
from blipitm.keys import UNSET, KeyRecord, KeyStore, UsageRow, parse_date
from blipitm.keys.store import MAX_INT, day_of

if TYPE_CHECKING:
    from blipitm.server.family import Price

ENV = "BLIPITM_KEYS_DB"
NONE = "none"  # on update: remove a limit


def _count(low: int, allow_none: bool) -> Any:
    def parse(value: str) -> int | None:
        if allow_none and value.strip().lower() == NONE:
            return None
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if number < low:
            extra = f" or '{NONE}'" if allow_none else ""
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{extra}, got {value!r}")
        if number > MAX_INT:
            raise argparse.ArgumentTypeError(f"must be at most {MAX_INT}, got {value!r}")
        return number

    return parse


def _date(allow_none: bool) -> Any:
    def parse(value: str) -> float | None:
        if allow_none and value.strip().lower() == NONE:
            return None
        try:
            return parse_date(value, "expires")
        except InvalidInputError as e:
            raise argparse.ArgumentTypeError(e.reason) from None

    return parse


def _int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
    if not -MAX_INT <= number <= MAX_INT:
        raise argparse.ArgumentTypeError(f"must be from -{MAX_INT} to {MAX_INT}, got {value!r}")
    return number


def add_parser(sub: Any, name: str, help: str) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--keys-db",
        metavar="PATH",
        default=os.environ.get(ENV),
        help=f"the key store (SQLite; `create` makes it if missing, the others refuse a missing "
        f"file) [env {ENV}]",
    )
    p = sub.add_parser(
        name,
        help=help,
        description="Manage per-key API keys for `blipitm serve --keys-db PATH`: limits, "
        "credits, expiry, allowed models, usage. See docs/keys.md.",
    )
    cmds = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    c = cmds.add_parser("create", parents=[common], help="add a key; prints its secret once")
    c.add_argument(
        "name", help="the key's name (letters, digits, . _ -), shown in usage and metrics"
    )
    _limit_flags(c, update=False)
    c.set_defaults(run=run_create)

    u = cmds.add_parser("update", parents=[common], help="change a key's limits, credits, expiry")
    u.add_argument("name")
    _limit_flags(u, update=True)
    u.add_argument(
        "--add-credits", type=_int, default=0, metavar="N", help="add N credits (negative: take)"
    )
    u.set_defaults(run=run_update)

    ls = cmds.add_parser("list", parents=[common], help="the keys and their limits (no secrets)")
    ls.add_argument("--json", action="store_true", help="JSON lines")
    ls.set_defaults(run=run_list)

    r = cmds.add_parser("revoke", parents=[common], help="revoke a key for good (usage is kept)")
    r.add_argument("name")
    r.set_defaults(run=run_revoke)

    us = cmds.add_parser(
        "usage", parents=[common], help="usage per key, UTC day, endpoint and model"
    )
    us.add_argument("name", nargs="?", help="one key (default: all)")
    us.add_argument("--since", type=_date(False), metavar="DATE", help="first day (YYYY-MM-DD)")
    us.add_argument(
        "--models-file",
        metavar="FILE",
        help="the server's models file: show each row's model price (credits per text / image)",
    )
    us.add_argument(
        "--image-credits",
        type=_count(0, False),
        default=1,
        metavar="N",
        help="with --models-file: the server's --image-credits (default: 1)",
    )
    us.add_argument("--json", action="store_true", help="JSON lines")
    us.set_defaults(run=run_usage)


def _limit_flags(p: argparse.ArgumentParser, *, update: bool) -> None:
    unset: Any = UNSET if update else None
    none = f" ('{NONE}': unlimited)" if update else " (default: unlimited)"
    p.add_argument("--rpm", type=_count(1, update), default=unset, metavar="N",
                   help="requests per minute" + none)  # fmt: skip
    p.add_argument("--items-per-minute", type=_count(1, update), default=unset, metavar="N",
                   help="texts + images per minute" + none)  # fmt: skip
    p.add_argument("--concurrency", type=_count(1, update), default=unset, metavar="N",
                   help="requests in progress at once" + none)  # fmt: skip
    p.add_argument(
        "--credits",
        type=_count(0, update),
        default=unset,
        metavar="N",
        help=("set the balance to N" if update else "starting balance")
        + " (1 credit per text, --image-credits per image)"
        + none,
    )
    p.add_argument("--expires", type=_date(update), default=unset, metavar="DATE",
                   help="YYYY-MM-DD (UTC midnight) or ISO 8601 time" + none)  # fmt: skip
    p.add_argument("--models", nargs="+", default=unset, metavar="M",
                   help="served model names the key may use (default: all)")  # fmt: skip
    if update:
        p.add_argument("--all-models", action="store_true", help="allow every model again")


def _store(args: argparse.Namespace, *, create: bool = False) -> KeyStore:
    """The store ``--keys-db`` names; only ``create`` makes a missing one (a typo in the path
    must not answer from a new, empty store)."""
    if not args.keys_db:
        raise InvalidInputError(f"name the key store: --keys-db PATH (or {ENV})", loc=("keys_db",))
    return KeyStore(args.keys_db, create=create)


def run_create(args: argparse.Namespace) -> int:
    secret = _store(args, create=True).create(
        args.name,
        rpm=args.rpm,
        items_per_minute=args.items_per_minute,
        concurrency=args.concurrency,
        credits=args.credits,
        expires=args.expires,
        models=args.models,
    )
    print(secret)
    print(
        f"created key {args.name!r}; its secret (above) is shown only this once: store it now",
        file=sys.stderr,
    )
    return 0


def run_update(args: argparse.Namespace) -> int:
    if args.all_models and args.models is not UNSET:
        raise InvalidInputError("give --models or --all-models, not both", loc=("models",))
    record = _store(args).update(
        args.name,
        rpm=args.rpm,
        items_per_minute=args.items_per_minute,
        concurrency=args.concurrency,
        credits=args.credits,
        add_credits=args.add_credits,
        expires=args.expires,
        models=None if args.all_models else args.models,
    )
    _print_keys([record], as_json=False)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    record = _store(args).revoke(args.name)
    print(f"revoked key {record.name!r} ({record.hint})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    _print_keys(_store(args).records(), as_json=args.json)
    return 0


def run_usage(args: argparse.Namespace) -> int:
    since = None if args.since is None else day_of(args.since)
    prices = _prices(args.models_file, args.image_credits) if args.models_file else None
    rows = _store(args).usage(args.name, since)
    if args.json:
        for row in rows:
            print(json.dumps(_usage_json(row, prices)))
        return 0
    _print_usage(rows, prices)
    return 0


def _prices(models_file: str, image_credits: int) -> dict[str, Price]:
    """Each served model's price by its served name, as the server reads the same file."""
    from blipitm.engine.options import SERVER_PRESET
    from blipitm.server.family import read_models_file

    return {s.name: s.price for s in read_models_file(models_file, SERVER_PRESET, image_credits)}


def _usage_json(row: UsageRow, prices: dict[str, Price] | None = None) -> dict[str, Any]:
    """A usage row with its latency named for what it is: the sum over the requests, and the
    mean; with ``prices``, its model's price (None for a model the file does not name)."""
    out = row.as_dict()
    total = out.pop("latency_ms")
    out["latency_ms_sum"] = total
    out["latency_ms_mean"] = total / row.requests if row.requests else 0.0
    if prices is not None:
        price = prices.get(row.model)
        out["price"] = None if price is None else {"text": price.text, "image": price.image}
    return out


def _status(record: KeyRecord) -> str:
    return record.refusal(time.time()) or "active"


def _shown(value: object) -> str:
    return "-" if value is None else str(value)


def _print_keys(records: list[KeyRecord], *, as_json: bool) -> None:
    if as_json:
        for record in records:
            print(json.dumps(record.as_dict() | {"status": _status(record)}))
        return
    header = (
        "name",
        "key",
        "status",
        "rpm",
        "items/min",
        "concurrency",
        "credits left",
        "expires",
        "models",
    )
    rows = [
        (
            r.name,
            r.hint,
            _status(r),
            _shown(r.rpm),
            _shown(r.items_per_minute),
            _shown(r.concurrency),
            _shown(r.credits_remaining),
            _shown(r.as_dict()["expires"]),
            "all" if r.models is None else ",".join(r.models),
        )
        for r in records
    ]
    _table(header, rows)


def _print_usage(rows: list[UsageRow], prices: dict[str, Price] | None) -> None:
    header = (
        "name",
        "day",
        "endpoint",
        "model",
        *(("price",) if prices is not None else ()),
        "status",
        "requests",
        "texts",
        "images",
        "tokens",
        "credits",
        "mean ms",
    )
    _table(
        header,
        [
            (
                r.name,
                r.day,
                r.endpoint,
                r.model or "-",
                *((_price(prices.get(r.model)),) if prices is not None else ()),
                str(r.status),
                str(r.requests),
                str(r.texts),
                str(r.images),
                str(r.tokens),
                str(r.credits),
                f"{r.latency_ms / max(r.requests, 1):.1f}",
            )
            for r in rows
        ],
    )


def _price(price: Price | None) -> str:
    """Credits per text / per image; '-' for a model the models file does not name."""
    return "-" if price is None else f"{price.text}/{price.image}"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    if not rows:
        print("(none)", file=sys.stderr)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
