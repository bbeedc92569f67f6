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


def test_usage_per_model_with_the_models_file_prices(
    capsys: pytest.CaptureFixture[str], db: Path, tmp_path: Path
) -> None:
    """Rows are kept per model (the same key, day, endpoint and status on two models are two
    rows); --models-file adds each row's model price as the server reads it."""
    keys(capsys, db, "create", "a")
    KeyStore(db).add_usage(
        [
            UsageRow("a", "2026-01-01", "/v1/score", 200, 1, 1, 1, 9, 3, 2.0, "base"),
            UsageRow("a", "2026-01-01", "/v1/score", 200, 1, 1, 1, 9, 7, 2.0, "large"),
            UsageRow("a", "2026-01-01", "/v1/score", 200, 1, 1, 1, 9, 3, 2.0, "base"),
            UsageRow("a", "2026-01-01", "/v1/score", 404, 1, 0, 0, 0, 0, 1.0),  # no model reached
        ]
    )
    models = tmp_path / "models.toml"
    models.write_text(
        '[[model]]\nsource = "b"\nname = "base"\nimage_credits = 2\n'
        '[[model]]\nsource = "l"\nname = "large"\ntext_credits = 3\nimage_credits = 4\n'
    )
    code, out, _ = keys(capsys, db, "usage", "a", "--json", "--models-file", str(models),
                        "--image-credits", "5")  # fmt: skip
    rows = {(r["model"], r["status"]): r for r in map(json.loads, out.splitlines())}
    assert code == 0 and set(rows) == {("", 404), ("base", 200), ("large", 200)}
    assert (rows["base", 200]["requests"], rows["base", 200]["credits"]) == (2, 6)
    assert rows["base", 200]["price"] == {"text": 1, "image": 2}
    assert rows["large", 200]["price"] == {"text": 3, "image": 4}
    assert rows["", 404]["price"] is None
    code, out, _ = keys(capsys, db, "usage", "a", "--models-file", str(models))
    header, *lines = out.splitlines()
    assert header.split()[3:5] == ["model", "price"]
    assert sorted(line.split()[3:5] for line in lines) == [["-", "-"], ["base", "1/2"],
                                                           ["large", "3/4"]]  # fmt: skip
    code, out, _ = keys(capsys, db, "usage", "a")  # no file: no price column
    assert "price" not in out.splitlines()[0] and code == 0


def test_a_store_from_before_models_keeps_its_usage(db: Path) -> None:
    """A store written before usage was per model opens with its rows intact (model ''), and
    the same slot on a model is a row of its own."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE usage (name TEXT NOT NULL, day TEXT NOT NULL, endpoint TEXT NOT NULL, "
            "status INTEGER NOT NULL, requests INTEGER NOT NULL, texts INTEGER NOT NULL, "
            "images INTEGER NOT NULL, tokens INTEGER NOT NULL, credits INTEGER NOT NULL, "
            "latency_ms REAL NOT NULL, PRIMARY KEY (name, day, endpoint, status))"
        )
        conn.execute("INSERT INTO usage VALUES ('a', '2026-01-01', '/v1/score', 200, 2, 2, 2, 18,"
                     " 6, 4.0)")  # fmt: skip
    store = KeyStore(db)
    old = UsageRow("a", "2026-01-01", "/v1/score", 200, 2, 2, 2, 18, 6, 4.0)
    assert store.usage() == [old]
    store.add_usage([UsageRow("a", "2026-01-01", "/v1/score", 200, 1, 1, 1, 9, 3, 2.0, "m")])
    store.add_usage([UsageRow("a", "2026-01-01", "/v1/score", 200, 1, 1, 1, 9, 3, 2.0)])
    assert KeyStore(db).usage() == [
        UsageRow("a", "2026-01-01", "/v1/score", 200, 3, 3, 3, 27, 9, 6.0),
        UsageRow("a", "2026-01-01", "/v1/score", 200, 1, 1, 1, 9, 3, 2.0, "m"),
    ]


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
        # issue 18 item 8: numbers SQLite cannot hold as integers, dates past year 9999 in UTC
        (("update", "team-a", "--rpm", str(2**64)), "argument --rpm: must be at most"),
        (("update", "team-a", "--credits", str(2**63)), "argument --credits: must be at most"),
        (("update", "team-a", "--add-credits", str(2**64)), "argument --add-credits: must be"),
        (("create", "x", "--expires", "9999-12-31T23:00:00-05:00"), "after 9999-12-31T23:59:59"),
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


def test_balances_stay_integers_at_the_limit(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    """`--add-credits` on a 2^63-1 balance turned it into a float (issue 18 item 8)."""
    keys(capsys, db, "create", "rich", "--credits", str(2**63 - 1))
    code, _, err = keys(capsys, db, "update", "rich", "--add-credits", "1")
    assert code == 2 and "leaves the range the store holds" in err and "Traceback" not in err
    KeyStore(db).add_usage([UsageRow("rich", "2026-01-01", "/v1/score", 200, 1, 1, 0, 1, 5, 1.0)])
    code, _, err = keys(capsys, db, "update", "rich", "--credits", str(2**63 - 1))
    assert code == 2 and "more than the store holds" in err
    record = KeyStore(db).get("rich")
    assert record.credit_limit == 2**63 - 1 and isinstance(record.credit_limit, int)
    with sqlite3.connect(db) as conn:
        (kind,) = conn.execute("SELECT typeof(credit_limit) FROM keys").fetchone()
    assert kind == "integer"


def test_an_expiry_stored_past_year_9999_does_not_break_list(
    capsys: pytest.CaptureFixture[str], db: Path
) -> None:
    """A store that already holds such an expiry (accepted before the check): `keys list` and
    the record's dict (what /v1/usage shows) still work, for that key and every other."""
    keys(capsys, db, "create", "far")
    keys(capsys, db, "create", "near")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE keys SET expires = 253402315200.0 WHERE name = 'far'")
    code, out, err = keys(capsys, db, "list")
    assert code == 0 and "far" in out and "near" in out and "past year 9999" in out, err
    assert "past year 9999" in KeyStore(db).get("far").as_dict()["expires"]


def test_the_store_is_owner_only_and_never_made_by_mistake(
    capsys: pytest.CaptureFixture[str], db: Path
) -> None:
    """keys.db was created 0644, and a mistyped --keys-db silently made a new empty store."""
    for action in ("list", "usage", "revoke x", "update x --rpm 1"):
        code, _, err = keys(capsys, db, *action.split())
        assert code == 2 and "no key store at" in err and "keys create" in err, (action, err)
        assert not db.exists() and "Traceback" not in err
    assert keys(capsys, db, "create", "first")[0] == 0
    assert db.stat().st_mode & 0o777 == 0o600
    for extra in db.parent.glob("keys.db-*"):  # WAL files get the file's mode
        assert extra.stat().st_mode & 0o777 == 0o600


def test_usage_json_names_its_latency(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    keys(capsys, db, "create", "a")
    KeyStore(db).add_usage(
        [UsageRow("a", "2026-01-01", "/v1/embeddings", 200, 4, 4, 0, 40, 4, 10.0)]
    )
    code, out, _ = keys(capsys, db, "usage", "a", "--json")
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and "latency_ms" not in row
    assert (row["latency_ms_sum"], row["latency_ms_mean"]) == (10.0, 2.5)


@pytest.mark.parametrize("problem", ["missing store", "unreachable redis"])
def test_serve_refuses_a_bad_keys_setup_in_one_line(tmp_path: Path, problem: str) -> None:
    """A mistyped --keys-db and an unreachable --redis: one line and exit 2, before the model
    loads (before: an empty store was created and served; a traceback and exit 3)."""
    import subprocess
    import sys

    from server_helpers import REPO, free_port

    db = tmp_path / "keys.db"
    argv = ["serve", "--keys-db", str(db), "--port", str(free_port())]
    if problem == "unreachable redis":
        KeyStore(db).create("k")
        argv += ["--redis", f"redis://127.0.0.1:{free_port()}/0"]  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "blipitm.cli.main", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("blipitm: error: ")
    assert ("no key store at" if problem == "missing store" else "cannot reach Redis") in lines[0]
    assert db.exists() == (problem != "missing store")
