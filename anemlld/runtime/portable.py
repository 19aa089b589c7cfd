"""The portable executor: runs the MIL program inside a saved Core ML
``.mlpackage`` with torch, where Core ML itself cannot predict (Linux, CI).

This module owns turning a package into per-function step lists (loading,
constant folding, dequantizing ``constexpr_*`` weights once, dead-code
removal, planning which state updates can happen in place), the MIL op
semantics as torch code (one small builder per op type in ``_OPS``), and
input/state validation at ``predict`` time.

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

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import AnemllError

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Kernel = tuple[Callable[..., Any], tuple[str, ...]]
"""What an op builder returns: the function run per call and the names of
the op inputs passed to it, in order (a list input arrives as a list)."""

_STATE_SLOT = 0  # env[0] holds the caller's state dict; state vars resolve to it
_STATE_OPS = frozenset({"read_state", "coreml_update_state"})
# Ops whose torch implementation may return a view of (or the very object of)
# an input. The alias plan follows them; every other op must return new memory.
_VIEW_OPS = frozenset({
    "identity", "reshape", "squeeze", "expand_dims", "transpose", "slice_by_index",
    "slice_by_size", "split", "cast", "flatten2d",
})

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "uint8": torch.uint8, "bool": torch.bool,
    # torch has no general uint16/uint32 arithmetic; values fit in wider ints.
    "uint16": torch.int32, "uint32": torch.int64,
    # Sub-byte types arrive unpacked from the blob reader, one value per byte.
    "uint1": torch.uint8, "uint2": torch.uint8, "uint3": torch.uint8, "uint4": torch.uint8,
    "uint6": torch.uint8, "int4": torch.int8,
}


class StateSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def _ct():
    # coremltools logs a "Failed to load ..." banner on Linux at import time.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools
    return coremltools


def _dtype_name(builtin: Any) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(builtin)


def _torch_dtype(builtin: Any) -> torch.dtype:
    name = _dtype_name(builtin)
    if name not in _TORCH_DTYPES:
        raise AnemllError(f"MIL dtype {name} is not supported by the portable executor",
                          "this package needs Core ML on macOS", stage="runtime", code="unsupported_op")
    return _TORCH_DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- the op view handed to builders ------------------------------------------

class _Dynamic(Exception):
    """An input a builder needs at load time is only known at run time."""


_REQUIRED = object()


class _OpView:
    """Load-time view of one MIL operation: constant inputs as Python/numpy
    values, output dtypes, and the alias-plan decisions for state ops."""

    def __init__(self, op: Any, const_value: Callable[[Any], Any], device: torch.device,
                 mode: str = "copy", clone_update: bool = False):
        self.op = op
        self.op_type: str = op.op_type
        self.name: str = op.name
        self.device = device
        self.mode = mode
        self.clone_update = clone_update
        self._const_value = const_value

    def has(self, key: str) -> bool:
        return key in self.op.inputs

    def var(self, key: str) -> Any:
        return self.op.inputs[key]

    def is_const(self, key: str) -> bool:
        try:
            self.value(key)
            return True
        except _Dynamic:
            return False

    def value(self, key: str, default: Any = _REQUIRED) -> Any:
        if key not in self.op.inputs:
            if default is _REQUIRED:
                raise KeyError(f"{self.op_type} {self.name!r} has no input {key!r}")
            return default
        return self._const_value(self.op.inputs[key])

    def ints(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self.value(key, default)
        return v if v is default else [int(i) for i in np.asarray(v).reshape(-1)]

    def int(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self.value(key, default)
        return v if v is default else int(np.asarray(v).reshape(()))

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self.value(key, default)
        return v if v is default else float(np.asarray(v, dtype=np.float64).reshape(()))

    def bool(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self.value(key, default)
        return v if v is default else bool(np.asarray(v).reshape(()))

    def bools(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self.value(key, default)
        return v if v is default else [bool(i) for i in np.asarray(v).reshape(-1)]

    def str(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self.value(key, default)
        return v if v is default else str(v)

    def out_dtype(self, i: int = 0) -> torch.dtype:
        return _torch_dtype(self.op.outputs[i].dtype)


_OPS: dict[str, Callable[[_OpView], Kernel]] = {}


def _op(*names: str):
    def register(builder: Callable[[_OpView], Kernel]):
        for name in names:
            _OPS[name] = builder
        return builder
    return register


def supported_op_types() -> list[str]:
    return sorted(_OPS)


def _f32(x: Tensor) -> Tensor:
    return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- element-wise ------------------------------------------------------------

_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "floor_div": torch.floor_divide, "mod": torch.remainder,  # numpy floor semantics, as MIL
    "equal": torch.eq, "not_equal": torch.ne, "less": torch.lt, "less_equal": torch.le,
    "greater": torch.gt, "greater_equal": torch.ge,
    "logical_and": torch.logical_and, "logical_or": torch.logical_or, "logical_xor": torch.logical_xor,
}

for _name, _fn in _BINARY.items():
    _OPS[_name] = lambda b, fn=_fn: (fn, ("x", "y"))


@_op("real_div")
def _real_div(b: _OpView) -> Kernel:
    out = b.out_dtype()
    if out.is_floating_point:
        return torch.div, ("x", "y")
    return (lambda x, y: torch.div(x, y).to(out)), ("x", "y")


_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "abs": torch.abs, "acos": torch.acos, "asin": torch.asin, "atan": torch.atan, "atanh": torch.atanh,
    "ceil": torch.ceil, "cos": torch.cos, "cosh": torch.cosh, "erf": torch.erf, "exp": torch.exp,
    "exp2": torch.exp2, "floor": torch.floor, "round": torch.round, "sign": torch.sign, "sin": torch.sin,
    "sinh": torch.sinh, "sqrt": torch.sqrt, "square": torch.square, "tan": torch.tan, "tanh": torch.tanh,
    "relu": torch.relu, "relu6": F.relu6, "sigmoid": torch.sigmoid, "silu": F.silu,
    "softsign": F.softsign, "softplus": F.softplus, "logical_not": torch.logical_not,
}

for _name, _fn in _UNARY.items():
    _OPS[_name] = lambda b, fn=_fn: (fn, ("x",))


@_op("inverse")
def _inverse(b: _OpView) -> Kernel:
    eps = b.float("epsilon", 1e-4)
    return (lambda x: torch.reciprocal(x + eps)), ("x",)


@_op("log")
def _log(b: _OpView) -> Kernel:
    eps = b.float("epsilon", 1e-45)
    return (lambda x: torch.log(x + eps) if eps else torch.log(x)), ("x",)


@_op("rsqrt")
def _rsqrt(b: _OpView) -> Kernel:
    eps = b.float("epsilon", 1e-12)
    return (lambda x: torch.rsqrt(x + eps) if eps else torch.rsqrt(x)), ("x",)


@_op("clip")
def _clip(b: _OpView) -> Kernel:
    lo, hi = b.float("alpha"), b.float("beta")
    return (lambda x: torch.clamp(x, lo, hi)), ("x",)


@_op("threshold")
def _threshold(b: _OpView) -> Kernel:
    alpha = b.float("alpha")
    return (lambda x: torch.clamp(x, min=alpha)), ("x",)


@_op("leaky_relu")
def _leaky_relu(b: _OpView) -> Kernel:
    alpha = b.float("alpha", 0.01)
    return (lambda x: F.leaky_relu(x, alpha)), ("x",)


@_op("elu")
def _elu(b: _OpView) -> Kernel:
    alpha = b.float("alpha", 1.0)
    return (lambda x: F.elu(x, alpha)), ("x",)


@_op("linear_activation")
def _linear_activation(b: _OpView) -> Kernel:
    alpha, beta = b.float("alpha"), b.float("beta", 0.0)
    return (lambda x: x * alpha + beta), ("x",)


@_op("sigmoid_hard")
def _sigmoid_hard(b: _OpView) -> Kernel:
    alpha, beta = b.float("alpha", 0.2), b.float("beta", 0.5)
    return (lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)), ("x",)


@_op("scaled_tanh")
def _scaled_tanh(b: _OpView) -> Kernel:
    alpha, beta = b.float("alpha", 1.0), b.float("beta", 1.0)
    return (lambda x: torch.tanh(x * beta) * alpha), ("x",)


@_op("thresholded_relu")
def _thresholded_relu(b: _OpView) -> Kernel:
    alpha = b.float("alpha", 1.0)
    return (lambda x: torch.where(x > alpha, x, torch.zeros_like(x))), ("x",)


@_op("clamped_relu")
def _clamped_relu(b: _OpView) -> Kernel:
    alpha, beta = b.float("alpha"), b.float("beta")
    return (lambda x: torch.clamp(torch.where(x >= 0, x, x * alpha), max=beta)), ("x",)


@_op("prelu")
def _prelu(b: _OpView) -> Kernel:
    # alpha is per channel (axis 1); the const folds into a broadcastable shape once.
    def run(x: Tensor, alpha: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[1] = -1
        return torch.where(x > 0, x, x * alpha.reshape(shape))
    return run, ("x", "alpha")


@_op("gelu")
def _gelu(b: _OpView) -> Kernel:
    mode = b.str("mode", "EXACT")
    if mode == "EXACT":
        return F.gelu, ("x",)
    if mode == "TANH_APPROXIMATION":
        return (lambda x: F.gelu(x, approximate="tanh")), ("x",)
    if mode == "SIGMOID_APPROXIMATION":
        return (lambda x: x * torch.sigmoid(x * 1.702)), ("x",)
    raise ValueError(f"gelu mode {mode!r}")


@_op("select")
def _select(b: _OpView) -> Kernel:
    def run(cond: Tensor, a: Tensor, c: Tensor) -> Tensor:
        return torch.where(cond if cond.dtype == torch.bool else cond != 0, a, c)
    return run, ("cond", "a", "b")


@_op("cast")
def _cast(b: _OpView) -> Kernel:
    out = b.out_dtype()
    if out == torch.bool:
        return (lambda x: x != 0), ("x",)
    return (lambda x: x.to(out)), ("x",)


@_op("identity")
def _identity(b: _OpView) -> Kernel:
    return (lambda x: x), ("x",)


# --- reductions ----------------------------------------------------------------

def _reduction(b: _OpView, fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> Kernel:
    axes = b.ints("axes", None)
    keep = b.bool("keep_dims", False)
    out = b.out_dtype()

    def run(x: Tensor) -> Tensor:
        dims = tuple(range(x.dim())) if axes is None else tuple(_axis(a, x.dim()) for a in axes)
        return fn(_f32(x), dims, keep).to(out)
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
    _OPS[_name] = lambda b, fn=_fn: _reduction(b, fn)


@_op("reduce_argmax", "reduce_argmin")
def _reduce_arg(b: _OpView) -> Kernel:
    axis, keep = b.int("axis", -1), b.bool("keep_dims", False)
    fn = torch.argmax if b.op_type == "reduce_argmax" else torch.argmin
    out = b.out_dtype()
    return (lambda x: fn(x, dim=axis, keepdim=keep).to(out)), ("x",)


@_op("cumsum")
def _cumsum(b: _OpView) -> Kernel:
    axis, exclusive, reverse = b.int("axis", 0), b.bool("exclusive", False), b.bool("reverse", False)
    out = b.out_dtype()

    def run(x: Tensor) -> Tensor:
        y = _f32(x)
        if reverse:
            y = y.flip(axis)
        c = torch.cumsum(y, dim=axis)
        if exclusive:
            c = c - y
        if reverse:
            c = c.flip(axis)
        return c.to(out)
    return run, ("x",)


# --- shapes, layout and creation -------------------------------------------------

def _reshape_target(shape: Sequence[int], x_shape: Sequence[int]) -> list[int]:
    # iOS17+ rule: a 0 copies the dim of x counted from the right (1 when out of range).
    out = list(shape)
    for i, s in enumerate(out):
        if s == 0:
            j = len(x_shape) - (len(out) - i)
            out[i] = x_shape[j] if 0 <= j < len(x_shape) else 1
    return out


@_op("reshape")
def _reshape(b: _OpView) -> Kernel:
    if b.is_const("shape"):
        shape = b.ints("shape")
        if 0 not in shape:
            target = tuple(shape)
            return (lambda x: x.reshape(target)), ("x",)
        return (lambda x: x.reshape(_reshape_target(shape, x.shape))), ("x",)
    return (lambda x, s: x.reshape(_reshape_target(s.tolist(), x.shape))), ("x", "shape")


@_op("flatten2d")
def _flatten2d(b: _OpView) -> Kernel:
    axis = b.int("axis", 1)

    def run(x: Tensor) -> Tensor:
        a = _axis(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
    return run, ("x",)


@_op("transpose")
def _transpose(b: _OpView) -> Kernel:
    perm = tuple(b.ints("perm"))
    return (lambda x: x.permute(perm)), ("x",)


@_op("expand_dims")
def _expand_dims(b: _OpView) -> Kernel:
    axes = b.ints("axes")

    def run(x: Tensor) -> Tensor:
        rank = x.dim() + len(axes)
        for a in sorted(_axis(a, rank) for a in axes):
            x = x.unsqueeze(a)
        return x
    return run, ("x",)


@_op("squeeze")
def _squeeze(b: _OpView) -> Kernel:
    axes = b.ints("axes", None)
    if axes is None:
        return torch.squeeze, ("x",)
    dims = tuple(axes)
    return (lambda x: x.squeeze(dims)), ("x",)


@_op("reverse")
def _reverse(b: _OpView) -> Kernel:
    axes = b.ints("axes", None)
    return (lambda x: x.flip(tuple(range(x.dim())) if axes is None else tuple(axes))), ("x",)


@_op("tile")
def _tile(b: _OpView) -> Kernel:
    if b.is_const("reps"):
        reps = tuple(b.ints("reps"))
        return (lambda x: x.repeat(reps)), ("x",)
    return (lambda x, r: x.repeat(tuple(r.tolist()))), ("x", "reps")


@_op("concat")
def _concat(b: _OpView) -> Kernel:
    axis, interleave = b.int("axis"), b.bool("interleave", False)
    if not interleave:
        return (lambda values: torch.cat(values, dim=axis)), ("values",)

    def run(values: list[Tensor]) -> Tensor:
        # stack on a new axis right after `axis`, then merge: output[k::n] = values[k].
        a = _axis(axis, values[0].dim())
        stacked = torch.stack(values, dim=a + 1)
        shape = list(values[0].shape)
        shape[a] *= len(values)
        return stacked.reshape(shape)
    return run, ("values",)


@_op("stack")
def _stack(b: _OpView) -> Kernel:
    axis = b.int("axis")
    return (lambda values: torch.stack(values, dim=axis)), ("values",)


@_op("split")
def _split(b: _OpView) -> Kernel:
    axis = b.int("axis")
    n_out = len(b.op.outputs)
    sizes = b.ints("split_sizes", None)

    def run(x: Tensor) -> tuple[Tensor, ...]:
        if sizes is not None:
            return tuple(torch.split(x, sizes, dim=axis))
        return tuple(torch.split(x, x.shape[axis] // n_out, dim=axis))
    return run, ("x",)


@_op("fill")
def _fill(b: _OpView) -> Kernel:
    value, out, dev = b.float("value", 0.0), b.out_dtype(), b.device
    if b.is_const("shape"):
        shape = tuple(b.ints("shape"))
        return (lambda: torch.full(shape, value, dtype=out, device=dev)), ()
    return (lambda s: torch.full(tuple(s.tolist()), value, dtype=out, device=dev)), ("shape",)


@_op("fill_like")
def _fill_like(b: _OpView) -> Kernel:
    value, out = b.float("value", 0.0), b.out_dtype()
    return (lambda ref: torch.full(tuple(ref.shape), value, dtype=out, device=ref.device)), ("ref_tensor",)


@_op("shape")
def _shape(b: _OpView) -> Kernel:
    out, dev = b.out_dtype(), b.device
    return (lambda x: torch.tensor(tuple(x.shape), dtype=out, device=dev)), ("x",)


@_op("range_1d")
def _range_1d(b: _OpView) -> Kernel:
    out, dev = b.out_dtype(), b.device

    def run(start: Tensor, end: Tensor, step: Tensor) -> Tensor:
        return torch.arange(start.item(), end.item(), step.item(), dtype=out, device=dev)
    return run, ("start", "end", "step")


@_op("band_part")
def _band_part(b: _OpView) -> Kernel:
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


@_op("one_hot")
def _one_hot(b: _OpView) -> Kernel:
    axis = b.int("axis", -1)
    on, off, out = b.float("on_value", 1.0), b.float("off_value", 0.0), b.out_dtype()

    def run(indices: Tensor, depth: Tensor) -> Tensor:
        hot = F.one_hot(indices.long(), int(depth.item()))
        hot = hot.movedim(-1, _axis(axis, indices.dim() + 1))
        return torch.where(hot.bool(), torch.tensor(on, dtype=out, device=hot.device),
                           torch.tensor(off, dtype=out, device=hot.device))
    return run, ("indices", "one_hot_vector_size")


@_op("pad")
def _pad(b: _OpView) -> Kernel:
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


@_op("topk")
def _topk(b: _OpView) -> Kernel:
    axis, ascending = b.int("axis", -1), b.bool("ascending", False)
    sort = b.bool("sort", True)
    n_out = len(b.op.outputs)
    idx_dtype = b.out_dtype(1) if n_out > 1 else torch.int32

    def run(x: Tensor, k: Tensor) -> Any:
        values, indices = torch.topk(x, int(k.item()), dim=axis, largest=not ascending, sorted=sort)
        return (values, indices.to(idx_dtype)) if n_out > 1 else values
    return run, ("x", "k")


@_op("argsort")
def _argsort(b: _OpView) -> Kernel:
    axis, ascending, out = b.int("axis", -1), b.bool("ascending", False), b.out_dtype()
    return (lambda x: torch.argsort(x, dim=axis, descending=not ascending, stable=True).to(out)), ("x",)


# --- slicing ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _SliceRule:
    """The constant parts of a slice_by_index / slice_update."""

    stride: tuple[int, ...] | None
    begin_mask: tuple[bool, ...] | None
    end_mask: tuple[bool, ...] | None
    squeeze_mask: tuple[bool, ...] | None

    @classmethod
    def of(cls, b: _OpView) -> "_SliceRule":
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
                raise _Dynamic()
            n = shape[d]
            picked = range(*slice(start, stop, step).indices(n))
            flips.append(d)
            idx.append(slice(0, 0) if len(picked) == 0 else slice(n - 1 - picked[0], n - picked[-1], -step))
        return tuple(idx), tuple(flips)


def _slicer(b: _OpView) -> tuple[Callable[..., tuple[tuple, tuple[int, ...]]], tuple[str, ...]]:
    """A function (x, *dynamic begin/end) -> (index, flips) and the inputs it needs."""
    rule = _SliceRule.of(b)
    if b.is_const("begin") and b.is_const("end"):
        begin, end = b.ints("begin"), b.ints("end")
        try:
            fixed = rule.index(begin, end, None)
            return (lambda x: fixed), ()
        except _Dynamic:
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


@_op("slice_by_index")
def _slice_by_index(b: _OpView) -> Kernel:
    index, extra = _slicer(b)
    if not extra:
        return (lambda x: _take(x, *index(x))), ("x",)
    return (lambda x, *dyn: _take(x, *index(x, *dyn))), ("x", *extra)


@_op("slice_by_size")
def _slice_by_size(b: _OpView) -> Kernel:
    def bounds(x: Tensor, begin: Sequence[int], size: Sequence[int]) -> tuple:
        return tuple(slice(bg, x.shape[d] if sz == -1 else bg + sz) for d, (bg, sz) in enumerate(zip(begin, size)))

    if b.is_const("begin") and b.is_const("size"):
        begin, size = b.ints("begin"), b.ints("size")
        return (lambda x: x[bounds(x, begin, size)]), ("x",)
    return (lambda x, bg, sz: x[bounds(x, bg.tolist(), sz.tolist())]), ("x", "begin", "size")


@_op("slice_update")
def _slice_update(b: _OpView) -> Kernel:
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


# --- gathers --------------------------------------------------------------------------

def _index_long(indices: Tensor, size: int) -> Tensor:
    i = indices.long()
    return torch.where(i < 0, i + size, i)  # MIL allows negative indices


@_op("gather")
def _gather(b: _OpView) -> Kernel:
    axis, batch_dims = b.int("axis", 0), b.int("batch_dims", 0)

    def run(x: Tensor, indices: Tensor) -> Tensor:
        a = _axis(axis, x.dim())
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


@_op("gather_along_axis")
def _gather_along_axis(b: _OpView) -> Kernel:
    axis = b.int("axis", 0)

    def run(x: Tensor, indices: Tensor) -> Tensor:
        a = _axis(axis, x.dim())
        return torch.gather(x, a, _index_long(indices, x.shape[a]))
    return run, ("x", "indices")


@_op("gather_nd")
def _gather_nd(b: _OpView) -> Kernel:
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


# --- linear algebra --------------------------------------------------------------------

@_op("matmul")
def _matmul(b: _OpView) -> Kernel:
    tx, ty = b.bool("transpose_x", False), b.bool("transpose_y", False)

    def run(x: Tensor, y: Tensor) -> Tensor:
        if tx and x.dim() > 1:
            x = x.transpose(-1, -2)
        if ty and y.dim() > 1:
            y = y.transpose(-1, -2)
        return torch.matmul(x, y)
    return run, ("x", "y")


@_op("linear")
def _linear(b: _OpView) -> Kernel:
    if b.has("bias"):
        return F.linear, ("x", "weight", "bias")
    return F.linear, ("x", "weight")


def _conv_padding(b: _OpView, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
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


@_op("conv")
def _conv(b: _OpView) -> Kernel:
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


# --- normalization and attention --------------------------------------------------------

@_op("softmax")
def _softmax(b: _OpView) -> Kernel:
    axis, out = b.int("axis", -1), b.out_dtype()
    return (lambda x: torch.softmax(_f32(x), dim=axis).to(out)), ("x",)


@_op("layer_norm")
def _layer_norm(b: _OpView) -> Kernel:
    axes = b.ints("axes", None)
    eps, out = b.float("epsilon", 1e-5), b.out_dtype()
    args = ("x",) + tuple(k for k in ("gamma", "beta") if b.has(k))
    has_gamma, has_beta = b.has("gamma"), b.has("beta")
    rank = len(b.var("x").shape)
    dims = list(range(rank)) if axes is None else [_axis(a, rank) for a in axes]
    trailing = sorted(dims) == list(range(rank - len(dims), rank))
    order = sorted(range(len(dims)), key=lambda i: dims[i])

    def affine(p: Tensor, x: Tensor) -> Tensor:
        # gamma has shape x.shape[axes] in the order `axes` lists them.
        p = _f32(p).permute(order) if len(order) > 1 else _f32(p)
        shape = [1] * x.dim()
        for d, size in zip(sorted(dims), p.shape):
            shape[d] = size
        return p.reshape(shape)

    def run(x: Tensor, *params: Tensor) -> Tensor:
        gamma = params[0] if has_gamma else None
        beta = params[-1] if has_beta else None
        xf = _f32(x)
        if trailing and order == sorted(order):
            shape = x.shape[rank - len(dims):]
            y = F.layer_norm(xf, shape, None if gamma is None else _f32(gamma).reshape(shape),
                             None if beta is None else _f32(beta).reshape(shape), eps)
            return y.to(out)
        mean = xf.mean(dim=dims, keepdim=True)
        var = xf.var(dim=dims, keepdim=True, unbiased=False)
        y = (xf - mean) * torch.rsqrt(var + eps)
        if gamma is not None:
            y = y * affine(gamma, x)
        if beta is not None:
            y = y + affine(beta, x)
        return y.to(out)
    return run, args


@_op("batch_norm")
def _batch_norm(b: _OpView) -> Kernel:
    eps, out = b.float("epsilon", 1e-5), b.out_dtype()
    has_gamma, has_beta = b.has("gamma"), b.has("beta")
    args = ("x", "mean", "variance") + tuple(k for k in ("gamma", "beta") if b.has(k))

    def run(x: Tensor, mean: Tensor, var: Tensor, *params: Tensor) -> Tensor:
        gamma = params[0] if has_gamma else None
        beta = params[-1] if has_beta else None
        return F.batch_norm(_f32(x), _f32(mean.reshape(-1)), _f32(var.reshape(-1)),
                            None if gamma is None else _f32(gamma.reshape(-1)),
                            None if beta is None else _f32(beta.reshape(-1)), False, 0.0, eps).to(out)
    return run, args


@_op("instance_norm")
def _instance_norm(b: _OpView) -> Kernel:
    eps, out = b.float("epsilon", 1e-5), b.out_dtype()
    has_gamma, has_beta = b.has("gamma"), b.has("beta")
    args = ("x",) + tuple(k for k in ("gamma", "beta") if b.has(k))

    def run(x: Tensor, *params: Tensor) -> Tensor:
        gamma = params[0] if has_gamma else None
        beta = params[-1] if has_beta else None
        return F.instance_norm(_f32(x), weight=None if gamma is None else _f32(gamma),
                               bias=None if beta is None else _f32(beta), eps=eps).to(out)
    return run, args


@_op("l2_norm")
def _l2_norm(b: _OpView) -> Kernel:
    eps, out = b.float("epsilon", 1e-6), b.out_dtype()

    def run(x: Tensor) -> Tensor:
        xf = _f32(x)
        dims = tuple(range(max(0, x.dim() - 3), x.dim()))
        return (xf / torch.sqrt(torch.sum(xf * xf, dim=dims, keepdim=True) + eps)).to(out)
    return run, ("x",)


@_op("scaled_dot_product_attention")
def _sdpa(b: _OpView) -> Kernel:
    out = b.out_dtype()

    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        qf, kf, vf = _f32(q), _f32(k), _f32(v)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + _f32(mask)
        return torch.matmul(torch.softmax(scores, dim=-1), vf).to(out)
    return run, ("query", "key", "value", "attn_mask") if b.has("attn_mask") else ("query", "key", "value")


# --- states ---------------------------------------------------------------------------

@_op("read_state")
def _read_state(b: _OpView) -> Kernel:
    name = b.var("input").name
    if b.mode == "alias":
        return (lambda states: states[name]), ("input",)
    return (lambda states: states[name].clone()), ("input",)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@_op("coreml_update_state")
def _update_state(b: _OpView) -> Kernel:
    name = b.var("state").name
    alias = b.mode == "alias"

    def run(states: Mapping[str, Tensor], value: Tensor) -> Tensor:
        st = states[name]
        if value is not st:  # an in-place slice_update already wrote it
            st.copy_(value.clone() if _shares_memory(value, st) else value)
        return st if alias else st.clone()
    return run, ("state", "value")


# --- compressed constants (run once, at load) ------------------------------------------

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
        ax = _axis(int(vector_axis), rank)
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


@_op("constexpr_lut_to_dense")
def _constexpr_lut(b: _OpView) -> Kernel:
    if b.has("shape"):  # the iOS16 op: packed indices, flat LUT
        return _materialized(b)
    axis = b.int("vector_axis", None)
    return (lambda indices, lut: lut_to_dense(indices, lut, axis)), ("indices", "lut")


@_op("constexpr_blockwise_shift_scale")
def _constexpr_shift_scale(b: _OpView) -> Kernel:
    if b.has("offset"):
        return blockwise_shift_scale, ("data", "scale", "offset")
    return blockwise_shift_scale, ("data", "scale")


@_op("constexpr_sparse_to_dense")
def _constexpr_sparse(b: _OpView) -> Kernel:
    if b.has("shape"):  # the iOS16 op: packed bit mask
        return _materialized(b)

    def run(nonzero: Tensor, mask: Tensor) -> Tensor:
        out = torch.zeros(tuple(mask.shape), dtype=nonzero.dtype, device=nonzero.device)
        out[mask != 0] = nonzero
        return out
    return run, ("nonzero_data", "mask")


def _materialized(b: _OpView) -> Kernel:
    """coremltools' own numpy decompression, for the rarer constexpr variants."""
    op, device = b.op, b.device

    def run() -> Any:
        value = op.materialized_val_inference()
        values = value if isinstance(value, tuple) else (value,)
        tensors = tuple(_tensor_of(np.asarray(v), _torch_dtype(o.dtype), device)
                        for v, o in zip(values, op.outputs))
        return tensors if len(tensors) > 1 else tensors[0]
    return run, ()


for _name in ("constexpr_affine_dequantize", "constexpr_cast", "constexpr_lut_to_sparse",
              "constexpr_sparse_blockwise_shift_scale"):
    _OPS[_name] = _materialized


def _tensor_of(value: Any, dtype: torch.dtype | None, device: torch.device | None) -> Tensor:
    arr = np.asarray(value)
    if arr.dtype == np.uint16 or arr.dtype == np.uint32:
        arr = arr.astype(np.int64)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C", copy=True)  # torch refuses read-only numpy memory
    t = torch.from_numpy(arr)
    return t if dtype is None and device is None else t.to(device=device, dtype=dtype)


# --- one function, compiled ------------------------------------------------------------

@dataclass
class _InputSpec:
    name: str
    slot: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    enumerated: tuple[tuple[int, ...], ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()

    def allowed(self) -> str:
        if self.enumerated:
            return " or ".join(str(s) for s in self.enumerated)
        if self.ranges:
            return "(" + ", ".join(f"{lo}..{'inf' if hi < 0 else hi}" for lo, hi in self.ranges) + ")"
        return str(self.shape)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if self.enumerated:
            return shape in self.enumerated
        if self.ranges:
            return len(shape) == len(self.ranges) and all(
                lo <= s and (hi < 0 or s <= hi) for s, (lo, hi) in zip(shape, self.ranges))
        return shape == self.shape


@dataclass
class _Program:
    name: str
    inputs: list[_InputSpec]
    states: list[StateSpec]
    outputs: list[tuple[str, int]]
    template: list[Any]
    steps: list[tuple[Callable[[list], Any], Any, tuple[int, ...]]]
    shared_outputs: frozenset[int]
    op_types: frozenset[str]


@dataclass
class _Node:
    """A runtime op after folding: its slots and, for state ops, the state."""

    op: Any
    ins: dict[str, Any]      # input name -> slot or tuple of slots
    outs: tuple[int, ...]
    state: str | None = None

    def in_slots(self) -> Iterable[int]:
        for s in self.ins.values():
            yield from (s if isinstance(s, tuple) else (s,))


class _ConstKeys:
    """Identity of constant values across the functions of one package, so
    ``infer`` and ``prefill`` share one tensor for weights stored once."""

    def __init__(self, spec: Any):
        self.blob: dict[tuple[str, str], tuple] = {}
        for fname, fspec in spec.mlProgram.functions.items():
            block = fspec.block_specializations[fspec.opset]
            for op in block.operations:
                if op.type != "const" or "val" not in op.attributes:
                    continue
                val = op.attributes["val"]
                if val.WhichOneof("value") == "blobFileValue":
                    key = ("blob", val.blobFileValue.fileName, val.blobFileValue.offset)
                    self.blob[(fname, op.outputs[0].name)] = key


class _FunctionCompiler:
    """Turns one MIL function into a :class:`_Program`."""

    def __init__(self, fname: str, func: Any, io: Any, device: torch.device, keys: _ConstKeys,
                 shared: dict[tuple, Tensor]):
        self.fname, self.func, self.io, self.device = fname, func, io, device
        self.keys, self.shared = keys, shared
        self.slot: dict[str, int] = {}
        self.values: dict[str, Any] = {}     # load-time known values (numpy / python)
        self.tensors: dict[str, Tensor] = {}  # the same, as tensors on device
        self.key: dict[str, tuple | None] = {}
        self.state_names: set[str] = set()

    # constants ---------------------------------------------------------
    def _slot_of(self, var: Any) -> int:
        if var.name in self.state_names:
            return _STATE_SLOT
        if var.name not in self.slot:
            self.slot[var.name] = len(self.slot) + 1
        return self.slot[var.name]

    def const_value(self, var: Any) -> Any:
        if var.name in self.values:
            return self.values[var.name]
        if var.name in self.tensors:
            t = self.tensors[var.name]
            self.values[var.name] = t.cpu().numpy()
            return self.values[var.name]
        raise _Dynamic(var.name)

    def is_const(self, var: Any) -> bool:
        return var.name in self.values or var.name in self.tensors

    def const_tensor(self, var: Any) -> Tensor:
        name = var.name
        if name not in self.tensors:
            value = self.values[name]
            if isinstance(value, str):
                raise TypeError(f"string constant {name!r} used as a tensor")
            key = self.key.get(name)
            dtype = _torch_dtype(var.dtype)
            t = self.shared.get((key, dtype)) if key is not None else None
            if t is None:
                t = _tensor_of(value, dtype, self.device)
                if key is not None:
                    self.shared[(key, dtype)] = t
            self.tensors[name] = t
        return self.tensors[name]

    def _record_const(self, var: Any, op: Any, index: int) -> None:
        name = var.name
        self.values[name] = var.val
        self.key[name] = self._key_for(op, index, var.val)

    def _key_for(self, op: Any, index: int, value: Any) -> tuple | None:
        if op.op_type == "const":
            blob = self.keys.blob.get((self.fname, op.outputs[0].name))
            if blob is not None:
                return blob
        if value is not None and not isinstance(value, str):
            arr = np.asarray(value)
            if arr.nbytes <= 4096 and arr.dtype != object:
                return ("imm", str(arr.dtype), arr.shape, arr.tobytes())
        if op.op_type == "const":
            return None
        parts = []
        for k, v in sorted(op.inputs.items()):
            vs = v if isinstance(v, (list, tuple)) else (v,)
            ks = tuple(self.key.get(x.name) for x in vs)
            if any(kk is None for kk in ks):
                return None
            parts.append((k, ks))
        return (op.op_type, tuple(parts), index)

    # compile -------------------------------------------------------------
    def compile(self) -> _Program:
        from coremltools.converters.mil.mil import types

        func = self.func
        self.state_names = {name for name, var in func.inputs.items() if types.is_state(var.sym_type)}
        inputs = self._inputs()
        states = [StateSpec(name, tuple(int(d) for d in func.inputs[name].shape),
                            _torch_dtype(func.inputs[name].dtype)) for name in sorted(self.state_names)]

        nodes = self._fold(list(func.operations))
        outputs = [(v.name, self._slot_of(v)) for v in func.outputs]
        out_slots = {s for _, s in outputs}
        nodes = self._live(nodes, out_slots)
        fixed = self._fixed_slots(inputs)
        modes, clone_updates, buffers = _plan_aliases(nodes, out_slots, fixed)

        template: list[Any] = [None] * (len(self.slot) + 1)
        steps = []
        last = self._last_use(nodes, out_slots)
        for i, node in enumerate(nodes):
            view = _OpView(node.op, self.const_value, self.device, modes.get(i, "copy"), i in clone_updates)
            fn, args = _OPS[node.op.op_type](view)
            slots = tuple(self._arg_slots(node.op, a, template) for a in args)
            # Dropping the last reference as soon as a value is dead keeps peak
            # memory near one layer's worth instead of the whole program's.
            frees = tuple(s for s in set(node.in_slots()) | set(node.outs)
                          if last.get(s) == i and s not in out_slots and s not in fixed and s != _STATE_SLOT)
            out = node.outs[0] if len(node.outs) == 1 else node.outs
            steps.append((_bind(fn, slots), out, frees))
        template.extend([None] * (len(self.slot) + 1 - len(template)))
        for v in func.outputs:
            slot = self.slot[v.name]
            if template[slot] is None and self.is_const(v):
                template[slot] = self.const_tensor(v)
        # Outputs that may share memory with a state, an input or a constant are
        # copied before they leave, so callers can keep them across calls.
        shared_outputs = frozenset(
            slot for _, slot in outputs
            if slot in fixed or any(b[0] in ("state", "in", "const") for b in buffers.get(slot, ())))
        return _Program(self.fname, inputs, states, outputs, template, steps, shared_outputs,
                        frozenset(n.op.op_type for n in nodes))

    def _fixed_slots(self, inputs: list[_InputSpec]) -> dict[int, str]:
        fixed = {i.slot: "in" for i in inputs}
        for name in set(self.values) | set(self.tensors):
            if name in self.slot:
                fixed[self.slot[name]] = "const"
        return fixed

    def _arg_slots(self, op: Any, arg: str, template: list[Any]) -> Any:
        var = op.inputs[arg]
        if isinstance(var, (list, tuple)):
            return tuple(self._arg_slot(v, template) for v in var)
        return self._arg_slot(var, template)

    def _arg_slot(self, var: Any, template: list[Any]) -> int:
        slot = self._slot_of(var)
        if slot != _STATE_SLOT and self.is_const(var):
            while len(template) <= slot:
                template.append(None)
            template[slot] = self.const_tensor(var)
        return slot

    def _inputs(self) -> list[_InputSpec]:
        specs = []
        by_name = {f.name: f for f in self.io.input}
        for name, var in self.func.inputs.items():
            if name in self.state_names:
                continue
            feature = by_name.get(name)
            if feature is None or feature.type.WhichOneof("Type") != "multiArrayType":
                raise AnemllError(f"input {name!r} of function {self.fname!r} is not a multi-array",
                                  "the portable executor runs tensor inputs only; use Core ML on macOS",
                                  stage="runtime", code="unsupported_op")
            arr = feature.type.multiArrayType
            enumerated = tuple(tuple(int(d) for d in s.shape) for s in arr.enumeratedShapes.shapes)
            ranges = tuple((int(r.lowerBound), int(r.upperBound)) for r in arr.shapeRange.sizeRanges)
            specs.append(_InputSpec(name, self._slot_of(var), _torch_dtype(var.dtype),
                                    tuple(int(d) for d in arr.shape), enumerated, ranges))
        return specs

    def _fold(self, ops: list[Any]) -> list[_Node]:
        """Record constants, run all-constant ops now (this is where
        ``constexpr_*`` weights are dequantized), return the runtime ops."""
        nodes = []
        for op in ops:
            # Results coremltools already knew while loading never run, so
            # their op types need no implementation here.
            if all(o.val is not None for o in op.outputs) and op.op_type not in _STATE_OPS:
                for i, o in enumerate(op.outputs):
                    self._record_const(o, op, i)
                continue
            builder = _OPS.get(op.op_type)
            if builder is None:
                raise AnemllError(
                    f"op type {op.op_type!r} (op {op.name!r}, function {self.fname!r}) is not "
                    "implemented by the portable executor",
                    "run this package with Core ML on macOS, or add the op to anemlld/runtime/portable.py",
                    stage="runtime", code="unsupported_op")
            in_vars = [v for val in op.inputs.values()
                       for v in (val if isinstance(val, (list, tuple)) else (val,))]
            if op.op_type not in _STATE_OPS and all(self.is_const(v) for v in in_vars):
                self._fold_op(op, builder)
                continue
            ins = {k: (tuple(self._slot_of(x) for x in v) if isinstance(v, (list, tuple)) else self._slot_of(v))
                   for k, v in op.inputs.items()}
            state = None
            if op.op_type == "read_state":
                state = op.inputs["input"].name
            elif op.op_type == "coreml_update_state":
                state = op.inputs["state"].name
            nodes.append(_Node(op, ins, tuple(self._slot_of(o) for o in op.outputs), state))
        return nodes

    def _fold_op(self, op: Any, builder: Callable[[_OpView], Kernel]) -> None:
        fn, args = builder(_OpView(op, self.const_value, self.device))
        values = []
        for a in args:
            v = op.inputs[a]
            values.append([self.const_tensor(x) for x in v] if isinstance(v, (list, tuple))
                          else self.const_tensor(v))
        result = fn(*values)
        results = result if isinstance(result, tuple) else (result,)
        for i, (o, t) in enumerate(zip(op.outputs, results)):
            t = t.to(_torch_dtype(o.dtype)).contiguous()
            key = self._key_for(op, i, None)
            if key is not None:
                t = self.shared.setdefault((key, t.dtype), t)
            self.tensors[o.name] = t
            self.key[o.name] = key

    def _live(self, nodes: list[_Node], out_slots: set[int]) -> list[_Node]:
        """Drop ops whose results nobody uses (state updates always count)."""
        needed = set(out_slots)
        kept = []
        for node in reversed(nodes):
            if node.op.op_type == "coreml_update_state" or any(s in needed for s in node.outs):
                kept.append(node)
                needed.update(node.in_slots())
        return kept[::-1]

    @staticmethod
    def _last_use(nodes: list[_Node], out_slots: set[int]) -> dict[int, int]:
        last: dict[int, int] = {}
        for i, node in enumerate(nodes):
            for s in node.outs:
                last.setdefault(s, i)
            for s in node.in_slots():
                last[s] = i
        for s in out_slots:
            last[s] = len(nodes)
        return last


def _bind(fn: Callable[..., Any], slots: tuple[Any, ...]) -> Callable[[list], Any]:
    """A closure reading its arguments out of the environment list."""
    if any(isinstance(s, tuple) for s in slots):
        def run_lists(env: list) -> Any:
            return fn(*[[env[i] for i in s] if isinstance(s, tuple) else env[s] for s in slots])
        return run_lists
    if len(slots) == 0:
        return lambda env: fn()
    if len(slots) == 1:
        (a,) = slots
        return lambda env: fn(env[a])
    if len(slots) == 2:
        a, b = slots
        return lambda env: fn(env[a], env[b])
    if len(slots) == 3:
        a, b, c = slots
        return lambda env: fn(env[a], env[b], env[c])
    return lambda env: fn(*[env[s] for s in slots])


# --- the alias plan ---------------------------------------------------------------------

def _plan_aliases(nodes: list[_Node], out_slots: set[int], fixed: dict[int, str]
                  ) -> tuple[dict[int, str], set[int], dict[int, frozenset]]:
    """Decide which state reads hand out the state tensor itself ("alias") and
    which slice_updates write into their input ("inplace").

    Start optimistic, then demote any choice under which some value would be
    read after memory it lives in was overwritten, until no conflict is left.
    A typical KV-cache write (read_state -> slice_update -> coreml_update_state
    -> slice_by_index for attention) ends up copying nothing.
    """
    n = len(nodes)
    defined: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for s in node.outs:
            defined[s] = i
            last.setdefault(s, i)
        for s in node.in_slots():
            last[s] = i
    for s in out_slots:
        last[s] = n
    touches: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.state is not None:
            touches.setdefault(node.state, []).append(i)

    modes: dict[int, str] = {}
    for i, node in enumerate(nodes):
        t = node.op.op_type
        if t in _STATE_OPS:
            modes[i] = "alias"
        elif t == "slice_update":
            x = node.ins["x"]
            ok = x not in fixed and last.get(x) == i
            modes[i] = "inplace" if ok else "copy"

    while True:
        buffers, tied = _buffers(nodes, modes, fixed)
        by_buffer: dict[Any, list[int]] = {}
        for s, bs in buffers.items():
            for buf in bs:
                by_buffer.setdefault(buf, []).append(s)

        def stale(write_at: int, bufs: Iterable[Any], skip: int | None = None) -> list[int]:
            hits = []
            for buf in bufs:
                for v in by_buffer.get(buf, ()):
                    if v != skip and defined.get(v, -1) < write_at < last.get(v, -1):
                        hits.append(v)
            return hits

        demote: set[int] = set()
        clone_updates: set[int] = set()
        for i, node in enumerate(nodes):
            t = node.op.op_type
            if t == "coreml_update_state":
                value = node.ins["value"]
                if tied.get(value) == node.state:
                    continue  # already written in place; nothing is copied here
                for v in stale(i, [("state", node.state)]):
                    roots = _roots(v, node.state, nodes, modes, defined)
                    # Every state alias comes from a root; copying everywhere is the safe fallback.
                    demote.update(roots or {j for j, m in modes.items() if m != "copy"})
            elif t == "slice_update" and modes[i] == "inplace":
                x, y = node.ins["x"], node.outs[0]
                bufs = buffers[x]
                if any(b[0] in ("in", "const") for b in bufs) or last.get(x) != i or stale(i, bufs, skip=x):
                    demote.add(i)
                    continue
                states = {b[1] for b in bufs if b[0] == "state"}
                if states:
                    s = tied.get(x)
                    if len(states) > 1 or s is None or s not in states or not _stored_next(
                            i, s, y, nodes, touches[s], tied):
                        demote.add(i)
                        continue
                if buffers.get(node.ins["update"], frozenset()) & bufs:
                    clone_updates.add(i)
        if not demote:
            return modes, clone_updates, buffers
        for i in demote:
            modes[i] = "copy"


def _buffers(nodes: list[_Node], modes: dict[int, str], fixed: dict[int, str]
             ) -> tuple[dict[int, frozenset], dict[int, str]]:
    """Which memory each slot may live in, and which slots are the state tensor itself."""
    buffers: dict[int, frozenset] = {s: frozenset({(kind, s)}) for s, kind in fixed.items()}
    tied: dict[int, str] = {}
    for i, node in enumerate(nodes):
        t = node.op.op_type
        if t in _STATE_OPS:
            if modes[i] == "alias":
                for s in node.outs:
                    buffers[s] = frozenset({("state", node.state)})
                    tied[s] = node.state
                continue
        elif t == "slice_update" and modes[i] == "inplace":
            x = node.ins["x"]
            buffers[node.outs[0]] = buffers.get(x, frozenset())
            if x in tied:
                tied[node.outs[0]] = tied[x]
            continue
        elif t in _VIEW_OPS:
            src = buffers.get(node.ins["x"], frozenset())
            for s in node.outs:
                buffers[s] = src | {("fresh", s)}
            continue
        for s in node.outs:
            buffers[s] = frozenset({("fresh", s)})
    return buffers, tied


def _roots(v: int, state: str, nodes: list[_Node], modes: dict[int, str], defined: dict[int, int]
           ) -> set[int]:
    """The aliasing choices that make slot ``v`` share the state's memory."""
    found: set[int] = set()
    todo = [v]
    seen = set()
    while todo:
        s = todo.pop()
        if s in seen or s not in defined:
            continue
        seen.add(s)
        i = defined[s]
        node = nodes[i]
        t = node.op.op_type
        if t in _STATE_OPS and modes.get(i) == "alias":
            found.add(i)
        elif t == "slice_update" and modes.get(i) == "inplace":
            found.add(i)
            todo.append(node.ins["x"])
        elif t in _VIEW_OPS:
            todo.append(node.ins["x"])
    return found


def _stored_next(i: int, state: str, value_slot: int, nodes: list[_Node], touches: list[int],
                 tied: dict[int, str]) -> bool:
    """Whether the next op touching ``state`` after ``i`` stores ``value_slot``
    (or a later in-place write of it: a value still tied to the state)."""
    for j in touches:
        if j > i:
            node = nodes[j]
            stored = node.ins.get("value")
            return node.op.op_type == "coreml_update_state" and (stored == value_slot or tied.get(stored) == state)
    return False


# --- the public model -----------------------------------------------------------------

class PortableModel:
    """A Core ML package, executed with torch. For example::

        chunk = PortableModel("llama_FFN_PF_lut4_chunk_01of02.mlpackage")
        state = chunk.make_state()  # shareable with the other chunks
        out = chunk.predict({"hidden_states": h, ...}, state, function="prefill")
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None):
        started = time.perf_counter()
        self.path = Path(path)
        self.device = torch.device(device) if device is not None else default_device()
        ct = _ct()
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

        if not self.path.exists():
            raise AnemllError(f"{self.path} does not exist", "check the model folder",
                              stage="runtime", code="bad_input")
        if self.path.suffix == ".mlmodelc":
            raise AnemllError(f"{self.path.name} is compiled; the portable executor reads .mlpackage files",
                              "keep the .mlpackage parts next to the .mlmodelc ones to run them off macOS",
                              stage="runtime", code="unsupported_op")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = ct.utils.load_spec(str(self.path))
            if spec.WhichOneof("Type") != "mlProgram":
                raise AnemllError(f"{self.path.name} is not an ML program",
                                  "the portable executor runs mlprogram packages only",
                                  stage="runtime", code="unsupported_op")
            weights = ct.models.MLModel(str(self.path), skip_model_load=True).weights_dir
            prog = milproto_load(spec, specification_version=spec.specificationVersion,
                                 file_weights_dir=weights)
        desc = spec.description
        io = {f.name: f for f in desc.functions}
        # The program's functions come from a protobuf map (no stable order); the
        # description lists them in the order they were added.
        names = [f.name for f in desc.functions if f.name in prog.functions] or list(prog.functions)
        self._default = desc.defaultFunctionName or ("main" if "main" in names else names[0])
        keys = _ConstKeys(spec)
        shared: dict[tuple, Tensor] = {}
        self._programs: dict[str, _Program] = {}
        with torch.no_grad():
            for name in names:
                compiler = _FunctionCompiler(name, prog.functions[name], io.get(name, desc),
                                             self.device, keys, shared)
                self._programs[name] = compiler.compile()
        self._states = self._collect_states()
        consts = {t.data_ptr(): t for p in self._programs.values() for t in p.template if isinstance(t, Tensor)}
        log.info("loaded %s on %s: functions %s, %d steps, %.1f MB of constants, %.2f s",
                 self.path.name, self.device, names, sum(len(p.steps) for p in self._programs.values()),
                 sum(t.numel() * t.element_size() for t in consts.values()) / 2**20,
                 time.perf_counter() - started)

    # description ---------------------------------------------------------
    @property
    def functions(self) -> list[str]:
        return list(self._programs)

    @property
    def default_function(self) -> str:
        return self._default

    def input_names(self, function: str | None = None) -> list[str]:
        return [i.name for i in self._program(function).inputs]

    def output_names(self, function: str | None = None) -> list[str]:
        return [name for name, _ in self._program(function).outputs]

    def state_specs(self, function: str | None = None) -> list[StateSpec]:
        return list(self._program(function).states)

    def op_types(self, function: str | None = None) -> list[str]:
        """The op types that run per call (after folding constants)."""
        return sorted(self._program(function).op_types)

    def make_state(self) -> dict[str, Tensor]:
        """Zeroed state tensors for every state any function declares."""
        return {s.name: torch.zeros(s.shape, dtype=s.dtype, device=self.device) for s in self._states.values()}

    # running -------------------------------------------------------------
    def predict(self, inputs: Mapping[str, np.ndarray | Tensor], state: Mapping[str, Tensor] | None = None,
                function: str | None = None) -> dict[str, np.ndarray]:
        """Run ``function`` (default: the package's default) on ``inputs``;
        ``state`` tensors are updated in place."""
        prog = self._program(function)
        env = self._execute(prog, inputs, state)
        return {name: env[slot].to("cpu", copy=True).numpy() for name, slot in prog.outputs}

    def predict_tensors(self, inputs: Mapping[str, np.ndarray | Tensor],
                        state: Mapping[str, Tensor] | None = None,
                        function: str | None = None) -> dict[str, Tensor]:
        """Like :meth:`predict`, returning torch tensors on the model's device
        (no trip through host memory: for chaining parts on a GPU). They are
        inference tensors: ``clone()`` one before modifying it in place."""
        prog = self._program(function)
        env = self._execute(prog, inputs, state)
        return {name: env[slot].clone() if slot in prog.shared_outputs else env[slot]
                for name, slot in prog.outputs}

    def _execute(self, prog: _Program, inputs: Mapping[str, Any], state: Mapping[str, Tensor] | None
                 ) -> list[Any]:
        feeds = self._feeds(prog, inputs)
        env = list(prog.template)
        env[_STATE_SLOT] = self._check_state(prog, state)
        for spec, tensor in zip(prog.inputs, feeds):
            env[spec.slot] = tensor
        with torch.inference_mode():
            for run, out, frees in prog.steps:
                if out.__class__ is int:
                    env[out] = run(env)
                else:
                    for slot, value in zip(out, run(env)):
                        env[slot] = value
                for slot in frees:
                    env[slot] = None
        return env

    # helpers ---------------------------------------------------------------
    def _program(self, function: str | None) -> _Program:
        name = function or self._default
        prog = self._programs.get(name)
        if prog is None:
            raise AnemllError(f"{self.path.name} has no function {name!r} (it has {', '.join(self._programs)})",
                              "call predict with one of those function names", stage="predict", code="bad_input")
        return prog

    def _feeds(self, prog: _Program, inputs: Mapping[str, Any]) -> list[Tensor]:
        expected = [i.name for i in prog.inputs]
        missing = [n for n in expected if n not in inputs]
        extra = [n for n in inputs if n not in expected]
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unexpected {', '.join(extra)}"] if extra else [])
            raise AnemllError(f"inputs for {self.path.name}:{prog.name} do not match: {'; '.join(parts)}",
                              f"pass exactly: {', '.join(expected)}", stage="predict", code="bad_input")
        feeds = []
        for spec in prog.inputs:
            value = inputs[spec.name]
            t = value if isinstance(value, Tensor) else _tensor_of(value, None, None)
            shape = tuple(t.shape)
            if not spec.accepts(shape):
                raise AnemllError(f"input {spec.name!r} of {self.path.name}:{prog.name} has shape {shape}",
                                  f"this model accepts {spec.allowed()}", stage="predict", code="bad_input")
            feeds.append(t.to(device=self.device, dtype=spec.dtype))
        return feeds

    def _check_state(self, prog: _Program, state: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
        if not prog.states:
            return state or {}
        if state is None:
            raise AnemllError(f"{self.path.name}:{prog.name} is stateful and no state was given",
                              "pass state=model.make_state() (and keep passing the same dict)",
                              stage="predict", code="bad_input")
        for spec in prog.states:
            t = state.get(spec.name)
            if not isinstance(t, Tensor):
                raise AnemllError(f"state {spec.name!r} is missing or not a torch tensor",
                                  "create states with make_state()", stage="predict", code="bad_input")
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype or t.device != self.device:
                raise AnemllError(
                    f"state {spec.name!r} is {tuple(t.shape)} {t.dtype} on {t.device}; "
                    f"{self.path.name} needs {spec.shape} {spec.dtype} on {self.device}",
                    "models sharing a state must declare the same state shape and run on one device",
                    stage="predict", code="bad_input")
        return state

    def _collect_states(self) -> dict[str, StateSpec]:
        states: dict[str, StateSpec] = {}
        for prog in self._programs.values():
            for s in prog.states:
                seen = states.setdefault(s.name, s)
                if seen != s:
                    raise AnemllError(f"state {s.name!r} is declared as {seen.shape} and {s.shape}",
                                      "the package is inconsistent; re-convert it", stage="runtime",
                                      code="bad_input")
        return states
