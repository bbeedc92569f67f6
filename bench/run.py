"""blipitm vs transformers on identical weights, in one run; writes BENCHMARKS.md.

    python bench/run.py                      # writes a random base-size checkpoint first
    python bench/run.py --model DIR --dtypes float32 bfloat16 --device cpu

transformers is measured two ways (issue #3): its *best straightforward* usage (image encoded
once, ``text_encoder`` over the expanded image embeddings, fp32, padded to the batch's longest)
and its *naive* usage (``BlipForImageTextRetrieval(pixel_values, input_ids)`` per pair). Both
sides include preprocessing and tokenization. Speed is never asserted in tests; this is where it
is measured.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTES_MARKER = "<!-- notes below are kept by bench/run.py -->"
# Never the tracked BENCHMARKS.md: a run writes here (git-ignored), and a reviewed result is
# copied over BENCHMARKS.md by hand, so a run on a loaded or different machine changes nothing.
DEFAULT_OUT = ROOT / "bench" / "out" / "BENCHMARKS.md"
TRACKED = ROOT / "BENCHMARKS.md"
_WORD_TEXT = (
    "a an the dog cat man woman child boy girl people group two three young old small large red "
    "blue green white black brown yellow running sitting standing walking playing riding holding "
    "on in near under behind next to with at of grass street beach water park field snow road "
    "house car bike ball tree bench table city crowd wall sky building shirt hat jacket dress"
)
WORDS = _WORD_TEXT.split()


# -- inputs ---------------------------------------------------------------------------------


def captions(n: int, seed: int) -> list[str]:
    """Captions of 8-20 words, as in the issue's benchmark definition."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(8, 21)))) for _ in range(n)]


def jpeg_images(n: int, seed: int) -> list[bytes]:
    """Photo-sized JPEGs (640x480 .. 1024x768) of smooth random content."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(640, 1025)), int(rng.integers(480, 769))
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# -- timing ---------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``repeat`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype) -> float:
    """Best of several runs of a ViT-sized GEMM ([4616, 768] x [768, 3072])."""
    a = torch.randn(4616, 768, dtype=dtype)
    b = torch.randn(768, 3072, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 4616 * 768 * 3072 / best / 1e9


def text_gflop_per_token(cfg: dict[str, Any], *, itm: bool) -> float:
    """Per text token and all layers: self-attention projections + FFN (+ cross-attention Q/O
    and scores over the image tokens for ITM; the image's K/V projection is counted apart)."""
    t, v = cfg["text_config"], cfg["vision_config"]
    d, f = t["hidden_size"], t["intermediate_size"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2 + 1
    layer = 4 * d * d * 2 + 2 * d * f * 2
    if itm:
        layer += 2 * d * d * 2 + 2 * n_img * d * 2
    return t["num_hidden_layers"] * layer / 1e9


def vision_gflop(cfg: dict[str, Any]) -> float:
    v = cfg["vision_config"]
    d, f, n = v["hidden_size"], v["intermediate_size"], (v["image_size"] // v["patch_size"]) ** 2
    t = n + 1
    patch = n * 3 * v["patch_size"] ** 2 * d * 2
    layer = t * d * 3 * d * 2 + 2 * t * t * d * 2 + t * d * d * 2 + 2 * t * d * f * 2
    return (patch + v["num_hidden_layers"] * layer) / 1e9


# -- transformers reference -----------------------------------------------------------------


class TransformersRef:
    def __init__(self, model_dir: Path) -> None:
        from transformers import BertTokenizerFast, BlipForImageTextRetrieval, BlipImageProcessorPil

        self.model = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
        self.tok = BertTokenizerFast.from_pretrained(model_dir)
        size = self.model.config.vision_config.image_size
        self.proc = BlipImageProcessorPil(size={"height": size, "width": size})

    def pixels(self, images: list[bytes]) -> torch.Tensor:
        return self.proc([Image.open(io.BytesIO(b)) for b in images], return_tensors="pt")[
            "pixel_values"
        ]

    @torch.no_grad()
    def image_embeds(self, images: list[bytes], batch: int = 8) -> torch.Tensor:
        return torch.cat(
            [
                self.model.vision_model(self.pixels(images[i : i + batch])).last_hidden_state
                for i in range(0, len(images), batch)
            ]
        )

    @torch.no_grad()
    def itm_best(self, image_embeds: torch.Tensor, texts: list[str], batch: int = 32) -> np.ndarray:
        """Each text against its own row of ``image_embeds`` (one row broadcasts)."""
        out = []
        for i in range(0, len(texts), batch):
            enc = self.tok(texts[i : i + batch], padding="longest", return_tensors="pt")
            n = enc.input_ids.shape[0]
            emb = image_embeds[i : i + n] if image_embeds.shape[0] > 1 else image_embeds
            emb = emb.expand(n, -1, -1)
            hidden = self.model.text_encoder(
                input_ids=enc.input_ids,
                attention_mask=enc.attention_mask,
                encoder_hidden_states=emb,
                encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
            ).last_hidden_state
            out.append(self.model.itm_head(hidden[:, 0]))
        return torch.cat(out).numpy()

    @torch.no_grad()
    def itm_naive(self, image: bytes, texts: list[str]) -> None:
        pv = self.pixels([image])
        for t in texts:
            enc = self.tok([t], return_tensors="pt")
            self.model(input_ids=enc.input_ids, pixel_values=pv, attention_mask=enc.attention_mask)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str], batch: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch):
            enc = self.tok(texts[i : i + batch], padding="longest", return_tensors="pt")
            hidden = self.model.text_encoder(
                input_ids=enc.input_ids, attention_mask=enc.attention_mask
            ).last_hidden_state
            out.append(torch.nn.functional.normalize(self.model.text_proj(hidden[:, 0]), dim=-1))
        return torch.cat(out).numpy()


def measure_transformers(
    model: Path, texts: list[str], image: bytes, many: list[bytes], args: argparse.Namespace
) -> dict[str, float]:
    """Seconds for each transformers baseline; the model is freed on return."""
    ref = TransformersRef(model)
    torch.set_grad_enabled(False)
    out = {"best": timed(lambda: ref.itm_best(ref.image_embeds([image]), texts), 1)}
    naive = timed(lambda: ref.itm_naive(image, texts[: args.naive_pairs]), 1)
    out["naive"] = naive / args.naive_pairs * len(texts)  # extrapolated from a few pairs
    print(f"transformers 1x{len(texts)}: best {out['best']:.2f}s, naive {out['naive']:.1f}s")
    cached = ref.image_embeds(many[: args.cached_images])
    one = [texts[0]] * args.cached_images
    out["best_cached"] = timed(lambda: ref.itm_best(cached, one), 1)
    out["encode"] = timed(lambda: ref.image_embeds(many[: args.encode_images]), 1)
    out["text"] = timed(lambda: ref.text_embeddings(texts * 2), args.repeat)
    print(f"transformers: {out}", flush=True)
    return out


# -- child processes: peak RSS and time to first score ---------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM``, not ``getrusage``: Linux carries
    ``ru_maxrss`` across fork+exec, so a child would report its (large) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    image = jpeg_images(1, 0)[0]
    texts = captions(128, 1)
    if args.child == "blipitm":
        import blipitm

        engine = blipitm.load(args.model, dtype=args.dtype, device=args.device)
        engine.score(image, texts[:1])
        first = time.time()
        engine.score(image, texts)
    else:
        ref = TransformersRef(Path(args.model))
        with torch.no_grad():
            enc = ref.tok(texts[:1], return_tensors="pt")
            ref.model(input_ids=enc.input_ids, pixel_values=ref.pixels([image]))
        first = time.time()
        ref.itm_best(ref.image_embeds([image]), texts)
    print(json.dumps({"first_score_at": first, "peak_rss_mb": peak_rss_mb()}))


def run_child(model: Path, which: str, dtype: str, device: str) -> dict[str, float]:
    """A fresh process that loads the model and scores 1 image x 128 captions: its peak memory,
    and seconds from process start (interpreter and imports included) to the first score."""
    cmd = [sys.executable, __file__, "--child", which, "--model", str(model)]
    cmd += ["--dtype", dtype, "--device", device]
    started = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["first_score_s"] = result.pop("first_score_at") - started
    return result


# -- the benchmark --------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: a random base checkpoint")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--captions", type=int, default=128)
    p.add_argument("--cached-images", type=int, default=128)
    p.add_argument("--encode-images", type=int, default=16)
    p.add_argument("--naive-pairs", type=int, default=4, help="naive pairs timed (extrapolated)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="where to write (default: bench/out/BENCHMARKS.md; copy it over BENCHMARKS.md by "
        "hand once reviewed)",
    )
    p.add_argument("--child", choices=("blipitm", "transformers"), help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    import blipitm

    if args.model is None:
        args.model = ROOT / "bench" / "out" / "base-random"
        if not (args.model / "config.json").exists():
            from blipitm.testing.make_checkpoint import make_checkpoint

            print(f"writing a random base-size checkpoint to {args.model}", flush=True)
            make_checkpoint(args.model, preset="base", seed=0)
    cfg = json.loads((args.model / "config.json").read_text())
    gflop_image = vision_gflop(cfg)

    texts = captions(args.captions, 1)
    image = jpeg_images(1, 0)[0]
    many = jpeg_images(max(args.cached_images, args.encode_images), 2)
    rows: list[tuple[str, str, str]] = []

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"CPU flags: {cpu_flags()}; load average {os.getloadavg()}")
    load_before = os.getloadavg()
    log("transformers: loading")
    base = measure_transformers(args.model, texts, image, many, args)
    t_best, t_naive, t_best_cached = base["best"], base["naive"], base["best_cached"]
    t_ref_enc, t_ref_txt = base["encode"], base["text"]
    enc = many[: args.encode_images]
    peak = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}

    ref_rss = run_child(args.model, "transformers", "float32", args.device)

    for dtype in args.dtypes:
        engine = blipitm.load(args.model, dtype=dtype, device=args.device, cache_bytes=16 << 30)
        compute = engine.info.compute_dtype
        if dtype == "int8":
            tag = "int8 (linear layers; the rest in float32)"
        else:
            tag = dtype if compute == dtype else f"{dtype} (weights; computes in {compute})"
        pk = peak[compute]

        def cold_itm(engine: blipitm.Engine = engine) -> None:
            engine.cache.clear()
            engine.score(image, texts, itc=False)

        def cold_full(engine: blipitm.Engine = engine) -> None:
            engine.cache.clear()
            engine.score(image, texts)

        t_itm = timed(cold_itm, args.repeat)
        t_full = timed(cold_full, args.repeat)
        engine.cache.clear()
        engine.score(many[: args.cached_images], texts[1])  # encode + cache features and K/V
        t_cached = timed(
            lambda engine=engine: engine.score(many[: args.cached_images], texts[2], itc=False),
            args.repeat,
        )

        def cold_encode(engine: blipitm.Engine = engine) -> None:
            engine.cache.clear()
            engine.embed_images(enc)

        t_enc = timed(cold_encode, 1)
        t_txt = timed(lambda engine=engine: engine.embed_texts(texts * 2), args.repeat)
        # Work actually done, from the token counts: the GFLOP/s columns below.
        tokens = sum(engine.count_tokens(texts))
        t_cfg, v_cfg = cfg["text_config"], cfg["vision_config"]
        n_img_tokens = (v_cfg["image_size"] // v_cfg["patch_size"]) ** 2 + 1
        kv = 2 * n_img_tokens * v_cfg["hidden_size"] * t_cfg["hidden_size"] * 2
        kv_gflop = t_cfg["num_hidden_layers"] * kv / 1e9
        itm_gflop = gflop_image + kv_gflop + tokens * text_gflop_per_token(cfg, itm=True)
        txt_gflop = 2 * tokens * text_gflop_per_token(cfg, itm=False)
        engine.close()
        del engine
        rss = run_child(args.model, "blipitm", dtype, args.device)
        n, m = len(texts), args.cached_images
        rows += [
            (
                f"1 image x {n} captions, ITM ({tag})",
                f"{n / t_itm:.1f} pairs/s ({t_itm:.2f} s; {itm_gflop / t_itm:.0f} GFLOP/s = "
                f"{itm_gflop / t_itm / pk:.0%} of peak)",
                f"{t_best / t_itm:.1f}x best, {t_naive / t_itm:.0f}x naive",
            ),
            (
                f"1 image x {n} captions, ITM + ITC ({tag})",
                f"{n / t_full:.1f} pairs/s ({t_full:.2f} s)",
                f"{t_best / t_full:.1f}x best (which computes no ITC)",
            ),
            (
                f"{m} images (features cached) x 1 caption, ITM ({tag})",
                f"{m / t_cached:.1f} pairs/s ({t_cached:.2f} s)",
                f"{t_best_cached / t_cached:.1f}x best",
            ),
            (
                f"image encoding ({tag})",
                f"{len(enc) / t_enc:.2f} images/s = "
                f"{gflop_image * len(enc) / t_enc:.0f} GFLOP/s "
                f"({gflop_image * len(enc) / t_enc / pk:.0%} of matmul peak {pk:.0f})",
                f"{t_ref_enc / t_enc:.2f}x",
            ),
            (
                f"text embeddings, ITC ({tag})",
                f"{2 * n / t_txt:.0f} texts/s ({txt_gflop / t_txt:.0f} GFLOP/s)",
                f"{t_ref_txt / t_txt:.2f}x",
            ),
            (
                f"peak RSS, scoring process ({tag})",
                f"{rss['peak_rss_mb']:.0f} MB",
                f"transformers fp32: {ref_rss['peak_rss_mb']:.0f} MB",
            ),
            (
                f"local checkpoint to first score ({tag})",
                f"{rss['first_score_s']:.2f} s",
                f"transformers from_pretrained + processor: {ref_rss['first_score_s']:.2f} s",
            ),
        ]
        log(json.dumps(rows[-7:], indent=1))

    n, m = len(texts), args.cached_images
    transformers_rows = [
        ("transformers best, 1 image x captions", f"{n / t_best:.1f} pairs/s ({t_best:.2f} s)"),
        ("transformers naive, per pair", f"{n / t_naive:.2f} pairs/s"),
        ("transformers best, cached images x 1", f"{m / t_best_cached:.1f} pairs/s"),
        ("transformers image encoding", f"{len(enc) / t_ref_enc:.2f} images/s"),
        ("transformers text embeddings", f"{2 * n / t_ref_txt:.0f} texts/s"),
    ]
    load = (load_before[0], os.getloadavg()[0])
    write_report(args, rows, transformers_rows, peak, load)


def cpu_flags() -> str:
    """The CPU features that decide the fast dtypes: native bf16 (AMX, AVX512-BF16) and int8."""
    wanted = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    have = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have.update(line.split(":", 1)[1].split())
    return " ".join(f for f in wanted if f in have) or "none of " + " ".join(wanted)


def write_report(
    args: argparse.Namespace,
    rows: list[tuple[str, str, str]],
    ref_rows: list[tuple[str, str]],
    peak: dict[str, float],
    load: tuple[float, float],
) -> None:
    import transformers

    import blipitm

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = args.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name()})"
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python bench/run.py` "
        f"({datetime.date.today().isoformat()}); blipitm and transformers on identical random "
        "base-size weights (ViT-B/16 @ 384, BERT-base), in one run. Ratios are blipitm / "
        "transformers.",
        "",
        f"- machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"CPU flags: {cpu_flags()}",
        f"- 1-minute load average at start / end: {load[0]:.2f} / {load[1]:.2f} (the machine "
        "is shared when it is above what this run adds, about 2)",
        f"- device: {device}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"blipitm {blipitm.__version__}",
        f"- measured matmul peak: fp32 {peak['float32']:.0f} GFLOP/s, "
        f"bf16 {peak['bfloat16']:.0f} GFLOP/s",
        f"- captions: {args.captions} of 8-20 words; images: JPEG 640x480..1024x768",
        "",
        "| case | blipitm | vs transformers |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "transformers baselines (fp32):",
        "",
        "| case | transformers |",
        "|---|---|",
        *[f"| {a} | {b} |" for a, b in ref_rows],
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n" + NOTES_MARKER + kept_notes(args.out))
    print(f"wrote {args.out}; review it, then copy it over {TRACKED.relative_to(ROOT)}")


def kept_notes(out: Path) -> str:
    """The hand-written analysis below the marker, so that it survives regeneration: from
    ``out`` if it has them, else from the tracked BENCHMARKS.md (the copy is then complete)."""
    for source in (out, TRACKED):
        if source.exists() and NOTES_MARKER in source.read_text():
            return source.read_text().split(NOTES_MARKER, 1)[1]
    return ""


if __name__ == "__main__":
    main()
