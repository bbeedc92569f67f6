"""The text encoder runs packed (no padding rows): a text's result must not depend on what it was
batched with, for every way the engine lays out images and texts. The reference is each text run
alone (a batch of one has no padding, so packing is the identity there); the parity tests hold
that against transformers. fp32, measured differences ~1e-7; tolerance 5e-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blipitm
from blipitm.model import BlipITM
from blipitm.model.text import Packing
from blipitm.processing.tokenizer import pad

TOL = 5e-6
# Lengths 3..9 tokens with [CLS]/[SEP]: a batch of them is mostly padding for the short ones.
IDS = [[101, 1037, 102], [101, 2182, 2006, 1996, 5568, 102], [101, *range(2000, 2007), 102]]


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path) -> BlipITM:
    return blipitm.load(tiny_ckpt).model


def run(model: BlipITM, rows: list[list[int]], kv: object = None) -> torch.Tensor:
    input_ids, mask = pad(rows)
    with torch.inference_mode():
        return model.text_encoder.first_token(input_ids, mask, kv)  # type: ignore[arg-type]


def image_tokens(model: BlipITM, n: int) -> torch.Tensor:
    cfg = model.config.vision
    return torch.randn(
        n, cfg.num_patches + 1, cfg.hidden_size, generator=torch.Generator().manual_seed(n)
    )


def test_packing_pads_and_unpads_exactly() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    p = Packing.of(mask)
    assert p.lengths == [2, 4, 1] and p.starts.tolist() == [0, 2, 6]
    x = torch.arange(7.0)[:, None].expand(7, 3)  # [L, D], row i holds i
    padded = p.pad(x)  # [B, T, D]
    assert padded[:, :, 0].tolist() == [[0, 1, 0, 0], [2, 3, 4, 5], [6, 0, 0, 0]]
    assert torch.equal(p.unpad(padded), x)
    assert p.rows_per_image(1, first_only=False) == [7]
    assert p.rows_per_image(3, first_only=False) == [2, 4, 1]
    assert p.rows_per_image(3, first_only=True) == [1, 1, 1]


def test_unimodal_batch_equals_each_text_alone(model: BlipITM) -> None:
    batch = run(model, IDS)
    for i, row in enumerate(IDS):
        torch.testing.assert_close(batch[i], run(model, [row])[0], atol=TOL, rtol=0)


def test_itm_one_image_many_texts_equals_each_text_alone(model: BlipITM) -> None:
    with torch.inference_mode():
        kv = model.cross_kv(image_tokens(model, 1))
    batch = run(model, IDS, kv)
    for i, row in enumerate(IDS):
        torch.testing.assert_close(batch[i], run(model, [row], kv)[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", ["dense", "per-image list"])
@pytest.mark.parametrize("texts_per_image", [1, 2])
def test_itm_many_images_equals_each_pair_alone(
    model: BlipITM, layout: str, texts_per_image: int
) -> None:
    """G images x M texts, texts of image g contiguous; both K/V layouts the engine passes."""
    g = 3
    with torch.inference_mode():
        dense = model.cross_kv(image_tokens(model, g))
    rows = [IDS[(i + j) % 3] for i in range(g) for j in range(texts_per_image)]
    if layout == "dense":
        kv: object = dense
    else:
        kv = [
            ([k[i : i + 1] for i in range(g)], [v[i : i + 1] for i in range(g)]) for k, v in dense
        ]
    batch = run(model, rows, kv)
    for n, row in enumerate(rows):
        i = n // texts_per_image
        alone = [(k[i : i + 1], v[i : i + 1]) for k, v in dense]
        torch.testing.assert_close(batch[n], run(model, [row], alone)[0], atol=TOL, rtol=0)


def test_full_hidden_states_are_zero_at_padding(model: BlipITM) -> None:
    input_ids, mask = pad(IDS)
    with torch.inference_mode():
        hidden = model.text_encoder(input_ids, mask)  # [B, T, D]
    assert hidden.shape[:2] == input_ids.shape
    assert torch.all(hidden[mask == 0] == 0) and torch.all(hidden[mask == 1].abs().sum(-1) > 0)
