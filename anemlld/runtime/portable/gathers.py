"""Gathers."""
from __future__ import annotations

import math

import torch

from anemlld.runtime.portable.registry import Kernel, Tensor, OpView, axis_index, builds


def _index_long(indices: Tensor, size: int) -> Tensor:
    i = indices.long()
    return torch.where(i < 0, i + size, i)  # MIL allows negative indices


@builds("gather")
def _gather(b: OpView) -> Kernel:
    axis, batch_dims = b.int("axis", 0), b.int("batch_dims", 0)

    def run(x: Tensor, indices: Tensor) -> Tensor:
        a = axis_index(axis, x.dim())
        idx = _index_long(indices, x.shape[a])
        if batch_dims == 0:
            out = x.index_select(a, idx.reshape(-1))
            return out.reshape(*x.shape[:a], *idx.shape, *x.shape[a + 1:])
        batch = x.shape[:batch_dims]
        nb = math.prod(batch)
        xb = x.reshape(nb, *x.shape[batch_dims:]).movedim(a - batch_dims + 1, 1)
        ib = idx.reshape(nb, -1)
        picked = xb[torch.arange(nb, device=x.device)[:, None], ib]  # (nb, M, *rest)
        before = x.shape[batch_dims:a]
        picked = picked.reshape(nb, *idx.shape[batch_dims:], *before, *x.shape[a + 1:])
        n_idx = idx.dim() - batch_dims
        # move the `before` dims ahead of the index dims: out = B + before + N + after
        order = [0, *range(1 + n_idx, 1 + n_idx + len(before)), *range(1, 1 + n_idx),
                 *range(1 + n_idx + len(before), picked.dim())]
        return picked.permute(order).reshape(*batch, *before, *idx.shape[batch_dims:], *x.shape[a + 1:])
    return run, ("x", "indices")


@builds("gather_along_axis")
def _gather_along_axis(b: OpView) -> Kernel:
    axis = b.int("axis", 0)

    def run(x: Tensor, indices: Tensor) -> Tensor:
        a = axis_index(axis, x.dim())
        return torch.gather(x, a, _index_long(indices, x.shape[a]))
    return run, ("x", "indices")


@builds("gather_nd")
def _gather_nd(b: OpView) -> Kernel:
    batch_dims = b.int("batch_dims", 0)

    def run(x: Tensor, indices: Tensor) -> Tensor:
        k = indices.shape[-1]
        batch = x.shape[:batch_dims]
        nb = math.prod(batch)
        xb = x.reshape(nb, *x.shape[batch_dims:])
        ib = indices.reshape(nb, -1, k).long()
        parts = [torch.arange(nb, device=x.device)[:, None]]
        for j in range(k):
            parts.append(_index_long(ib[..., j], xb.shape[1 + j]))
        picked = xb[tuple(parts)]  # (nb, M, *rest)
        return picked.reshape(*batch, *indices.shape[batch_dims:-1], *x.shape[batch_dims + k:])
    return run, ("x", "indices")
