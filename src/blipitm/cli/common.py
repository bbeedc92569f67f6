"""Options shared by the subcommands that load a model."""

from __future__ import annotations

import argparse

from blipitm.engine import DEFAULT_MODEL, DTYPE_NAMES, Engine, load
from blipitm.retrieval import Index
from blipitm.scoring import PROTOCOL_NAMES


def add_model_options(p: argparse.ArgumentParser, *, from_index: bool = False) -> None:
    """``from_index``: model, revision, protocol and dtype default to the index's manifest."""
    g = p.add_argument_group("model")
    recorded = "the one the index was built with"
    g.add_argument(
        "--model",
        default=None if from_index else DEFAULT_MODEL,
        help="hub id, local Hugging Face directory or BLIP .pth file "
        f"(default: {recorded if from_index else DEFAULT_MODEL})",
    )
    g.add_argument("--revision", default=None, help="hub branch, tag or commit to pin")
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory or hub id for a .pth model (default: bert-base-uncased)",
    )
    g.add_argument(
        "--protocol",
        choices=PROTOCOL_NAMES,
        default=None if from_index else "blip",
        help="blip: as Salesforce evaluated it; transformers: bit-compatible with HF (default: "
        + (f"{recorded})" if from_index else "blip)"),
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None if from_index else "float32",
        help=f"default: {recorded if from_index else 'float32'}",
    )


def load_engine(args: argparse.Namespace, *, index: str | None = None) -> Engine:
    """Load the model the options name; unset ones come from ``index``'s manifest if given."""
    model, revision, protocol, dtype = args.model, args.revision, args.protocol, args.dtype
    if index is not None and None in (model, protocol, dtype):
        with Index.open(index) as opened:
            recorded = opened.manifest["model"]
        if model is None:
            model, revision = recorded["source"], revision or recorded.get("revision")
        protocol = protocol or recorded["protocol"]
        dtype = dtype or recorded["dtype"]
    return load(
        model,
        revision=revision,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=dtype,
        protocol=protocol,
    )
