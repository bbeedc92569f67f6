"""``blipitm keys``: every subcommand, in process, against a real SQLite store, and its refusals
of bad input (unknown name, bad date, negative numbers) as one clear line and exit 2."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from blipitm.cli.main import main
from blipitm.keys import KEY_PREFIX, KeyStore, UsageRow, hash_secret


def keys(capsys: pytest.CaptureFixture[str], db: Path, *argv: str) -> tuple[int, str, str]:
    action, *rest = argv
    capsys.readouterr()
    try:
        code = main(["keys", action, "--keys-db", str(db), *rest])
    except SystemExit as e:  # argparse refusals
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


def test_create_prints_the_secret_once_and_stores_only_its_hash(
    capsys: pytest.CaptureFixture[str], db: Path
) -> None:
    code, out, err = keys(capsys, db, "create", "team-a", "--rpm", "60", "--credits", "500",
                          "--items-per-minute", "1000", "--concurrency", "4",
                          "--expires", "2099-01-31", "--models", "m1", "m2")  # fmt: skip
    assert code == 0
    secret = out.strip()
    assert secret.startswith(KEY_PREFIX) and "\n" not in secret
    assert len(secret) - len(KEY_PREFIX) >= 43  # 32 random bytes, base64url: 256 bits
    assert "only this once" in err
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in db.parent.glob("keys.db-*"))
    assert secret.encode() not in raw and secret[3:].encode() not in raw
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute("SELECT hash FROM keys WHERE name = 'team-a'").fetchone()
    assert stored == hash_secret(secret)
    r = KeyStore(db).get("team-a")
    assert (r.rpm, r.items_per_minute, r.concurrency, r.credit_limit) == (60, 1000, 4, 500)
    assert r.models == ("m1", "m2") and r.as_dict()["expires"] == "2099-01-31T00:00:00+00:00"
    # Two keys never share a secret.
    assert keys(capsys, db, "create", "team-b")[1].strip() != secret


def test_list_update_revoke(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    secret = keys(capsys, db, "create", "team-a", "--rpm", "60", "--credits", "10")[1].strip()
    code, out, _ = keys(capsys, db, "list")
    assert code == 0 and "team-a" in out and "active" in out and secret not in out
    assert f"{KEY_PREFIX}...{secret[-4:]}" in out
    code, out, _ = keys(capsys, db, "update", "team-a", "--rpm", "none", "--add-credits", "5",
                        "--concurrency", "2")  # fmt: skip
    assert code == 0
    r = KeyStore(db).get("team-a")
    assert (r.rpm, r.concurrency, r.credits_remaining) == (None, 2, 15)
    KeyStore(db).add_usage([UsageRow("team-a", "2026-01-02", "/v1/score", 200, 1, 1, 1, 9, 4, 2.0)])
    assert keys(capsys, db, "update", "team-a", "--credits", "3")[0] == 0
    assert KeyStore(db).get("team-a").credits_remaining == 3  # the balance, after what was spent
    assert keys(capsys, db, "update", "team-a", "--credits", "none")[0] == 0
    assert KeyStore(db).get("team-a").credit_limit is None
    code, out, _ = keys(capsys, db, "revoke", "team-a")
    assert code == 0 and "revoked" in out and secret not in out
    code, out, _ = keys(capsys, db, "list", "--json")
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["status"] == "revoked" and "hash" not in row and secret not in out


def test_usage(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    keys(capsys, db, "create", "a")
    keys(capsys, db, "create", "b")
    KeyStore(db).add_usage(
        [
            UsageRow("a", "2026-01-01", "/v1/embeddings", 200, 2, 3, 0, 30, 3, 10.0),
            UsageRow("a", "2026-01-02", "/v1/embeddings", 429, 1, 0, 0, 0, 0, 1.0),
            UsageRow("b", "2026-01-02", "/v1/rerank", 200, 1, 4, 1, 50, 5, 4.0),
        ]
    )
    KeyStore(db).add_usage(
        [UsageRow("a", "2026-01-01", "/v1/embeddings", 200, 1, 1, 0, 10, 1, 2.0)]
    )
    code, out, _ = keys(capsys, db, "usage", "a", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(r["day"], r["status"], r["requests"], r["credits"]) for r in rows] == [
        ("2026-01-01", 200, 3, 4),
        ("2026-01-02", 429, 1, 0),
    ]
    code, out, _ = keys(capsys, db, "usage", "--since", "2026-01-02")
    assert code == 0 and "2026-01-01" not in out and "/v1/rerank" in out and "429" in out
    assert KeyStore(db).get("a").credits_used == 4


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("update", "nobody", "--rpm", "3"), "no key named 'nobody'"),
        (("revoke", "nobody"), "no key named 'nobody'"),
        (("usage", "nobody"), "no key named 'nobody'"),
        (("create", "team-a"), "already exists"),
        (("create", "bad name!"), "a key name is 1-64 characters"),
        (("create", "x", "--expires", "2027-13-01"), "argument --expires: not a date"),
        (("create", "x", "--expires", "tomorrow"), "argument --expires: not a date"),
        (("usage", "--since", "last week"), "argument --since: not a date"),
        (("create", "x", "--rpm", "-5"), "argument --rpm: must be an integer >= 1"),
        (("create", "x", "--rpm", "0"), "argument --rpm: must be an integer >= 1"),
        (("create", "x", "--credits", "-1"), "argument --credits: must be an integer >= 0"),
        (("create", "x", "--concurrency", "two"), "argument --concurrency: must be an integer"),
        (("update", "team-a", "--items-per-minute", "-1"), "must be an integer >= 1 or 'none'"),
        (("update", "team-a", "--add-credits", "x"), "argument --add-credits: must be an integer"),
        (("update", "team-a", "--add-credits", "5"), "unlimited credits"),
        (("update", "team-a", "--models", "m", "--all-models"), "not both"),
    ],
)
def test_bad_input_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], db: Path, argv: tuple[str, ...], says: str
) -> None:
    keys(capsys, db, "create", "team-a")
    code, out, err = keys(capsys, db, *argv)
    assert code == 2 and says in err, err
    assert "Traceback" not in err and out == ""
    assert [r.name for r in KeyStore(db).records()] == ["team-a"]  # nothing half-done


def test_the_store_must_be_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BLIPITM_KEYS_DB", raising=False)
    assert main(["keys", "list"]) == 2
    assert "--keys-db PATH" in capsys.readouterr().err
