"""Read a resolved checkpoint's tensors in Hugging Face names, checked against its config."""

from __future__ import annotations

import torch

from blipitm.checkpoint.io import read_state_dict
from blipitm.checkpoint.keys import captioner_expected_shapes, hf_from_original, untie
from blipitm.checkpoint.resolve import ResolvedCheckpoint
from blipitm.checkpoint.strict import check_shapes, check_state_dict


def load_weights(
    resolved: ResolvedCheckpoint, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, HF-named, training-only tensors dropped, strictly checked.

    ``dtype`` converts floating tensors as they are read, one at a time, so that a bf16 load
    never holds the fp32 weights all at once.

    A captioner's tied LM-head copies are checked and dropped (:func:`untie`).

    The rename is applied to both kinds: it is the identity on HF names, and it drops the legacy
    ``position_ids`` buffer that older transformers ``.bin`` files carry.
    """
    state_dict = hf_from_original(read_state_dict(resolved.weights_path, dtype=dtype))
    if resolved.task == "caption":
        state_dict = untie(state_dict)
        v, t = resolved.config.vision, resolved.config.text
        what = (
            f"the captioner config (vision {v.hidden_size}x{v.num_hidden_layers}, "
            f"text decoder {t.hidden_size}x{t.num_hidden_layers}, vocab {t.vocab_size})"
        )
        check_shapes(state_dict, captioner_expected_shapes(resolved.config), what=what)
        return state_dict
    check_state_dict(state_dict, resolved.config)
    return state_dict
