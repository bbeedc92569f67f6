"""Retrieval-evaluation throughput: ``blipitm.evaluation.score_matrices`` vs BLIP's loop written
with transformers' ``BlipForImageTextRetrieval`` modules, on the same random weights, in one run.

    python bench/eval_bench.py                       # random base-size checkpoint, seed 0
    python bench/eval_bench.py --model DIR --images 8 --captions 2 --k 4 --threads 2

The transformers side is BLIP's ``train_retrieval.py`` ``evaluation`` transcribed onto the HF
modules (docs/architecture.md, "Retrieval protocol"): texts cleaned with ``pre_caption`` and padded
to 35 tokens, ``vision_model`` once per image, ``text_encoder`` over the image embeddings repeated
for the top-k of each query, ``[ENC]`` first, ``itm_head[:, 1] + sim``. HF's config is set to BLIP's
head_dim 64 and vision eps 1e-6 so both sides compute the same numbers (checked below). Both
sides include preprocessing and tokenization. Throughput is BLIP's pair count (I*k + T*k) per
second, so the union trick (scoring a pair needed by both directions once) counts as speed.
Speed is never asserted in tests; this prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = (
    "a the dog cat man woman child people two young red blue green white black running sitting "
    "walking playing on in near under with grass street beach water park snow car bike ball tree"
)
ENC = 30523


def blip_pre_caption(caption: str, max_words: int = 30) -> str:
    """BLIP's data/utils.py pre_caption (the HF side needs it; blipitm applies its own)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def make_data(n_images: int, per_image: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    images = [
        rng.integers(0, 256, (int(rng.integers(300, 500)), int(rng.integers(300, 500)), 3)).astype(
            np.uint8
        )
        for _ in range(n_images)
    ]
    texts = [
        " ".join(rng.choice(WORDS.split(), int(rng.integers(6, 14)))).capitalize() + "."
        for _ in range(n_images * per_image)
    ]
    return images, texts


@torch.inference_mode()
def hf_blip_loop(model_dir: Path, images: list[np.ndarray], texts: list[str], k: int):
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessorPil,
    )

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["text_config"]["num_attention_heads"] = cfg["text_config"]["hidden_size"] // 64
    cfg["vision_config"]["layer_norm_eps"] = 1e-6
    config = BlipConfig.from_dict(cfg)
    model = BlipForImageTextRetrieval.from_pretrained(model_dir, config=config).eval()
    tok = BertTokenizerFast.from_pretrained(model_dir)
    size = config.vision_config.image_size
    proc = BlipImageProcessorPil(size={"height": size, "width": size})

    t0 = time.perf_counter()
    enc = tok(
        [blip_pre_caption(t) for t in texts],
        padding="max_length",
        truncation=True,
        max_length=35,
        return_tensors="pt",
    )
    text_out = model.text_encoder(enc.input_ids, attention_mask=enc.attention_mask)
    text_embeds = torch.nn.functional.normalize(model.text_proj(text_out[0][:, 0]), dim=-1)
    ids = enc.input_ids.clone()
    ids[:, 0] = ENC
    feats, img_embeds = [], []
    for img in images:
        pv = proc([Image.fromarray(img)], return_tensors="pt").pixel_values
        feat = model.vision_model(pixel_values=pv)[0]
        feats.append(feat)
        img_embeds.append(torch.nn.functional.normalize(model.vision_proj(feat[:, 0]), dim=-1))
    image_feats, image_embeds = torch.cat(feats), torch.cat(img_embeds)
    sims = image_embeds @ text_embeds.t()
    i2t = torch.full((len(images), len(texts)), -100.0)
    for i, row in enumerate(sims):
        top_sim, top_idx = row.topk(k=min(k, len(texts)))
        enc_out = image_feats[i].repeat(len(top_idx), 1, 1)
        out = model.text_encoder(
            ids[top_idx],
            attention_mask=enc.attention_mask[top_idx],
            encoder_hidden_states=enc_out,
            encoder_attention_mask=torch.ones(enc_out.shape[:-1], dtype=torch.long),
        )
        i2t[i, top_idx] = model.itm_head(out[0][:, 0])[:, 1] + top_sim
    t2i = torch.full((len(texts), len(images)), -100.0)
    for t, row in enumerate(sims.t()):
        top_sim, top_idx = row.topk(k=min(k, len(images)))
        enc_out = image_feats[top_idx]
        out = model.text_encoder(
            ids[t].repeat(len(top_idx), 1),
            attention_mask=enc.attention_mask[t].repeat(len(top_idx), 1),
            encoder_hidden_states=enc_out,
            encoder_attention_mask=torch.ones(enc_out.shape[:-1], dtype=torch.long),
        )
        t2i[t, top_idx] = model.itm_head(out[0][:, 0])[:, 1] + top_sim
    return time.perf_counter() - t0, i2t.numpy(), t2i.numpy()


def ours(model_dir: Path, images: list[np.ndarray], texts: list[str], k: int, dtype: str):
    import blipitm
    from blipitm.evaluation import compute_scores

    engine = blipitm.load(model_dir, dtype=dtype, cache_bytes=0)  # no warm image cache
    t0 = time.perf_counter()
    out = compute_scores(engine, images, texts, k_test=k)
    return time.perf_counter() - t0, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint dir (default: random base, seed 0)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--captions", type=int, default=2, help="captions per image")
    p.add_argument("--k", type=int, default=4, help="k_test")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", default=["float32"], help="blipitm dtypes to run")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    model_dir = args.model
    if model_dir is None:
        from blipitm.testing.make_checkpoint import make_checkpoint

        tmp = tempfile.TemporaryDirectory()
        model_dir = make_checkpoint(Path(tmp.name), preset="base", seed=0)
    images, texts = make_data(args.images, args.captions, seed=0)
    n_img, n_txt = len(images), len(texts)
    protocol_pairs = n_img * min(args.k, n_txt) + n_txt * min(args.k, n_img)

    from blipitm.evaluation import itm_eval

    txt2img = [t // args.captions for t in range(n_txt)]
    img2txt = [list(range(i * args.captions, (i + 1) * args.captions)) for i in range(n_img)]
    hf_s, hf_i2t, hf_t2i = hf_blip_loop(model_dir, images, texts, args.k)
    rows = [("transformers, BLIP loop (fp32)", hf_s, protocol_pairs, "")]
    for dtype in args.dtypes:
        s, out = ours(model_dir, images, texts, args.k, dtype)
        diff = max(
            float(np.abs(out.scores_i2t - hf_i2t).max()),
            float(np.abs(out.scores_t2i - hf_t2i).max()),
        )
        same = itm_eval(out.scores_i2t, out.scores_t2i, txt2img, img2txt) == itm_eval(
            hf_i2t, hf_t2i, txt2img, img2txt
        )
        note = (
            f"{out.pairs_scored} unique pairs, ITM stage {out.pairs_per_second:.2f} pairs/s; "
            f"max |Δscore| {diff:.1e}; recalls equal: {same}"
        )
        rows.append((f"blipitm score_matrices ({dtype})", s, protocol_pairs, note))

    print(
        f"Retrieval evaluation, {n_img} images x {n_txt} captions, k_test={args.k} "
        f"({protocol_pairs} ITM pairs in BLIP's loop); {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, same random weights "
        f"({model_dir.name if args.model else 'base preset, seed 0'}).\n"
    )
    print("| implementation | total s | pairs/s | vs transformers | notes |")
    print("|---|---:|---:|---:|---|")
    for name, s, pairs, note in rows:
        print(f"| {name} | {s:.1f} | {pairs / s:.2f} | {hf_s / s:.2f}x | {note} |")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
