"""FFN chunks exported without the torch frontend ever seeing a weight.

The torch part (``export.ChunkPart`` over the architecture's file) is traced
once per function with every projection weight lifted out as an extra input:
placeholders of the right shape that take no memory (one zero, expanded). The
torch frontend then converts a program of activations only, in seconds
whatever the model's size, and each lifted input is replaced by the
checkpoint's weight, read and quantized one at a time straight into a
``constexpr_lut_to_dense`` (or an fp16 const without a LUT). So the program
is generated from the one definition of the architecture, and no copy of the
chunk in fp32 or fp16 is ever made: what stays in memory is the quantized
chunk (indices and tables), which is the output being written.

The frontend's route (``export.export_chunk``) stays for embeddings and the
LM head, and as the baseline ``bench/export_paths.py`` measures this against.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from anemlld.convert import export, lut
from anemlld.convert.models import build
from anemlld.convert.models.base import AneLM, ModelArgs, weights_loaded_later
from shared.errors import AnemllError

log = logging.getLogger(__name__)


@dataclass
class Weight:
    """One projection weight as it goes into the program."""

    shape: tuple[int, ...]
    dense: np.ndarray | None = None    # fp16, without a LUT
    table: np.ndarray | None = None    # the LUT, in constexpr_lut_to_dense's layout
    indices: np.ndarray | None = None  # weight-shaped, uint8 holding ``bits``-bit values


class LiftedChunk(export.ChunkPart):
    """``ChunkPart`` whose projection weights are inputs of ``forward``
    after the step inputs ``names``, in the order of ``convs``."""

    def __init__(self, lm: AneLM, prefill: bool, names: list[str], convs: list[nn.Conv2d]):
        super().__init__(lm, prefill, names)
        self.convs = convs

    def forward(self, hidden_states, position_ids, *rest):
        step, weights = rest[:len(self.names)], rest[len(self.names):]
        with _lifted(self.convs, weights):
            return super().forward(hidden_states, position_ids, *step)


@contextmanager
def _lifted(convs: list[nn.Conv2d], weights):
    for conv, w in zip(convs, weights):
        conv.forward = lambda x, conv=conv, w=w: conv._conv_forward(x, w, conv.bias)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


def input_name(param: str) -> str:
    """The program input a lifted weight enters as (coremltools' spelling)."""
    return "lifted_" + param.replace(".", "_")


@contextmanager
def validated_once():
    """coremltools checks the whole program after each of its ~90 passes
    (every op's inputs and consumers): half of a 1B-shaped chunk's export
    here, growing with the ops. Inside, those checks are skipped; the caller
    validates the result once."""
    from coremltools.converters.mil.mil import Program

    real = Program.validate
    Program.validate = lambda self, check_essential_scope=False: None
    try:
        yield
    finally:
        Program.validate = real


def share_constants(prog) -> None:
    """Constants of equal value in several functions (the rope tables, the
    masks' shapes) stored once, as ``save_multifunction`` stores them; the
    weights already carry their ids. Only the small rest is hashed."""
    ids: dict[tuple, str] = {}
    for fn in prog.functions.values():
        for op in fn.operations:
            value = op.outputs[0].val if op.op_type == "const" and op.weight_id is None else None
            if isinstance(value, np.ndarray) and value.size > 1:
                key = (value.dtype.str, value.shape, hashlib.sha256(np.ascontiguousarray(value).tobytes()).digest())
                op.weight_id = ids.setdefault(key, f"shared_{len(ids)}")


class DirectChunk:
    """One FFN chunk: the torch part without its projection weights, and
    those weights read (and quantized) one at a time from ``get``."""

    def __init__(self, architecture: str, args: ModelArgs, layers: range, context_length: int,
                 get: Callable[[str], torch.Tensor], release: Callable[[], None] | None = None,
                 ring: int | None = None):
        """``release`` (optional) unmaps the checkpoint: called after each
        weight is read, so that its pages do not stay resident with the
        quantized chunk. ``ring``: as ``AneLM``'s."""
        with weights_loaded_later():
            lm = build(architecture, args, layers=layers, embeddings=False, lm_head=False,
                       context_length=context_length, ring=ring)
        # names as ChunkPart sees them: its ``model.`` before the model's own
        self.convs = {f"model.{name}.weight": m for name, m in lm.named_modules() if isinstance(m, nn.Conv2d)}
        self.shapes = {name: tuple(m.weight.shape) for name, m in self.convs.items()}
        for m in self.convs.values():  # skip_init left them unallocated: shapes only, before anything touches them
            m.weight = nn.Parameter(m.weight.to("meta"), requires_grad=False)
        lm.load_weights(get, skip=lambda name: f"model.{name}" in self.convs)
        self.lm, self.dtype = export._trace_dtype(lm)
        self.get, self.release, self.layers = get, release, layers
        self.weights: dict[str, Weight] = {}

    def read(self, bits: int | None, group_size: int) -> int:
        """Read every projection weight, one at a time, quantized to ``bits``
        (k-means per group of ``group_size`` rows) or as fp16. Returns the count."""
        for name, shape in self.shapes.items():
            tensor = self.lm._read(self.get, name.removeprefix("model."))
            if tuple(tensor.shape) != shape[:2]:
                raise AnemllError(f"weight {name} has shape {tuple(tensor.shape)}, expected {shape[:2]}",
                                  "the weights do not match config.json; re-download the model", stage="load",
                                  code="bad_input")
            tensor = tensor.reshape(shape).float()  # fp32 as load_weights folds it, one weight at a time
            self.lm.fold(name.removeprefix("model."), tensor)
            if bits is None:
                self.weights[name] = Weight(shape, dense=tensor.to(torch.float16).numpy())
            else:
                q = lut.quantize_weight(tensor, bits, group_size)
                g = lut.group_size_for(shape[0], group_size)
                table = q.lut.numpy().reshape((shape[0] // g,) + (1,) * (len(shape) - 1) + (1 << bits, 1))
                # in the dtype the program stores, once for both functions
                self.weights[name] = Weight(shape, table=table, indices=q.indices.numpy().astype(lut.index_dtype(bits)))
            del tensor
            if self.release is not None:
                self.release()
        log.debug("read %d weights of layers %s, %s", len(self.weights), self.layers, f"LUT {bits}" if bits else "fp16")
        return len(self.weights)

    def export_combined(self, shapes: export.Shapes):
        """``infer`` (the default) and ``prefill`` in one ML program, each
        weight stored once for both: what ``export.combine`` makes of two
        ``export`` packages, without writing, reading back and hashing them."""
        from coremltools import _SPECIFICATION_VERSION_IOS_18
        from coremltools.converters.mil.converter import mil_convert
        from coremltools.converters.mil.mil import Program

        if len(self.weights) != len(self.shapes):
            raise RuntimeError("DirectChunk.read must run before export")
        ct = export._ct()
        both = Program()
        for name, prefill in ((export.INFER, False), (export.PREFILL, True)):
            both.add_function(name, self._program(ct, shapes, prefill).functions["main"])
        share_constants(both)
        both.default_function_name = export.INFER
        both.skip_all_passes = True
        both.export_as_multifunction = True
        both.validate()
        with warnings.catch_warnings(), validated_once():
            warnings.simplefilter("ignore")
            return mil_convert(both, convert_to="mlprogram", convert_from="milinternal",
                               specification_version=_SPECIFICATION_VERSION_IOS_18,
                               compute_units=ct.ComputeUnit.CPU_ONLY, skip_model_load=True)

    def _program(self, ct, shapes: export.Shapes, prefill: bool):
        lm, dtype = self.lm, self.dtype
        names = list(self.convs)
        example, inputs, step, states = export.chunk_interface(ct, lm, shapes, prefill, dtype)
        placeholders = tuple(torch.zeros((), dtype=dtype).expand(self.shapes[n]) for n in names)
        part = LiftedChunk(lm, prefill, step, [self.convs[n] for n in names])
        traced = export._trace(part, tuple(example) + placeholders)
        lm.reset_cache()
        inputs += [ct.TensorType(name=input_name(n), shape=self.shapes[n], dtype=np.float16) for n in names]
        with warnings.catch_warnings(), validated_once():
            warnings.simplefilter("ignore")
            prog = ct.convert(traced, convert_to="milinternal", inputs=inputs, outputs=export.chunk_outputs(ct),
                              states=states, minimum_deployment_target=ct.target.iOS18,
                              compute_precision=ct.precision.FLOAT16)
        prog.validate(check_essential_scope=True)
        self._put_weights(prog, names)
        return prog

    def _put_weights(self, prog, names: list[str]) -> None:
        """Each lifted input replaced by its weight as a constant; run as a
        coremltools graph pass, so that the new ops get scope info."""
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
        from coremltools.converters.mil.mil.passes.helper import block_context_manager

        weights = self.weights
        lifted = {input_name(n): n for n in names}

        class PutWeights(AbstractGraphPass):
            def apply(self, program):
                @block_context_manager
                def put(fn):
                    first = fn.operations[0]
                    for inp, n in lifted.items():
                        w, const_name = weights[n], n.replace(".", "_")
                        if w.dense is not None:
                            new = mb.const(val=w.dense, name=const_name, before_op=first)
                            stored = {"": new.op}
                        else:
                            new = mb.constexpr_lut_to_dense(indices=w.indices, lut=w.table,
                                                            name=const_name + "_lut", before_op=first)
                            stored = {f"_{k}": new.op.inputs[k].op for k in ("indices", "lut")}
                        # one blob for this weight in every function of a package
                        for suffix, const in stored.items():
                            const.weight_id = const_name + suffix
                        fn.replace_uses_of_var_after_op(anchor_op=None, old_var=fn.inputs[inp], new_var=new,
                                                        no_check_var_types=True)
                put(program.functions["main"])

        PutWeights()(prog)
        fn = prog.functions["main"]
        for inp in lifted:
            del fn._input_dict[inp]
            del fn.placeholder_inputs[inp]
        fn.input_types = [t for t in fn.input_types if t.name not in lifted]
