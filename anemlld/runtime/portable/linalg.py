"""Linear algebra: matmul, linear, conv."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from anemlld.runtime.portable.registry import Kernel, Tensor, OpView, builds


@builds("matmul")
def _matmul(b: OpView) -> Kernel:
    tx, ty = b.bool("transpose_x", False), b.bool("transpose_y", False)

    def run(x: Tensor, y: Tensor) -> Tensor:
        if tx and x.dim() > 1:
            x = x.transpose(-1, -2)
        if ty and y.dim() > 1:
            y = y.transpose(-1, -2)
        return torch.matmul(x, y)
    return run, ("x", "y")


@builds("linear")
def _linear(b: OpView) -> Kernel:
    if b.has("bias"):
        return F.linear, ("x", "weight", "bias")
    return F.linear, ("x", "weight")


def _conv_padding(b: OpView, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
                  ) -> Callable[[Sequence[int]], list[tuple[int, int]]]:
    """(before, after) padding per spatial dim, as a function of the input's spatial shape."""
    pad_type = b.str("pad_type", "valid")
    n = len(kernel)
    if pad_type == "valid":
        return lambda spatial: [(0, 0)] * n
    if pad_type == "custom":
        p = b.ints("pad", [0] * 2 * n)
        pairs = [(p[2 * i], p[2 * i + 1]) for i in range(n)]
        return lambda spatial: pairs
    if pad_type not in ("same", "same_lower"):
        raise ValueError(f"conv pad_type {pad_type!r}")
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]

    def same(spatial: Sequence[int]) -> list[tuple[int, int]]:
        out = []
        for i, s, k in zip(spatial, strides, eff):
            total = max(0, s * math.ceil(i / s) - i + k - s)
            small, big = total // 2, total - total // 2
            out.append((big, small) if pad_type == "same_lower" else (small, big))
        return out
    return same


@builds("conv")
def _conv(b: OpView) -> Kernel:
    w_var = b.var("weight")
    kernel = list(w_var.shape[2:])
    n = len(kernel)
    strides = b.ints("strides", [1] * n)
    dilations = b.ints("dilations", [1] * n)
    groups = b.int("groups", 1)
    padding = _conv_padding(b, kernel, strides, dilations)
    args = ("x", "weight", "bias") if b.has("bias") else ("x", "weight")
    pointwise = (all(k == 1 for k in kernel) and all(s == 1 for s in strides) and groups == 1
                 and padding([1] * n) == [(0, 0)] * n)
    if pointwise:
        # A 1x1 conv is a matmul over the flattened spatial dims; torch's conv
        # path is several times slower for the (1, C, 1, S) layout used here,
        # and for one position (decoding) fp16 `linear` beats a matrix-vector mm.
        def run_pointwise(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
            w2 = w.reshape(w.shape[0], w.shape[1])
            if x.numel() == x.shape[0] * x.shape[1]:
                y = F.linear(x.reshape(x.shape[0], x.shape[1]), w2, bias)
                return y.reshape(x.shape[0], w.shape[0], *x.shape[2:])
            y = torch.matmul(w2, x.reshape(x.shape[0], x.shape[1], -1))
            if bias is not None:
                y = y + bias[:, None]
            return y.reshape(x.shape[0], w.shape[0], *x.shape[2:])
        return run_pointwise, args

    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]

    def run(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        pads = padding(list(x.shape[2:]))
        if all(p0 == p1 for p0, p1 in pads):
            return conv_fn(x, w, bias, strides, [p0 for p0, _ in pads], dilations, groups)
        x = F.pad(x, [v for pair in reversed(pads) for v in pair])
        return conv_fn(x, w, bias, strides, 0, dilations, groups)
    return run, args
