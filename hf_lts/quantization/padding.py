"""Any padding an `nn.Conv2d` takes, as `QuantConv2d` and the ONNX export compute it.

The quantized convolution (native kernels, ``aten.convolution_backward``, ONNX ``Conv``) takes symmetric zero
padding in integers. Everything else a Conv2d accepts — ``padding="valid"``, ``"same"`` (asymmetric for even
kernels: PyTorch puts the extra row and column at the bottom and right), ``padding_mode`` reflect /
replicate / circular — becomes an `InputPad` before an unpadded convolution: the same output, bit for bit,
since padding commutes with the element-wise fake quantization of the input (zero stays zero).
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F


class InputPad(nn.Module):
    """``F.pad(x, pads, mode)`` with ``pads = (left, right, top, bottom)``."""

    def __init__(self, pads: tuple[int, int, int, int], mode: str) -> None:
        super().__init__()
        self.pads, self.mode = pads, mode

    def forward(self, x):
        return F.pad(x, self.pads, mode=self.mode)

    def extra_repr(self) -> str:
        return f"pads={self.pads}, mode={self.mode!r}"


def conv_padding(conv: nn.Conv2d) -> tuple[tuple[int, int], InputPad | None]:
    """``(padding, pad)``: integer zero padding for the convolution and, where that cannot express
    ``conv``'s padding, the `InputPad` to apply to its input first (with ``padding`` then ``(0, 0)``)."""
    if conv.padding == "valid":
        sides = [(0, 0), (0, 0)]
    elif conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        sides = [(t // 2, t - t // 2) for t in totals]
    else:
        sides = [(p, p) for p in conv.padding]
    (top, bottom), (left, right) = sides
    if conv.padding_mode == "zeros" and top == bottom and left == right:
        return (top, left), None
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return (0, 0), InputPad((left, right, top, bottom), mode)
