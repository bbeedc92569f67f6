"""BLIP captions: blipitm's ``Captioner.caption`` against transformers' ``generate``, one run.

    python bench/caption_bench.py [--images 8] [--max-length 30] [--repeat 2] [--write]

Both on the same random base-size captioner (ViT-B/16 at 384, BERT-base decoder; written once
under ``bench/out/``), the same JPEGs (640x480..1024x768, decoded and preprocessed inside the
timing on both sides), the same settings: greedy search and 3-beam search, ``max_length`` 30
(BLIP's default, prompt included), a batch of ``--images`` images in one call. blipitm runs the
"transformers" protocol so that its captions can be compared with transformers' for the same
work; its image cache is cleared before every timed call (transformers keeps none).

The baseline is transformers' best straightforward usage ("transformers-best", as in
bench/run.py): ``BlipForConditionalGeneration.generate`` on the batch, fp32. blipitm runs fp32
and bf16 (bf16 computes in bf16 only on a CPU with native bf16: the flags are recorded). Each
time is the median of ``--repeat`` runs after one warm-up (bench/run.py's ``timed``). A
breakdown splits blipitm's call into image encoding and the search (features cached).

Prints a markdown section; ``--write`` puts it into BENCHMARKS.md under "## Captioner
(bench/caption_bench.py)" (replacing that section if present). Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

import blipitm  # noqa: E402
from blipitm.testing.make_checkpoint import make_checkpoint  # noqa: E402
from run import cpu_flags, jpeg_images, timed  # noqa: E402

PROMPT = "a picture of "
SECTION = "## Captioner (bench/caption_bench.py)"


class TransformersBest:
    """transformers as a user captions a batch: processor, tokenizer, ``generate`` (fp32)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import (
            BertTokenizerFast,
            BlipForConditionalGeneration,
            BlipImageProcessorPil,
        )

        self.model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
        self.tok = BertTokenizerFast.from_pretrained(model_dir)
        size = self.model.config.vision_config.image_size
        self.proc = BlipImageProcessorPil(size={"height": size, "width": size})

    @torch.no_grad()
    def caption(self, images: list[bytes], **kw: object) -> list[str]:
        pixels = self.proc([Image.open(io.BytesIO(b)) for b in images], return_tensors="pt")
        text = self.tok([PROMPT] * len(images), return_tensors="pt")
        out = self.model.generate(
            pixel_values=pixels["pixel_values"],
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            **kw,
        )
        decoded = self.tok.batch_decode(out, skip_special_tokens=True)
        return [d[len(PROMPT) :] for d in decoded]


def checkpoint(out: Path) -> Path:
    path = out / "base-caption-random"
    if not (path / "model.safetensors").exists():
        print(f"writing {path} ...", flush=True)
        make_checkpoint(path, preset="base", seed=0, task="caption")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: a random base captioner")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--max-length", type=int, default=30)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    args = p.parse_args()
    model = args.model or checkpoint(args.out)
    images = jpeg_images(args.images, 3)
    searches = {"greedy": 1, "beam-3": 3}
    load_start = os.getloadavg()[0]
    print(f"CPU flags: {cpu_flags()}; load {os.getloadavg()}", flush=True)
    torch.set_grad_enabled(False)

    ref = TransformersBest(model)
    ref_s: dict[str, float] = {}
    ref_caps: dict[str, list[str]] = {}
    for name, beams in searches.items():
        kw = {"num_beams": beams, "max_length": args.max_length}
        ref_caps[name] = ref.caption(images, **kw)
        ref_s[name] = timed(lambda kw=kw, ref=ref: ref.caption(images, **kw), args.repeat)
        print(f"transformers {name}: {ref_s[name]:.2f} s", flush=True)
    del ref

    rows: list[tuple[str, str, str]] = []
    for name in searches:
        n = args.images / ref_s[name]
        rows.append((f"transformers-best, {name}, float32", f"{n:.2f} ({ref_s[name]:.2f} s)", "1"))
    notes: list[str] = []
    for dtype in args.dtypes:
        cap = blipitm.load_captioner(model, protocol="transformers", dtype=dtype)
        compute = cap.info.compute_dtype
        tag = dtype if compute == dtype else f"{dtype} (computes in {compute})"
        for name, beams in searches.items():
            kw = {"num_beams": beams, "max_length": args.max_length}

            def cold(cap: blipitm.Captioner = cap, kw: dict[str, int] = kw) -> list[str]:
                cap.cache.clear()
                return [r.captions[0] for r in cap.caption(images, **kw)]  # type: ignore[arg-type]

            same = cold() == ref_caps[name]
            t = timed(cold, args.repeat)

            # Where the time goes: image encoding alone, then the search with features cached.
            def encode(cap: blipitm.Captioner = cap) -> None:
                cap.cache.clear()
                cap.images.features(images, loc=("images",))

            t_enc = timed(encode, 1)
            encode()
            t_gen = timed(lambda cap=cap, kw=kw: cap.caption(images, **kw), args.repeat)
            speedup = ref_s[name] / t
            rows.append(
                (
                    f"blipitm, {name}, {tag}",
                    f"{args.images / t:.2f} ({t:.2f} s: images {t_enc:.2f} s, "
                    f"search {t_gen:.2f} s)",
                    f"{speedup:.1f}x" + ("" if same else " (captions differ)"),
                )
            )
            print(rows[-1], flush=True)
            if not same and dtype == "float32":
                notes.append(f"fp32 {name} captions differ from transformers'")
        cap.close()
        del cap
    load_end = os.getloadavg()[0]
    section = render(args, rows, load_start, load_end, notes)
    print(section)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", section)


def render(
    args: argparse.Namespace,
    rows: list[tuple[str, str, str]],
    load_start: float,
    load_end: float,
    notes: list[str],
) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION,
        "",
        f"- machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"CPU flags: {cpu_flags()}",
        f"- 1-minute load average at start / end: {load_start:.2f} / {load_end:.2f}",
        f"- random base-size captioner; {args.images} JPEGs (640x480..1024x768) in one call, "
        f"max_length {args.max_length} (prompt included); median of {args.repeat} after a warm-up",
        "",
        "| case | captions/s | vs transformers-best |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        *notes,
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text()
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        tail = rest[rest.find("\n## ") :] if "\n## " in rest else ""
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()
