"""Slicing and slice updates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from anemlld.runtime.portable.registry import Kernel, Tensor, Dynamic, OpView, builds


@dataclass(frozen=True)
class _SliceRule:
    """The constant parts of a slice_by_index / slice_update."""

    stride: tuple[int, ...] | None
    begin_mask: tuple[bool, ...] | None
    end_mask: tuple[bool, ...] | None
    squeeze_mask: tuple[bool, ...] | None

    @classmethod
    def of(cls, b: OpView) -> "_SliceRule":
        def opt(key: str, conv) -> tuple | None:
            v = conv(key, None)
            return None if v is None else tuple(v)
        return cls(opt("stride", b.ints), opt("begin_mask", b.bools), opt("end_mask", b.bools),
                    opt("squeeze_mask", b.bools))

    def index(self, begin: Sequence[int], end: Sequence[int], shape: Sequence[int] | None
              ) -> tuple[tuple, tuple[int, ...]]:
        """The torch index, plus the dims to flip first when a stride is
        negative (torch slices only forwards); ``shape`` is needed only then."""
        idx: list[Any] = []
        flips: list[int] = []
        for d in range(len(begin)):
            if self.squeeze_mask and self.squeeze_mask[d]:
                idx.append(int(begin[d]))
                continue
            start = None if self.begin_mask and self.begin_mask[d] else int(begin[d])
            stop = None if self.end_mask and self.end_mask[d] else int(end[d])
            step = self.stride[d] if self.stride else 1
            if step > 0:
                idx.append(slice(start, stop, step))
                continue
            if shape is None:
                raise Dynamic()
            n = shape[d]
            picked = range(*slice(start, stop, step).indices(n))
            flips.append(d)
            idx.append(slice(0, 0) if len(picked) == 0 else slice(n - 1 - picked[0], n - picked[-1], -step))
        return tuple(idx), tuple(flips)


def _slicer(b: OpView) -> tuple[Callable[..., tuple[tuple, tuple[int, ...]]], tuple[str, ...]]:
    """A function (x, *dynamic begin/end) -> (index, flips) and the inputs it needs."""
    rule = _SliceRule.of(b)
    if b.is_const("begin") and b.is_const("end"):
        begin, end = b.ints("begin"), b.ints("end")
        try:
            fixed = rule.index(begin, end, None)
            return (lambda x: fixed), ()
        except Dynamic:
            return (lambda x: rule.index(begin, end, x.shape)), ()
    if b.is_const("begin"):
        begin = b.ints("begin")
        return (lambda x, e: rule.index(begin, e.tolist(), x.shape)), ("end",)
    if b.is_const("end"):
        end = b.ints("end")
        return (lambda x, bg: rule.index(bg.tolist(), end, x.shape)), ("begin",)
    return (lambda x, bg, e: rule.index(bg.tolist(), e.tolist(), x.shape)), ("begin", "end")


def _take(x: Tensor, idx: tuple, flips: tuple[int, ...]) -> Tensor:
    return (x.flip(flips) if flips else x)[idx]


@builds("slice_by_index")
def _slice_by_index(b: OpView) -> Kernel:
    index, extra = _slicer(b)
    if not extra:
        return (lambda x: _take(x, *index(x))), ("x",)
    return (lambda x, *dyn: _take(x, *index(x, *dyn))), ("x", *extra)


@builds("slice_by_size")
def _slice_by_size(b: OpView) -> Kernel:
    def bounds(x: Tensor, begin: Sequence[int], size: Sequence[int]) -> tuple:
        return tuple(slice(bg, x.shape[d] if sz == -1 else bg + sz) for d, (bg, sz) in enumerate(zip(begin, size)))

    if b.is_const("begin") and b.is_const("size"):
        begin, size = b.ints("begin"), b.ints("size")
        return (lambda x: x[bounds(x, begin, size)]), ("x",)
    return (lambda x, bg, sz: x[bounds(x, bg.tolist(), sz.tolist())]), ("x", "begin", "size")


@builds("slice_update")
def _slice_update(b: OpView) -> Kernel:
    index, extra = _slicer(b)
    in_place, clone_update = b.mode == "inplace", b.clone_update

    def run(x: Tensor, update: Tensor, *dyn: Tensor) -> Tensor:
        idx, flips = index(x, *dyn)
        if clone_update:
            update = update.clone()  # it shares memory with x; copy_ refuses overlaps
        if flips:
            y = x.flip(flips)
            view = y[idx]
            view.copy_(update.reshape(view.shape))
            y = y.flip(flips)
            if in_place:
                x.copy_(y)
                return x
            return y
        y = x if in_place else x.clone()
        view = y[idx]
        view.copy_(update.reshape(view.shape))
        return y
    return run, ("x", "update", *extra)
