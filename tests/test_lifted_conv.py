"""The placeholder convolution of directly built parts
(anemlld/convert/lifted_conv.py): conv2d's output shape without its work,
recorded in the trace, and translated by coremltools as conv2d."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from anemlld.convert import export, lifted_conv


@pytest.mark.parametrize("kernel,stride,padding,dilation,bias", [
    (1, 1, 0, 1, False), (1, 1, 0, 1, True), (3, 2, 1, 1, False), (3, 1, 2, 2, True)])
def test_the_output_has_conv2d_s_shape(kernel, stride, padding, dilation, bias):
    conv = nn.Conv2d(8, 12, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(1, 8, 5, 9)
    out = lifted_conv.of(conv, x, conv.weight)
    assert out.shape == conv(x).shape and out.dtype == x.dtype and not out.any()


class Lifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(16, 24, 1, bias=True)

    def forward(self, x, w):
        return torch.relu(lifted_conv.of(self.proj, x, w)) * 2.0


def test_coremltools_turns_the_traced_operator_into_the_conv_a_traced_conv2d_gives():
    ct = export._ct()
    lifted_conv.register()
    lifted_conv.register()  # idempotent
    m = Lifted().eval()
    x, w = torch.randn(1, 16, 1, 4), torch.zeros(()).expand(24, 16, 1, 1)
    traced = torch.jit.trace(m, (x, w), check_trace=False)
    assert lifted_conv.NAME in str(traced.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = ct.convert(traced, convert_to="milinternal",
                          inputs=[ct.TensorType(name="x", shape=x.shape), ct.TensorType(name="w", shape=w.shape)],
                          minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT32)
    ops = [op for op in prog.functions["main"].operations if op.op_type == "conv"]
    assert len(ops) == 1
    conv = ops[0]
    assert conv.weight.name == "w" and np.allclose(conv.bias.val, m.proj.bias.detach().numpy())
    # that the converted parts compute what the frontend's do: tests/test_program.py, every architecture
