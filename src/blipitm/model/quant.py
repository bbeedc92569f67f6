"""Dynamic int8 linear layers: int8 weights per output channel, int8 activations per row.

``y = (round(x / sx) @ round(w / sw).T) * sx * sw + b`` with symmetric scales ``sx = max|x_row| /
127`` (computed for each input row at run time) and ``sw = max|w_row| / 127`` (per output channel,
once). The int8 x int8 -> int32 product is ``torch._int_mm``, the kernel PyTorch's maintained
quantization library (torchao) builds its dynamic int8 path on; it runs on VNNI / AMX-INT8 through
oneDNN. ``torch.ao.quantization.quantize_dynamic`` still exists in torch 2.13 but is deprecated
("will be removed", pointing to torchao, which is not a dependency here), and its quantized
tensor types are deprecated too. Per-row activation scales are also more accurate than its
per-tensor ones (measured on random GEMMs of BERT-base shapes: half the largest error).
"""

from __future__ import annotations

import torch
from torch import nn

from blipitm.model.layers import Linear


class Int8Linear(nn.Module):
    """A :class:`Linear` with int8 weights; input and output in float32."""

    weight_t: torch.Tensor  # [K, N] int8
    weight_scale: torch.Tensor  # [N] float32
    bias: torch.Tensor | None  # [N] float32

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # [N, K]
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # [N]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", q.t().contiguous())  # [K, N]: _int_mm's layout
        self.register_buffer("weight_scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # [M, K]
        # Zero rows get scale 1 (not 0): their product is 0 either way and nothing divides by 0.
        x_scale = x2.abs().amax(dim=1, keepdim=True) / 127  # [M, 1]
        x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
        xq = torch.round(x2 / x_scale).to(torch.int8)  # |x / sx| <= 127: no clamp needed
        y = torch._int_mm(xq, self.weight_t).float()  # [M, N] int32 -> float32
        y = y.mul_(x_scale).mul_(self.weight_scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)


def quantize_int8(module: nn.Module) -> None:
    """Replace every :class:`Linear` under ``module`` by an :class:`Int8Linear`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, Linear):
            setattr(module, name, Int8Linear(child))
        else:
            quantize_int8(child)


def int8_supported() -> bool:
    """Whether this torch build has the int8 matmul kernel (all recent CPU builds do)."""
    return hasattr(torch, "_int_mm")
