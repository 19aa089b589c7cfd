"""The portable executor: runs the MIL program inside a saved Core ML
``.mlpackage`` with torch, where Core ML itself cannot predict (Linux, CI).

The package is split by job: ``model`` (loading a package, input and state
validation at ``predict`` time), ``compiler`` (one function into a step list:
constant folding, dequantizing ``constexpr_*`` weights once, dead-code
removal), ``aliases`` (which state updates can happen in place), and the MIL
op semantics as torch code, one small builder per op type registered in
``registry.BUILDERS``, by op family: ``elementwise``, ``reductions``,
``shapes``, ``slicing``, ``gathers``, ``linalg``, ``normalization``,
``states``, ``constants``.

Precision: every value is stored in the dtype its MIL type names (fp16 as
``torch.float16``, exactly as Core ML hands tensors between ops). Element-wise
ops, matmul, linear and conv run on those fp16 tensors directly (torch computes
them in fp32 internally on CPU and rounds the result once). Softmax, the
normalizations, reductions, cumsum and attention are computed explicitly in
fp32 and rounded to fp16 at the op boundary. Results therefore match Core ML
within fp16 tolerance, not bit for bit (the Neural Engine accumulates
differently).

States: a state is a caller-owned fp16 tensor, updated in place, so one
``make_state()`` dict can be shared by several packages that declare the same
state (the chunks of a model share one KV cache). ``read_state`` hands out the
state tensor itself and ``slice_update`` writes into it directly whenever the
load-time alias plan proves nobody can observe the difference; otherwise the
executor copies, so semantics never depend on that optimisation.
"""
from __future__ import annotations

# Importing the op families registers their builders.
from anemlld.runtime.portable import (  # noqa: F401
    constants, elementwise, gathers, linalg, normalization, reductions, shapes, slicing, states,
)
from anemlld.runtime.portable.constants import blockwise_shift_scale, lut_to_dense
from anemlld.runtime.portable.model import PortableModel
from anemlld.runtime.portable.registry import StateSpec, default_device, supported_op_types

__all__ = ["PortableModel", "StateSpec", "blockwise_shift_scale", "default_device", "lut_to_dense",
           "supported_op_types"]
