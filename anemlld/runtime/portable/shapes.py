"""Shapes, layout and tensor creation."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from anemlld.runtime.portable.registry import Kernel, Tensor, OpView, axis_index, builds


def _reshape_target(shape: Sequence[int], x_shape: Sequence[int]) -> list[int]:
    # iOS17+ rule: a 0 copies the dim of x counted from the right (1 when out of range).
    out = list(shape)
    for i, s in enumerate(out):
        if s == 0:
            j = len(x_shape) - (len(out) - i)
            out[i] = x_shape[j] if 0 <= j < len(x_shape) else 1
    return out


@builds("reshape")
def _reshape(b: OpView) -> Kernel:
    if b.is_const("shape"):
        shape = b.ints("shape")
        if 0 not in shape:
            target = tuple(shape)
            return (lambda x: x.reshape(target)), ("x",)
        return (lambda x: x.reshape(_reshape_target(shape, x.shape))), ("x",)
    return (lambda x, s: x.reshape(_reshape_target(s.tolist(), x.shape))), ("x", "shape")


@builds("flatten2d")
def _flatten2d(b: OpView) -> Kernel:
    axis = b.int("axis", 1)

    def run(x: Tensor) -> Tensor:
        a = axis_index(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
    return run, ("x",)


@builds("transpose")
def _transpose(b: OpView) -> Kernel:
    perm = tuple(b.ints("perm"))
    return (lambda x: x.permute(perm)), ("x",)


@builds("expand_dims")
def _expand_dims(b: OpView) -> Kernel:
    axes = b.ints("axes")

    def run(x: Tensor) -> Tensor:
        rank = x.dim() + len(axes)
        for a in sorted(axis_index(a, rank) for a in axes):
            x = x.unsqueeze(a)
        return x
    return run, ("x",)


@builds("squeeze")
def _squeeze(b: OpView) -> Kernel:
    axes = b.ints("axes", None)
    if axes is None:
        return torch.squeeze, ("x",)
    dims = tuple(axes)
    return (lambda x: x.squeeze(dims)), ("x",)


@builds("reverse")
def _reverse(b: OpView) -> Kernel:
    axes = b.ints("axes", None)
    return (lambda x: x.flip(tuple(range(x.dim())) if axes is None else tuple(axes))), ("x",)


@builds("tile")
def _tile(b: OpView) -> Kernel:
    if b.is_const("reps"):
        reps = tuple(b.ints("reps"))
        return (lambda x: x.repeat(reps)), ("x",)
    return (lambda x, r: x.repeat(tuple(r.tolist()))), ("x", "reps")


@builds("concat")
def _concat(b: OpView) -> Kernel:
    axis, interleave = b.int("axis"), b.bool("interleave", False)
    if not interleave:
        return (lambda values: torch.cat(values, dim=axis)), ("values",)

    def run(values: list[Tensor]) -> Tensor:
        # stack on a new axis right after `axis`, then merge: output[k::n] = values[k].
        a = axis_index(axis, values[0].dim())
        stacked = torch.stack(values, dim=a + 1)
        shape = list(values[0].shape)
        shape[a] *= len(values)
        return stacked.reshape(shape)
    return run, ("values",)


@builds("stack")
def _stack(b: OpView) -> Kernel:
    axis = b.int("axis")
    return (lambda values: torch.stack(values, dim=axis)), ("values",)


@builds("split")
def _split(b: OpView) -> Kernel:
    axis = b.int("axis")
    n_out = len(b.op.outputs)
    sizes = b.ints("split_sizes", None)

    def run(x: Tensor) -> tuple[Tensor, ...]:
        if sizes is not None:
            return tuple(torch.split(x, sizes, dim=axis))
        return tuple(torch.split(x, x.shape[axis] // n_out, dim=axis))
    return run, ("x",)


@builds("fill")
def _fill(b: OpView) -> Kernel:
    value, out, dev = b.float("value", 0.0), b.out_dtype(), b.device
    if b.is_const("shape"):
        shape = tuple(b.ints("shape"))
        return (lambda: torch.full(shape, value, dtype=out, device=dev)), ()
    return (lambda s: torch.full(tuple(s.tolist()), value, dtype=out, device=dev)), ("shape",)


@builds("fill_like")
def _fill_like(b: OpView) -> Kernel:
    value, out = b.float("value", 0.0), b.out_dtype()
    return (lambda ref: torch.full(tuple(ref.shape), value, dtype=out, device=ref.device)), ("ref_tensor",)


@builds("shape")
def _shape(b: OpView) -> Kernel:
    out, dev = b.out_dtype(), b.device
    return (lambda x: torch.tensor(tuple(x.shape), dtype=out, device=dev)), ("x",)


@builds("range_1d")
def _range_1d(b: OpView) -> Kernel:
    out, dev = b.out_dtype(), b.device

    def run(start: Tensor, end: Tensor, step: Tensor) -> Tensor:
        return torch.arange(start.item(), end.item(), step.item(), dtype=out, device=dev)
    return run, ("start", "end", "step")


@builds("band_part")
def _band_part(b: OpView) -> Kernel:
    lower, upper = b.int("lower", -1), b.int("upper", -1)
    masks: dict[tuple, Tensor] = {}

    def run(x: Tensor) -> Tensor:
        rows, cols = x.shape[-2], x.shape[-1]
        key = (rows, cols, x.device)
        keep = masks.get(key)
        if keep is None:
            r = torch.arange(rows, device=x.device)[:, None]
            c = torch.arange(cols, device=x.device)[None, :]
            keep = torch.ones(rows, cols, dtype=torch.bool, device=x.device)
            if lower >= 0:
                keep &= (r - c) <= lower
            if upper >= 0:
                keep &= (c - r) <= upper
            masks[key] = keep
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return run, ("x",)


@builds("one_hot")
def _one_hot(b: OpView) -> Kernel:
    axis = b.int("axis", -1)
    on, off, out = b.float("on_value", 1.0), b.float("off_value", 0.0), b.out_dtype()

    def run(indices: Tensor, depth: Tensor) -> Tensor:
        hot = F.one_hot(indices.long(), int(depth.item()))
        hot = hot.movedim(-1, axis_index(axis, indices.dim() + 1))
        return torch.where(hot.bool(), torch.tensor(on, dtype=out, device=hot.device),
                           torch.tensor(off, dtype=out, device=hot.device))
    return run, ("indices", "one_hot_vector_size")


@builds("pad")
def _pad(b: OpView) -> Kernel:
    mode = b.str("mode", "constant")
    value = b.float("constant_val", 0.0)
    torch_mode = {"constant": "constant", "reflect": "reflect", "replicate": "replicate"}[mode]

    def run(x: Tensor, pad: Tensor) -> Tensor:
        # MIL lists (before, after) from the first padded dim; torch from the last.
        p = [int(v) for v in pad.tolist()]
        pairs = [(p[2 * i], p[2 * i + 1]) for i in range(len(p) // 2)]
        flat = [v for pair in reversed(pairs) for v in pair]
        if torch_mode == "constant":
            return F.pad(x, flat, mode="constant", value=value)
        return F.pad(x, flat, mode=torch_mode)
    return run, ("x", "pad")


@builds("topk")
def _topk(b: OpView) -> Kernel:
    axis, ascending = b.int("axis", -1), b.bool("ascending", False)
    sort = b.bool("sort", True)
    n_out = len(b.op.outputs)
    idx_dtype = b.out_dtype(1) if n_out > 1 else torch.int32

    def run(x: Tensor, k: Tensor) -> Any:
        values, indices = torch.topk(x, int(k.item()), dim=axis, largest=not ascending, sorted=sort)
        return (values, indices.to(idx_dtype)) if n_out > 1 else values
    return run, ("x", "k")


@builds("argsort")
def _argsort(b: OpView) -> Kernel:
    axis, ascending, out = b.int("axis", -1), b.bool("ascending", False), b.out_dtype()
    return (lambda x: torch.argsort(x, dim=axis, descending=not ascending, stable=True).to(out)), ("x",)
