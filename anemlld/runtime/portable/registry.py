"""The op registry: the view of one MIL op handed to each builder, the
builders by op type, and the dtype mapping."""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from shared.errors import AnemllError


Tensor = torch.Tensor
Kernel = tuple[Callable[..., Any], tuple[str, ...]]
"""What an op builder returns: the function run per call and the names of
the op inputs passed to it, in order (a list input arrives as a list)."""


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


def coremltools_quiet():
    # coremltools logs a "Failed to load ..." banner on Linux at import time.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools
    return coremltools


def _dtype_name(builtin: Any) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(builtin)


def torch_dtype(builtin: Any) -> torch.dtype:
    name = _dtype_name(builtin)
    if name not in _TORCH_DTYPES:
        raise AnemllError(f"MIL dtype {name} is not supported by the portable executor",
                          "this package needs Core ML on macOS", stage="runtime", code="unsupported_op")
    return _TORCH_DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- the op view handed to builders ------------------------------------------

class Dynamic(Exception):
    """An input a builder needs at load time is only known at run time."""


_REQUIRED = object()


class OpView:
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
        except Dynamic:
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
        return torch_dtype(self.op.outputs[i].dtype)


BUILDERS: dict[str, Callable[[OpView], Kernel]] = {}


def builds(*names: str):
    def register(builder: Callable[[OpView], Kernel]):
        for name in names:
            BUILDERS[name] = builder
        return builder
    return register


def supported_op_types() -> list[str]:
    return sorted(BUILDERS)


def as_f32(x: Tensor) -> Tensor:
    return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x


def axis_index(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
