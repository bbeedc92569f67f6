"""Options shared by the subcommands that load a model."""

from __future__ import annotations

import argparse

from blipitm.engine import DEFAULT_MODEL, DTYPES, Engine, load


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id, local Hugging Face directory or BLIP .pth file (default: {DEFAULT_MODEL})",
    )
    g.add_argument("--revision", default=None, help="hub branch, tag or commit to pin")
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory or hub id for a .pth model (default: bert-base-uncased)",
    )
    g.add_argument(
        "--protocol",
        choices=("blip", "transformers"),
        default="blip",
        help="blip: as Salesforce evaluated it (default); transformers: bit-compatible with HF",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="default: float32")


def load_engine(args: argparse.Namespace) -> Engine:
    return load(
        args.model,
        revision=args.revision,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        protocol=args.protocol,
    )
