"""One record of load options (engine/options.py) shared by ``load()``, the CLI and the server."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import blipitm
from blipitm.cli.main import COMMANDS, build_parser
from blipitm.engine import LoadOptions, load_options
from blipitm.engine.options import (
    FILTERING_PRESET,
    LOAD_OPTIONS,
    MODEL_OPTIONS,
    SERVER_PRESET,
    options_from,
)
from blipitm.errors import InvalidInputError
from blipitm.server.app import load_engine
from blipitm.server.settings import OPTIONS, ServerSettings


def test_options_are_checked_once_when_built() -> None:
    for field, bad in [
        ("protocol", "lavis"),
        ("dtype", "float64"),
        ("compute_dtype", "int8"),
        ("max_pixels", 0),
        ("max_text_chars", 0),
        ("cache_bytes", -1),
        ("attn_impl", "flash"),
    ]:
        with pytest.raises(InvalidInputError, match=field):
            LoadOptions(**{field: bad})
    assert dataclasses.is_dataclass(LoadOptions) and LoadOptions.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_a_bad_option_names_the_flag_it_came_from() -> None:
    with pytest.raises(InvalidInputError, match="max_image_pixels"):
        options_from({"max_image_pixels": 0})
    with pytest.raises(InvalidInputError, match="max_image_pixels"):
        ServerSettings.of(max_image_pixels=0)
    with pytest.raises(InvalidInputError, match="protocol"):
        ServerSettings.of(protocol="lavis")


def test_every_load_option_is_a_field_and_a_server_setting() -> None:
    fields = {f.name for f in dataclasses.fields(LoadOptions)}
    assert all(o.field in fields for o in LOAD_OPTIONS)
    assert all(o in OPTIONS for o in LOAD_OPTIONS), "the server reuses the declarations"
    settings = ServerSettings.of(
        model="m", max_image_pixels=7, max_text_chars=9, cache_bytes=3, max_decoded_pixels=8
    )
    assert settings.load == LoadOptions(
        "m", max_pixels=7, max_text_chars=9, cache_bytes=3, decode_budget_pixels=8
    )
    assert settings.model == "m" and settings.replace(port=1).load == settings.load
    assert settings.replace(model="n").load == settings.load.replace(source="n")


def test_presets_hold_each_entry_points_defaults() -> None:
    """One record, three sets of defaults: the library's, the server's and the filter's."""
    assert ServerSettings().load == SERVER_PRESET
    assert (
        LoadOptions(
            cache_bytes=1 << 30,
            max_text_chars=10_000,
            max_pixels=40_000_000,
            decode_budget_pixels=80_000_000,
        )
        == SERVER_PRESET
    )
    assert LoadOptions(cache_bytes=64 << 20) == FILTERING_PRESET
    assert options_from({"max_text_chars": 5}, base=SERVER_PRESET) == SERVER_PRESET.replace(
        max_text_chars=5
    )
    from blipitm.filtering.runs import DEFAULT_OPTIONS

    assert DEFAULT_OPTIONS is FILTERING_PRESET  # filter_dataset and RayScorer start from it


def test_cli_flags_come_from_the_declarations() -> None:
    parser = build_parser(["score", "search"])
    args = parser.parse_args(["score", "i", "t", "--model", "m", "--dtype", "bfloat16"])
    assert options_from(vars(args)) == LoadOptions("m", dtype="bfloat16")
    args = parser.parse_args(["search", "INDEX", "q", "--revision", "v1"])  # rest: the index's
    given = {o.name: getattr(args, o.name) for o in MODEL_OPTIONS}
    assert given == {
        "model": None,
        "revision": "v1",
        "tokenizer": None,
        "protocol": None,
        "device": "cpu",
        "dtype": None,
    }


def test_every_command_that_loads_a_model_has_the_limit_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One cache option in one unit everywhere; each command's defaults are its preset's."""
    parser = build_parser(["score", "eval", "index", "search", "explain", "filter"])
    limits = ["--cache-bytes", "7", "--max-image-pixels", "8", "--max-text-chars", "9"]
    filter_args = ["filter", "x", "--out", "o", "--threshold", "0.5"]
    for argv in (
        ["score", "i", "t"],
        ["eval", "--annotations", "a", "--image-root", "r"],
        ["index", "build", "SRC", "--out", "IDX"],
        ["index", "add", "IDX", "SRC"],
        ["search", "IDX", "q"],
        ["explain", "i", "t"],
        filter_args,
    ):
        given = options_from(vars(parser.parse_args([*argv, *limits])))
        assert (given.cache_bytes, given.max_pixels, given.max_text_chars) == (7, 8, 9), argv
        default = options_from(vars(parser.parse_args(argv)))
        preset = FILTERING_PRESET if argv[0] == "filter" else LoadOptions()
        assert (default.cache_bytes, default.max_pixels) == (preset.cache_bytes, preset.max_pixels)
    args = parser.parse_args([*filter_args, "--cache-mb", "0.5"])  # the old spelling, in MiB
    assert args.cache_bytes == 1 << 19
    assert "--cache-mb is deprecated; use --cache-bytes 524288" in capsys.readouterr().err


def test_load_is_load_options(tiny_ckpt: Path) -> None:
    a = blipitm.load(tiny_ckpt, protocol="transformers", max_text_chars=12)
    b = load_options(LoadOptions(tiny_ckpt, protocol="transformers", max_text_chars=12))
    assert a.info == b.info and a.max_text_chars == b.max_text_chars == 12


def test_server_limits_have_one_home_the_engine(tiny_ckpt: Path) -> None:
    engine = load_engine(
        ServerSettings.of(model=str(tiny_ckpt), max_image_pixels=1234, max_text_chars=56).load
    )
    assert (engine.max_pixels, engine.max_text_chars) == (1234, 56)


HEAVY = ("torch", "blipitm.engine.engine")


@pytest.mark.parametrize(
    "argv",
    [[], *([c.name] for c in COMMANDS), ["index", "build"], ["index", "add"]],
    ids=lambda argv: " ".join(argv) or "blipitm",
)
def test_help_imports_neither_torch_nor_the_engine(argv: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "blipitm", *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "usage: blipitm" in run.stdout
    # -X importtime writes one line per module: "import time: self | cumulative | name".
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()}
    assert not imported & set(HEAVY), (
        f"`blipitm {' '.join(argv)} --help` imports {imported & set(HEAVY)}"
    )
