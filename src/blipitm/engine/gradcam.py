"""Grad-CAM of the ITM match, LAVIS's ``compute_gradcam`` (``blip_image_text_matching.py``).

For text-encoder layer ``l``: ``A`` = its cross-attention probabilities ``[heads, T, 1 + P]``
(after softmax; dropout is off in eval), ``G`` = the gradient of the ITM match logit (class 1,
before softmax) with respect to ``A``; text position ``t``'s map is the mean over heads of
``A[:, t, 1:] * clamp(G[:, t, 1:], min=0)`` on the ``grid x grid`` patch grid. The token maps are
those of positions ``1..L`` (the caption's tokens: not the first token, not ``[SEP]``, not padding);
the caption's map is their mean.

Only what the map needs is differentiated: the weights never require grad, the layers before ``l``
run without a graph, and layer ``l``'s probabilities enter the graph as a detached leaf (the probe
below), so backward runs through layers ``l..`` of the text encoder alone. The image's tokens and
keys/values come from the engine's cache, as for scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from blipitm.explain import Explanation
from blipitm.model import BlipITM, DenseKV
from blipitm.model.text import Packing, TextLayer
from blipitm.preemption import yielding_to
from blipitm.scoring import itm_probability


def gradcam(
    model: BlipITM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cross_kv: DenseKV,
    layer: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM logits ``[B, 2]`` and Grad-CAM maps ``[B, T, P]`` (float32) of ``B`` texts against one
    image's keys/values (``[1, h, 1 + P, d]`` per layer)."""
    kept: list[torch.Tensor] = []

    def probe(probs: torch.Tensor) -> torch.Tensor:  # [1, h, L, 1+P]: L packed token rows
        leaf = probs.detach().requires_grad_(True)
        kept.append(leaf)
        return leaf

    attn = cast(TextLayer, model.text_encoder.encoder.layer[layer]).crossattention
    # The probe is state on the model: no other work may run through it meanwhile (no yield
    # points). Outside inference mode even when called inside it (a yield point's online job).
    with yielding_to(None), torch.inference_mode(False):
        # Keys/values made under inference_mode cannot be saved for backward: layers from
        # ``layer`` on take ordinary copies (one image's worth).
        kv = [(k, v) if i < layer else (k.clone(), v.clone()) for i, (k, v) in enumerate(cross_kv)]
        attn.probe = probe
        try:
            with torch.enable_grad():
                # Every position of every layer: the probed layer needs all rows (the fast
                # first-token-only last layer would leave them out when ``layer`` is the last).
                hidden = model.text_encoder(input_ids, attention_mask, kv)  # [B, T, D]
                logits = model.itm_head(hidden[:, 0])  # [B, 2]
                (grad,) = torch.autograd.grad(logits[:, 1].sum(), kept[0])  # texts: independent
        finally:
            attn.probe = None
    b, t = input_ids.shape
    index = Packing.of(attention_mask).index  # [L] position b*T + t of each packed row

    def padded(rows: torch.Tensor) -> torch.Tensor:  # [1, h, L, 1+P] -> [B, h, T, 1+P]
        h, n = rows.shape[1], rows.shape[3]
        out = rows.new_zeros(h, b * t, n).index_copy_(1, index, rows[0])  # zeros at padding
        return out.view(h, b, t, n).transpose(0, 1).float()

    probs, grad = padded(kept[0].detach()), padded(grad)
    cams = (probs * grad.clamp(min=0)).mean(dim=1)  # [B, T, 1+P]
    return logits.detach().float(), cams[:, :, 1:]  # image CLS dropped: [B, T, P]


def explanations(
    texts: Sequence[str],
    ids: Sequence[Sequence[int]],
    tokens: Sequence[Sequence[str]],
    logits: np.ndarray,
    cams: np.ndarray,
    cosine: np.ndarray,
    *,
    grid: int,
    layer: int,
    image: np.ndarray,
) -> list[Explanation]:
    """The records of ``B`` texts from :func:`gradcam`'s ``logits [B, 2]`` and ``cams [B, T, P]``.

    ``ids`` are the texts' ``[CLS] ... [SEP]`` ids, ``tokens`` their word pieces without the two.
    """
    probability = itm_probability(logits)  # [B]
    out = []
    for j, row in enumerate(ids):
        n = len(row) - 2  # the caption's tokens: positions 1..n ([SEP] at n + 1)
        token_maps = cams[j, 1 : 1 + n].reshape(n, grid, grid)  # [L, grid, grid]
        mean = token_maps.mean(0) if n else np.zeros((grid, grid), np.float32)
        out.append(
            Explanation(
                text=texts[j],
                tokens=list(tokens[j]),
                token_maps=np.ascontiguousarray(token_maps, dtype=np.float32),
                map=mean.astype(np.float32),
                itm_probability=float(probability[j]),
                itm_logits=logits[j].astype(np.float32),
                itc_cosine=float(cosine[j]),
                layer=layer,
                image=image,
                text_tokens=len(row),
            )
        )
    return out
