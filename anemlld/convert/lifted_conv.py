"""The convolution a lifted weight goes through while its part is traced.

A directly built part (``program.py``) is traced with each projection weight
as an input whose values do not matter: only the graph is kept. Running the
real ``conv2d`` there cost most of an 8B-shaped layer's export (torch's fp16
convolution on the CPU: 4.6 s for one 14336 x 4096 weight over a 64-token
prefill batch, and a zero weight costs as much as any). This operator has
``conv2d``'s signature and records itself in the trace, but returns zeros of
the output's shape without computing; the torch frontend of coremltools
converts it with its own ``conv2d`` translation, so the program is the one a
traced ``conv2d`` gives.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

NAME = "anemlld::lifted_conv2d"


@torch.library.custom_op(NAME, mutates_args=())
def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Zeros shaped like ``F.conv2d(x, weight, bias, stride, padding,
    dilation, groups)``'s output."""
    return x.new_zeros(_output_shape(x, weight, stride, padding, dilation))


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    return x.new_empty(_output_shape(x, weight, stride, padding, dilation))


def _output_shape(x, weight, stride, padding, dilation) -> tuple[int, int, int, int]:
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, weight.shape[0], out_h, out_w


def of(conv: torch.nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv`` applied to ``x`` with ``weight`` in place of its own, as the trace records it."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"lifted convolutions take numeric zero padding, not {conv.padding!r} / {conv.padding_mode}")
    return conv2d(x, weight, conv.bias, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)


def register() -> None:
    """Let coremltools' torch frontend translate the operator as ``conv2d``
    (same inputs in the same order). Idempotent."""
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    if NAME not in _TORCH_OPS_REGISTRY:
        _TORCH_OPS_REGISTRY.set_func_by_name(ops._convolution, NAME)
