"""Reductions, arg-reductions and cumulative sums."""
from __future__ import annotations

from typing import Callable

import torch

from anemlld.runtime.portable.registry import Kernel, Tensor, BUILDERS, OpView, axis_index, as_f32, builds


def _reduction(b: OpView, fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> Kernel:
    axes = b.ints("axes", None)
    keep = b.bool("keep_dims", False)
    out = b.out_dtype()

    def run(x: Tensor) -> Tensor:
        dims = tuple(range(x.dim())) if axes is None else tuple(axis_index(a, x.dim()) for a in axes)
        return fn(as_f32(x), dims, keep).to(out)
    return run, ("x",)


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


_REDUCTIONS: dict[str, Callable[[Tensor, tuple[int, ...], bool], Tensor]] = {
    "reduce_sum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "reduce_mean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "reduce_max": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "reduce_min": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "reduce_prod": _prod,
    "reduce_sum_square": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "reduce_l1_norm": lambda x, d, k: torch.sum(x.abs(), dim=d, keepdim=k),
    "reduce_l2_norm": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "reduce_log_sum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "reduce_log_sum_exp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}

for _name, _fn in _REDUCTIONS.items():
    BUILDERS[_name] = lambda b, fn=_fn: _reduction(b, fn)


@builds("reduce_argmax", "reduce_argmin")
def _reduce_arg(b: OpView) -> Kernel:
    axis, keep = b.int("axis", -1), b.bool("keep_dims", False)
    fn = torch.argmax if b.op_type == "reduce_argmax" else torch.argmin
    out = b.out_dtype()
    return (lambda x: fn(x, dim=axis, keepdim=keep).to(out)), ("x",)


@builds("cumsum")
def _cumsum(b: OpView) -> Kernel:
    axis, exclusive, reverse = b.int("axis", 0), b.bool("exclusive", False), b.bool("reverse", False)
    out = b.out_dtype()

    def run(x: Tensor) -> Tensor:
        y = as_f32(x)
        if reverse:
            y = y.flip(axis)
        c = torch.cumsum(y, dim=axis)
        if exclusive:
            c = c - y
        if reverse:
            c = c.flip(axis)
        return c.to(out)
    return run, ("x",)
