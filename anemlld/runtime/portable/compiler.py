"""One function of a package, compiled into a step list."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from anemlld.runtime.portable.aliases import STATE_OPS, VIEW_OPS, Node, plan_aliases
from anemlld.runtime.portable.constants import tensor_of
from anemlld.runtime.portable.registry import (
    BUILDERS, Dynamic, Kernel, OpView, StateSpec, Tensor, torch_dtype,
)
from shared.errors import AnemllError


STATE_SLOT = 0  # env[0] holds the caller's state dict; state vars resolve to it
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
class Program:
    name: str
    inputs: list[_InputSpec]
    states: list[StateSpec]
    outputs: list[tuple[str, int]]
    template: list[Any]
    steps: list[tuple[Callable[[list], Any], Any, tuple[int, ...]]]
    shared_outputs: frozenset[int]
    op_types: frozenset[str]


class ConstKeys:
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


class FunctionCompiler:
    """Turns one MIL function into a :class:`Program`."""

    def __init__(self, fname: str, func: Any, io: Any, device: torch.device, keys: ConstKeys,
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
            return STATE_SLOT
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
        raise Dynamic(var.name)

    def is_const(self, var: Any) -> bool:
        return var.name in self.values or var.name in self.tensors

    def const_tensor(self, var: Any) -> Tensor:
        name = var.name
        if name not in self.tensors:
            value = self.values[name]
            if isinstance(value, str):
                raise TypeError(f"string constant {name!r} used as a tensor")
            key = self.key.get(name)
            dtype = torch_dtype(var.dtype)
            t = self.shared.get((key, dtype)) if key is not None else None
            if t is None:
                t = tensor_of(value, dtype, self.device)
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
    def compile(self) -> Program:
        from coremltools.converters.mil.mil import types

        func = self.func
        self.state_names = {name for name, var in func.inputs.items() if types.is_state(var.sym_type)}
        inputs = self._inputs()
        states = [StateSpec(name, tuple(int(d) for d in func.inputs[name].shape),
                            torch_dtype(func.inputs[name].dtype)) for name in sorted(self.state_names)]

        nodes = self._fold(list(func.operations))
        outputs = [(v.name, self._slot_of(v)) for v in func.outputs]
        out_slots = {s for _, s in outputs}
        nodes = self._live(nodes, out_slots)
        fixed = self._fixed_slots(inputs)
        modes, clone_updates, buffers = plan_aliases(nodes, out_slots, fixed)

        template: list[Any] = [None] * (len(self.slot) + 1)
        steps = []
        last = self._last_use(nodes, out_slots)
        for i, node in enumerate(nodes):
            view = OpView(node.op, self.const_value, self.device, modes.get(i, "copy"), i in clone_updates)
            fn, args = BUILDERS[node.op.op_type](view)
            slots = tuple(self._arg_slots(node.op, a, template) for a in args)
            # Dropping the last reference as soon as a value is dead keeps peak
            # memory near one layer's worth instead of the whole program's.
            frees = tuple(s for s in set(node.in_slots()) | set(node.outs)
                          if last.get(s) == i and s not in out_slots and s not in fixed and s != STATE_SLOT)
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
        return Program(self.fname, inputs, states, outputs, template, steps, shared_outputs,
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
        if slot != STATE_SLOT and self.is_const(var):
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
            specs.append(_InputSpec(name, self._slot_of(var), torch_dtype(var.dtype),
                                    tuple(int(d) for d in arr.shape), enumerated, ranges))
        return specs

    def _fold(self, ops: list[Any]) -> list[Node]:
        """Record constants, run all-constant ops now (this is where
        ``constexpr_*`` weights are dequantized), return the runtime ops."""
        nodes = []
        for op in ops:
            # Results coremltools already knew while loading never run, so
            # their op types need no implementation here.
            if all(o.val is not None for o in op.outputs) and op.op_type not in STATE_OPS:
                for i, o in enumerate(op.outputs):
                    self._record_const(o, op, i)
                continue
            builder = BUILDERS.get(op.op_type)
            if builder is None:
                raise AnemllError(
                    f"op type {op.op_type!r} (op {op.name!r}, function {self.fname!r}) is not "
                    "implemented by the portable executor",
                    "run this package with Core ML on macOS, or add a builder for the op to anemlld/runtime/portable/ (one file per op family)",
                    stage="runtime", code="unsupported_op")
            in_vars = [v for val in op.inputs.values()
                       for v in (val if isinstance(val, (list, tuple)) else (val,))]
            if op.op_type not in STATE_OPS and all(self.is_const(v) for v in in_vars):
                self._fold_op(op, builder)
                continue
            ins = {k: (tuple(self._slot_of(x) for x in v) if isinstance(v, (list, tuple)) else self._slot_of(v))
                   for k, v in op.inputs.items()}
            state = None
            if op.op_type == "read_state":
                state = op.inputs["input"].name
            elif op.op_type == "coreml_update_state":
                state = op.inputs["state"].name
            nodes.append(Node(op, ins, tuple(self._slot_of(o) for o in op.outputs), state))
        return nodes

    def _fold_op(self, op: Any, builder: Callable[[OpView], Kernel]) -> None:
        fn, args = builder(OpView(op, self.const_value, self.device))
        values = []
        for a in args:
            v = op.inputs[a]
            values.append([self.const_tensor(x) for x in v] if isinstance(v, (list, tuple))
                          else self.const_tensor(v))
        result = fn(*values)
        results = result if isinstance(result, tuple) else (result,)
        for i, (o, t) in enumerate(zip(op.outputs, results)):
            t = t.to(torch_dtype(o.dtype)).contiguous()
            key = self._key_for(op, i, None)
            if key is not None:
                t = self.shared.setdefault((key, t.dtype), t)
            self.tensors[o.name] = t
            self.key[o.name] = key

    def _live(self, nodes: list[Node], out_slots: set[int]) -> list[Node]:
        """Drop ops whose results nobody uses (state updates always count)."""
        needed = set(out_slots)
        kept = []
        for node in reversed(nodes):
            if node.op.op_type == "coreml_update_state" or any(s in needed for s in node.outs):
                kept.append(node)
                needed.update(node.in_slots())
        return kept[::-1]

    @staticmethod
    def _last_use(nodes: list[Node], out_slots: set[int]) -> dict[int, int]:
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
