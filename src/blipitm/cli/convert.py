"""``blipitm convert SRC.pth OUT_DIR``: original BLIP/LAVIS checkpoint -> Hugging Face layout."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description=(
            "Write SRC (a Salesforce BLIP / LAVIS retrieval checkpoint, {'model': state_dict}) "
            "as a "
            "Hugging Face directory: config.json, model.safetensors, tokenizer and image-processor "
            "files. Momentum encoders and queues are dropped; base/large is inferred from shapes."
        ),
    )
    p.add_argument("src", help="the .pth file")
    p.add_argument("out_dir", help="output directory (must be empty or absent)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory or hub id to copy (default: bert-base-uncased)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace files in a non-empty OUT_DIR")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from blipitm.checkpoint import convert_to_hf  # torch: not for `--help`

    out = convert_to_hf(args.src, args.out_dir, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
