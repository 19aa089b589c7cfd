"""Our LUT quantizer: grouped-channel k-means, vectorized over every group of
a weight at once, and the MIL pass that stores the result as Core ML's
``constexpr_lut_to_dense``.

Two steps, so that each weight is clustered once however many functions use it:

1. :func:`quantize_module` runs k-means on the torch weights of a part (before
   tracing) and writes each weight back as its dequantized value: every group
   of ``group_size`` output channels then holds at most ``2**bits`` distinct
   fp16 values.
2. :func:`encode_program` runs on the converted MIL program of each function
   and replaces those weights by ``constexpr_lut_to_dense(indices, lut)``.
   It only re-encodes values exactly (no clustering), so the ``infer`` and
   ``prefill`` functions get byte-identical tables and indices, which
   ``save_multifunction`` stores once.

The k-means is Lloyd's algorithm in one dimension on sorted values: each
cluster is then a contiguous run, found with ``searchsorted`` on the midpoints,
and its mean comes from prefix sums, so an iteration costs O(groups x k x log n)
after one sort. It starts from quantiles of the companded density (see
:func:`companded_start`), which is deterministic.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.errors import AnemllError

log = logging.getLogger(__name__)

# Groups are processed in slabs of about this many values, bounding the
# temporary memory of sorting (values, indices, prefix sums) to ~200 MB.
SLAB_VALUES = 8_000_000
MAX_ITERATIONS = 100


def group_size_for(channels: int, group_size: int) -> int:
    """The requested group size, or the largest divisor of it that divides
    ``channels`` (vocabulary splits are not always multiples of 16)."""
    return math.gcd(channels, group_size)


def companded_start(xs: torch.Tensor, k: int, window: int = 8) -> torch.Tensor:
    """Starting centroids (G, k) from sorted rows ``xs`` (G, N): quantiles of
    the density p(x)^(1/3), the point density of an optimal high-resolution
    quantizer. Plain quantiles crowd the centre and starve the tails; from
    them Lloyd stalls at 2.5x the error of a good solution at 6 bits
    (measured on pico-llama), from this start it beats coremltools' k-means."""
    g, n = xs.shape
    w = min(window, max(n - 1, 1))
    lo = torch.cat([xs[:, :1].expand(g, w), xs[:, :-w]], 1)
    hi = torch.cat([xs[:, w:], xs[:, -1:].expand(g, w)], 1)
    density = (hi - lo).clamp(min=1e-12) ** (-1.0 / 3.0)  # local spacing ~ 1/p
    mass = (density * torch.diff(xs, dim=1, prepend=xs[:, :1])).cumsum(dim=1)
    mass = mass / mass[:, -1:].clamp(min=1e-300)
    targets = ((torch.arange(k, dtype=xs.dtype, device=xs.device) + 0.5) / k).expand(g, k).contiguous()
    return xs.gather(1, torch.searchsorted(mass.contiguous(), targets).clamp(max=n - 1))


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = MAX_ITERATIONS) -> torch.Tensor:
    """Centroids (G, k), non-decreasing, for each row of ``values`` (G, N)."""
    xs = values.float().sort(dim=1).values
    g, n = xs.shape
    dev = xs.device
    x64 = xs.double()
    csum = torch.nn.functional.pad(x64.cumsum(dim=1), (1, 0))
    csq = torch.nn.functional.pad((x64 * x64).cumsum(dim=1), (1, 0))
    c = companded_start(x64, k)
    rows = torch.arange(g, device=dev)
    zeros = torch.zeros(g, 1, dtype=torch.long, device=dev)
    full = torch.full((g, 1), n, dtype=torch.long, device=dev)
    for _ in range(iterations):
        mid = ((c[:, 1:] + c[:, :-1]) / 2).float().contiguous()
        cut = torch.searchsorted(xs, mid)
        starts, ends = torch.cat([zeros, cut], 1), torch.cat([cut, full], 1)
        counts = ends - starts
        sums = csum.gather(1, ends) - csum.gather(1, starts)
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        # An empty cluster (duplicate start values, or squeezed out) is moved
        # into the cluster with the largest squared error, splitting it.
        empty = counts == 0
        if bool(empty.any()):
            sse = (csq.gather(1, ends) - csq.gather(1, starts)) - sums * sums / counts.clamp(min=1)
            worst = sse.argmax(dim=1)
            victim = empty.float().argmax(dim=1)
            has = empty.any(dim=1)
            s0, e0 = starts[rows, worst], ends[rows, worst]
            lo = x64[rows, (s0 + (e0 - s0) // 4).clamp(max=n - 1)]
            hi = x64[rows, (s0 + 3 * (e0 - s0) // 4).clamp(max=n - 1)]
            new[rows[has], worst[has]] = lo[has]
            new[rows[has], victim[has]] = hi[has]
            new = new.sort(dim=1).values
        elif torch.equal(new, c):
            break
        c = new
    return c


def assign(values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's sorted ``lut`` (G, k) for
    every value in ``values`` (G, N)."""
    mid = ((lut[:, 1:].float() + lut[:, :-1].float()) / 2).contiguous()
    return torch.searchsorted(mid, values.float().contiguous())


@dataclass
class Quantized:
    lut: torch.Tensor      # (groups, 2**bits) fp16
    indices: torch.Tensor  # weight-shaped, uint8
    dense: torch.Tensor    # weight-shaped fp16: lut[indices]


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> Quantized:
    """k-means LUT of ``bits`` per group of ``group_size`` rows (axis 0)."""
    k = 1 << bits
    rows = weight.shape[0]
    g = group_size_for(rows, group_size)
    flat = weight.detach().reshape(rows // g, -1)
    per_group = flat.shape[1]
    slab = max(1, SLAB_VALUES // per_group)
    luts, idx = [], []
    for start in range(0, flat.shape[0], slab):
        part = flat[start:start + slab]
        lut = kmeans_1d(part, k).half()
        lut = lut.sort(dim=1).values  # fp16 rounding may reorder near-equal centroids
        luts.append(lut)
        idx.append(assign(part, lut).to(torch.uint8))
    lut = torch.cat(luts)
    indices = torch.cat(idx)
    dense = lut.gather(1, indices.long()).reshape(weight.shape)
    return Quantized(lut, indices.reshape(weight.shape), dense)


def quantize_module(module: nn.Module, bits: int, group_size: int, kind: type[nn.Module]) -> int:
    """Replace the weight of every ``kind`` submodule (Conv2d, Embedding) by
    its k-means dequantized value, in place. Returns the weights done."""
    done = 0
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, kind):
                q = quantize_weight(sub.weight, bits, group_size)
                sub.weight.copy_(q.dense.to(sub.weight.dtype))
                done += 1
    return done


# --- the MIL side -----------------------------------------------------------

WEIGHT_INPUT = {"conv": "weight", "gather": "x"}


def encode_exact(values: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(lut, indices) in iOS18 ``constexpr_lut_to_dense`` layout for a weight
    whose groups already hold at most ``2**bits`` distinct values."""
    k = 1 << bits
    rows = values.shape[0]
    g = group_size_for(rows, group_size)
    flat = torch.from_numpy(np.ascontiguousarray(values)).reshape(rows // g, -1).float()
    xs = flat.sort(dim=1).values
    new = torch.ones_like(xs, dtype=torch.bool)
    new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    rank = new.long().cumsum(dim=1) - 1
    distinct = int(rank[:, -1].max()) + 1
    if distinct > k:
        raise AnemllError(f"a weight group holds {distinct} distinct values, more than a {bits}-bit LUT",
                          "this is a converter bug: report it with the model's config.json",
                          stage="quantize", code="quantize_failed")
    # Unused entries repeat the group's largest value so each row stays sorted
    # and searchsorted finds every value's first (used) entry.
    lut = xs[:, -1:].repeat(1, k)
    lut.scatter_(1, rank, xs)
    indices = torch.searchsorted(lut.contiguous(), flat.contiguous())
    lut_shape = (rows // g,) + (1,) * (values.ndim - 1) + (k, 1)
    np_lut = lut.numpy().astype(values.dtype).reshape(lut_shape)
    return np_lut, indices.numpy().astype(np.uint8).reshape(values.shape)


def encode_program(prog, bits: int, group_size: int, op_type: str) -> int:
    """Replace every dense weight feeding an ``op_type`` op in ``prog`` (a
    pymil Program) with ``constexpr_lut_to_dense``. Returns the count."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager

    index_dtype = types.nptype_from_builtin(types.string_to_builtin(f"uint{bits}"))
    weight_input = WEIGHT_INPUT[op_type]

    def is_weight(op) -> bool:
        value = op.outputs[0].val
        if op.op_type != "const" or not isinstance(value, np.ndarray) or value.size < 2 or value.dtype.kind != "f":
            return False
        uses = op.outputs[0].child_ops
        return bool(uses) and all(u.op_type == op_type and u.inputs.get(weight_input) is op.outputs[0] for u in uses)

    class LutEncode(AbstractGraphPass):
        """Run as a coremltools graph pass, so the new ops get scope info."""

        done = 0

        def apply(self, program):
            @block_context_manager
            def visit(block):
                for op in list(block.operations):
                    for inner in op.blocks:
                        visit(inner)
                    if not is_weight(op):
                        continue
                    table, indices = encode_exact(op.outputs[0].val, bits, group_size)
                    new = mb.constexpr_lut_to_dense(indices=indices.astype(index_dtype), lut=table,
                                                    before_op=op, name=op.name + "_lut")
                    block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                                       no_check_var_types=True)
                    block.remove_ops([op])
                    self.done += 1

            for fn in program.functions.values():
                visit(fn)

    encode = LutEncode()
    encode(prog)
    return encode.done
