"""Element-wise MIL ops."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from anemlld.runtime.portable.registry import Kernel, Tensor, BUILDERS, OpView, builds


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "floor_div": torch.floor_divide, "mod": torch.remainder,  # numpy floor semantics, as MIL
    "equal": torch.eq, "not_equal": torch.ne, "less": torch.lt, "less_equal": torch.le,
    "greater": torch.gt, "greater_equal": torch.ge,
    "logical_and": torch.logical_and, "logical_or": torch.logical_or, "logical_xor": torch.logical_xor,
}

for _name, _fn in _BINARY.items():
    BUILDERS[_name] = lambda b, fn=_fn: (fn, ("x", "y"))


@builds("real_div")
def _real_div(b: OpView) -> Kernel:
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
    BUILDERS[_name] = lambda b, fn=_fn: (fn, ("x",))


@builds("inverse")
def _inverse(b: OpView) -> Kernel:
    eps = b.float("epsilon", 1e-4)
    return (lambda x: torch.reciprocal(x + eps)), ("x",)


@builds("log")
def _log(b: OpView) -> Kernel:
    eps = b.float("epsilon", 1e-45)
    return (lambda x: torch.log(x + eps) if eps else torch.log(x)), ("x",)


@builds("rsqrt")
def _rsqrt(b: OpView) -> Kernel:
    eps = b.float("epsilon", 1e-12)
    return (lambda x: torch.rsqrt(x + eps) if eps else torch.rsqrt(x)), ("x",)


@builds("clip")
def _clip(b: OpView) -> Kernel:
    lo, hi = b.float("alpha"), b.float("beta")
    return (lambda x: torch.clamp(x, lo, hi)), ("x",)


@builds("threshold")
def _threshold(b: OpView) -> Kernel:
    alpha = b.float("alpha")
    return (lambda x: torch.clamp(x, min=alpha)), ("x",)


@builds("leaky_relu")
def _leaky_relu(b: OpView) -> Kernel:
    alpha = b.float("alpha", 0.01)
    return (lambda x: F.leaky_relu(x, alpha)), ("x",)


@builds("elu")
def _elu(b: OpView) -> Kernel:
    alpha = b.float("alpha", 1.0)
    return (lambda x: F.elu(x, alpha)), ("x",)


@builds("linear_activation")
def _linear_activation(b: OpView) -> Kernel:
    alpha, beta = b.float("alpha"), b.float("beta", 0.0)
    return (lambda x: x * alpha + beta), ("x",)


@builds("sigmoid_hard")
def _sigmoid_hard(b: OpView) -> Kernel:
    alpha, beta = b.float("alpha", 0.2), b.float("beta", 0.5)
    return (lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)), ("x",)


@builds("scaled_tanh")
def _scaled_tanh(b: OpView) -> Kernel:
    alpha, beta = b.float("alpha", 1.0), b.float("beta", 1.0)
    return (lambda x: torch.tanh(x * beta) * alpha), ("x",)


@builds("thresholded_relu")
def _thresholded_relu(b: OpView) -> Kernel:
    alpha = b.float("alpha", 1.0)
    return (lambda x: torch.where(x > alpha, x, torch.zeros_like(x))), ("x",)


@builds("clamped_relu")
def _clamped_relu(b: OpView) -> Kernel:
    alpha, beta = b.float("alpha"), b.float("beta")
    return (lambda x: torch.clamp(torch.where(x >= 0, x, x * alpha), max=beta)), ("x",)


@builds("prelu")
def _prelu(b: OpView) -> Kernel:
    # alpha is per channel (axis 1); the const folds into a broadcastable shape once.
    def run(x: Tensor, alpha: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[1] = -1
        return torch.where(x > 0, x, x * alpha.reshape(shape))
    return run, ("x", "alpha")


@builds("gelu")
def _gelu(b: OpView) -> Kernel:
    mode = b.str("mode", "EXACT")
    if mode == "EXACT":
        return F.gelu, ("x",)
    if mode == "TANH_APPROXIMATION":
        return (lambda x: F.gelu(x, approximate="tanh")), ("x",)
    if mode == "SIGMOID_APPROXIMATION":
        return (lambda x: x * torch.sigmoid(x * 1.702)), ("x",)
    raise ValueError(f"gelu mode {mode!r}")


@builds("select")
def _select(b: OpView) -> Kernel:
    def run(cond: Tensor, a: Tensor, c: Tensor) -> Tensor:
        return torch.where(cond if cond.dtype == torch.bool else cond != 0, a, c)
    return run, ("cond", "a", "b")


@builds("cast")
def _cast(b: OpView) -> Kernel:
    out = b.out_dtype()
    if out == torch.bool:
        return (lambda x: x != 0), ("x",)
    return (lambda x: x.to(out)), ("x",)


@builds("identity")
def _identity(b: OpView) -> Kernel:
    return (lambda x: x), ("x",)
