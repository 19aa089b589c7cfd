"""Compressed constants (``constexpr_*``), dequantized once at load."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from anemlld.runtime.portable.registry import (
    BUILDERS, Kernel, OpView, Tensor, axis_index, builds, torch_dtype,
)


def _blocks(shape: Sequence[int], groups: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split each dim of ``shape`` into (groups, per-group size)."""
    for n, g in zip(shape, groups):
        if g == 0 or n % g:
            raise ValueError(f"dim {n} is not divisible into {g} groups")
    return list(groups), [n // g for n, g in zip(shape, groups)]


def lut_to_dense(indices: Tensor, lut: Tensor, vector_axis: int | None = None) -> Tensor:
    """Dequantize a palettized weight (iOS18 ``constexpr_lut_to_dense``).

    ``lut`` has shape ``[*groups, palettes, vector_size]``: for each dim of
    ``indices`` the weight is cut into ``groups[d]`` equal blocks and each block
    combination has its own palette (per-grouped-channel palettization cuts only
    the output-channel axis, so ``lut`` is ``[C_out/group_size, 1, 1, 1, P, 1]``
    for a conv weight). With ``vector_size > 1`` one index selects a vector that
    fills ``vector_size`` consecutive positions along ``vector_axis``.
    """
    rank = indices.dim()
    palettes, vsize = lut.shape[-2], lut.shape[-1]
    idx = indices.long()
    ax = None
    if vsize > 1:
        ax = axis_index(int(vector_axis), rank)
        idx = idx.transpose(ax, rank - 1)
        lut = lut.transpose(ax, rank - 1)
    ishape = list(idx.shape)
    groups, per = _blocks(ishape, lut.shape[:rank])
    interleaved = [d for pair in zip(groups, per) for d in pair]
    group_first = list(range(0, 2 * rank, 2)) + list(range(1, 2 * rank, 2))
    n_groups, n_per = math.prod(groups), math.prod(per)
    idx = idx.reshape(interleaved).permute(group_first).reshape(n_groups, n_per)
    table = lut.reshape(n_groups, palettes, vsize)
    out = torch.empty(n_groups, n_per, vsize, dtype=lut.dtype, device=lut.device)
    # Bounded chunks keep the int64 index temporaries small for big embeddings.
    step = max(1, (1 << 22) // max(1, n_per * vsize))
    for g in range(0, n_groups, step):
        sel = idx[g:g + step].unsqueeze(-1).expand(-1, -1, vsize)
        out[g:g + step] = torch.gather(table[g:g + step], 1, sel)
    back = [0] * (2 * rank)
    for pos, src in enumerate(group_first):
        back[src] = pos
    out = out.reshape(*groups, *per, vsize).permute(*back, 2 * rank).reshape(*ishape, vsize)
    out = out.reshape(*ishape[:-1], ishape[-1] * vsize)
    if ax is not None:
        out = out.transpose(ax, rank - 1)
    return out.contiguous()


def blockwise_shift_scale(data: Tensor, scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """``scale * (data - offset)`` with one scale per block (iOS18 ``constexpr_blockwise_shift_scale``)."""
    groups, per = _blocks(list(data.shape), list(scale.shape))
    interleaved = [d for pair in zip(groups, per) for d in pair]
    bshape = [d for g in groups for d in (g, 1)]
    x = data.float().reshape(interleaved)
    if offset is not None:
        x = x - offset.float().reshape(bshape)
    return (x * scale.float().reshape(bshape)).reshape(data.shape).to(scale.dtype)


@builds("constexpr_lut_to_dense")
def _constexpr_lut(b: OpView) -> Kernel:
    if b.has("shape"):  # the iOS16 op: packed indices, flat LUT
        return _materialized(b)
    axis = b.int("vector_axis", None)
    return (lambda indices, lut: lut_to_dense(indices, lut, axis)), ("indices", "lut")


@builds("constexpr_blockwise_shift_scale")
def _constexpr_shift_scale(b: OpView) -> Kernel:
    if b.has("offset"):
        return blockwise_shift_scale, ("data", "scale", "offset")
    return blockwise_shift_scale, ("data", "scale")


@builds("constexpr_sparse_to_dense")
def _constexpr_sparse(b: OpView) -> Kernel:
    if b.has("shape"):  # the iOS16 op: packed bit mask
        return _materialized(b)

    def run(nonzero: Tensor, mask: Tensor) -> Tensor:
        out = torch.zeros(tuple(mask.shape), dtype=nonzero.dtype, device=nonzero.device)
        out[mask != 0] = nonzero
        return out
    return run, ("nonzero_data", "mask")


def _materialized(b: OpView) -> Kernel:
    """coremltools' own numpy decompression, for the rarer constexpr variants."""
    op, device = b.op, b.device

    def run() -> Any:
        value = op.materialized_val_inference()
        values = value if isinstance(value, tuple) else (value,)
        tensors = tuple(tensor_of(np.asarray(v), torch_dtype(o.dtype), device)
                        for v, o in zip(values, op.outputs))
        return tensors if len(tensors) > 1 else tensors[0]
    return run, ()


for _name in ("constexpr_affine_dequantize", "constexpr_cast", "constexpr_lut_to_sparse",
              "constexpr_sparse_blockwise_shift_scale"):
    BUILDERS[_name] = _materialized


def tensor_of(value: Any, dtype: torch.dtype | None, device: torch.device | None) -> Tensor:
    arr = np.asarray(value)
    if arr.dtype == np.uint16 or arr.dtype == np.uint32:
        arr = arr.astype(np.int64)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C", copy=True)  # torch refuses read-only numpy memory
    t = torch.from_numpy(arr)
    return t if dtype is None and device is None else t.to(device=device, dtype=dtype)
