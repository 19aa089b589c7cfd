"""Parts exported without the torch frontend ever seeing a weight.

Every part (embeddings, FFN chunk, LM head, monolithic model) is one of
export's torch parts over the architecture's file, traced once per function
with every projection and embedding weight lifted out as an extra input:
placeholders of the right shape that take no memory (one zero, expanded). The
torch frontend then converts a program of activations only, in seconds
whatever the model's size, and each lifted input is replaced by the
checkpoint's weight, read and quantized one at a time straight into a
``constexpr_lut_to_dense`` (or an fp16 const without a LUT). So the program
is generated from the one definition of the architecture, and no copy of the
part in fp32 or fp16 is ever made: what stays in memory is the quantized
part (indices and tables), which is the output being written. A part's
functions (``infer`` and ``prefill``; ``logits`` and ``argmax``) are built
into one program over one copy of the weights.

The frontend's route (``export.export_chunk`` and the others) stays as the
reference the tests compare this with and the baseline ``bench/export_paths.py``
measures it against.
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
import torch.nn.functional as F
from torch import nn

from anemlld.convert import export, lifted_conv, lut, memory
from anemlld.convert.spill import Spill
from anemlld.convert.models import build
from anemlld.convert.models.base import ModelArgs, expected_shape, last_read, weights_loaded_later
from shared.errors import AnemllError

log = logging.getLogger(__name__)


@dataclass
class Weight:
    """One lifted weight as it goes into the program."""

    shape: tuple[int, ...]
    dense: np.ndarray | None = None    # fp16, without a LUT (a placeholder: its values are spilled)
    table: np.ndarray | None = None    # the LUT, in constexpr_lut_to_dense's layout
    indices: np.ndarray | None = None  # weight-shaped ``bits``-bit values (a placeholder: spilled)


class Lifted(nn.Module):
    """``function``'s module whose ``lifted`` weights are inputs of
    ``forward`` after its own, in their order. The module is held outside
    the submodules, and its model under the same ``model`` attribute: the
    traced buffers (the states) keep their names."""

    def __init__(self, function: export.Function, lifted: list[nn.Module]):
        super().__init__()
        self.model = function.module.model
        self.__dict__["part"] = function.module
        self.count, self.lifted = len(function.example), lifted

    def forward(self, *args):
        with _lifted(self.lifted, args[self.count:]):
            return self.part(*args[:self.count])


@contextmanager
def _lifted(modules: list[nn.Module], weights):
    for m, w in zip(modules, weights):
        if isinstance(m, nn.Embedding):
            m.forward = lambda ids, m=m, w=w: F.embedding(ids, w, m.padding_idx)
        else:  # recorded as a convolution, not computed (convert/lifted_conv.py)
            m.forward = lambda x, m=m, w=w: lifted_conv.of(m, x, w)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def const_name(param: str) -> str:
    """The const a lifted weight becomes, and its blob's ``weight_id``
    (suffixed ``_indices`` and ``_lut`` with a LUT)."""
    return param.replace(".", "_")


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


ROWS = 8192  # rows of a weight folded in fp32 at a time
# values of a weight quantized at a time (whole groups of rows); each group's
# result is the same in any block (lut.quantize_weight), so the blocks bound
# the quantizer's outputs held at once, not the tables
BLOCK_VALUES = memory.QUANTIZE_BLOCK_VALUES


def _quantized_blocks(weight: torch.Tensor, bits: int, group_size: int, tables: list):
    """The LUT indices of ``weight`` a block of whole groups of rows at a
    time (all of it for one table per tensor, ``group_size`` 0: one group), in the
    dtype the program stores; each block's table is appended to ``tables``."""
    rows = weight.shape[0]
    g = lut.group_size_for(rows, group_size)  # all rows for 0
    step = max(g, BLOCK_VALUES // weight[0].numel() // g * g)
    for start in range(0, rows, step):
        q = lut.quantize_weight(weight[start:start + step], bits, g)
        tables.append(q.lut)
        yield q.indices.numpy().astype(lut.index_dtype(bits))
        del q


class DirectPart:
    """One part (embeddings, FFN chunk, LM head, monolithic model; ``part``
    as ``build`` takes it): the torch model without its projection and
    embedding weights, and those weights read (and quantized) one at a
    time from ``get``."""

    def __init__(self, architecture: str, args: ModelArgs, context_length: int,
                 get: Callable[[str], torch.Tensor], release: Callable[[], None] | None = None,
                 ring: int | None = None, spill_dir: str | None = None, **part):
        """``release`` (optional) unmaps the checkpoint: called after each
        weight is read, so that its pages do not stay resident with the
        quantized part. ``ring``: as ``AneLM``'s. Each weight, once read,
        waits in a scratch file in ``spill_dir`` (the system's temporary
        folder by default) until the package is written
        (convert/spill.py), so only one weight at a time is in memory."""
        with weights_loaded_later():
            lm = build(architecture, args, context_length=context_length, ring=ring, **part)
        # names as the export parts see them: their ``model.`` before the model's own
        self.lifted = {f"model.{name}.weight": m for name, m in lm.named_modules()
                       if isinstance(m, (nn.Conv2d, nn.Embedding))}
        self.shapes = {name: tuple(m.weight.shape) for name, m in self.lifted.items()}
        for m in self.lifted.values():  # skip_init left them unallocated: shapes only, before anything touches them
            m.weight = nn.Parameter(m.weight.to("meta"), requires_grad=False)
        lm.load_weights(get, skip=lambda name: f"model.{name}" in self.lifted)
        self.lm, self.dtype = export._trace_dtype(lm)
        self.get, self.release, self.spill_dir = get, release, spill_dir
        self.weights: dict[str, Weight] = {}
        self.spill: Spill | None = None

    def read(self, luts: dict[str, tuple[int, int]]) -> int:
        """Read every lifted weight, one at a time: a weight named with a
        scope of ``luts`` (``export.LAYERS_SCOPE``: (bits, group size))
        quantized with k-means per group of rows, the others as fp16.
        Returns the count."""
        get = last_read(self.get)
        self.spill = self.spill or Spill(self.spill_dir)
        for name, shape in self.shapes.items():
            ours = name.removeprefix("model.")
            tensor = self.lm.checkpoint_tensor(get, ours)
            if tuple(tensor.shape) != expected_shape(ours, self.lm.get_parameter(ours)):
                raise AnemllError(f"weight {ours} has shape {tuple(tensor.shape)}, expected {shape[:2]}",
                                  "the weights do not match config.json; re-download the model", stage="load",
                                  code="bad_input")
            weight = self._folded(ours, tensor).reshape(shape)
            del tensor
            lut_of = next((v for scope, v in luts.items() if name.startswith(scope)), None)
            key = const_name(name)  # the weight_id its consts get in _put_weights
            if lut_of is None:
                self.weights[name] = Weight(shape, dense=self.spill.put(key, weight.numpy()))
            else:
                bits, group_size = lut_of
                tables: list[torch.Tensor] = []
                # fp16 in: the quantizer clusters the values Core ML stores; in the dtype the program
                # stores, once for every function, spilled a block of rows at a time
                indices = self.spill.put_pieces(f"{key}_indices", shape, np.dtype(lut.index_dtype(bits)),
                                                _quantized_blocks(weight, bits, group_size, tables))
                g = lut.group_size_for(shape[0], group_size)
                table = torch.cat(tables).numpy().reshape((shape[0] // g,) + (1,) * (len(shape) - 1) + (1 << bits, 1))
                self.weights[name] = Weight(shape, table=table, indices=indices)
            del weight
            if self.release is not None:
                self.release()
        log.debug("read %d weights (%s)", len(self.weights), ", ".join(f"{s}: LUT {b}" for s, (b, _) in luts.items())
                  or "fp16")
        return len(self.weights)

    def close(self) -> None:
        """Remove the spilled weights (export has written them into its package)."""
        if self.spill is not None:
            self.spill.close()

    def _folded(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` folded in fp32 as ``load_weights`` folds it, rounded to
        fp16; a block of rows at a time, so that no fp32 copy of an
        embedding table is ever made."""
        out = torch.empty(tensor.shape, dtype=torch.float16)
        for start in range(0, tensor.shape[0], ROWS):
            block = tensor[start:start + ROWS].to(torch.float32, copy=True)
            self.lm.fold(name, block)
            out[start:start + ROWS] = block
        return out

    def export(self, function: Callable[..., export.Function], shapes: export.Shapes,
               variants: dict[str, dict]):
        """The ML program of one function per entry of ``variants`` (name ->
        arguments of ``function``, an ``export.*_function``), each weight
        stored once for all of them: what ``export.combine`` makes of
        single-function packages, without writing, reading back and hashing
        them. One entry: a plain program (function ``main``); more: a
        multifunction program whose default is the first."""
        from coremltools import _SPECIFICATION_VERSION_IOS_18
        from coremltools.converters.mil.converter import mil_convert
        from coremltools.converters.mil.mil import Program

        if len(self.weights) != len(self.shapes):
            raise RuntimeError("DirectPart.read must run before export")
        ct = export._ct()
        prog = Program()
        for name, kw in variants.items():
            fn = self._program(ct, function(self.lm, shapes, self.dtype, **kw)).functions["main"]
            prog.add_function(name if len(variants) > 1 else "main", fn)
        share_constants(prog)
        if len(variants) > 1:
            prog.default_function_name = next(iter(variants))
            prog.export_as_multifunction = True
        prog.skip_all_passes = True
        prog.validate()
        with warnings.catch_warnings(), validated_once(), self.spill.serialized():
            warnings.simplefilter("ignore")
            model = mil_convert(prog, convert_to="mlprogram", convert_from="milinternal",
                                specification_version=_SPECIFICATION_VERSION_IOS_18,
                                compute_units=ct.ComputeUnit.CPU_ONLY, skip_model_load=True)
        self.spill.close()  # every blob is in the package now
        return model

    def _program(self, ct, f: export.Function):
        """``f`` converted by the torch frontend with every lifted weight a
        placeholder input, then those inputs replaced by the weights."""
        names = list(self.lifted)
        placeholders = tuple(torch.zeros((), dtype=self.dtype).expand(self.shapes[n]) for n in names)
        lifted_conv.register()
        traced = export._trace(Lifted(f, [self.lifted[n] for n in names]), tuple(f.example) + placeholders)
        self.lm.reset_cache()
        inputs = f.inputs + [ct.TensorType(name=input_name(n), shape=self.shapes[n], dtype=np.float16) for n in names]
        with warnings.catch_warnings(), validated_once():
            warnings.simplefilter("ignore")
            prog = ct.convert(traced, convert_to="milinternal", inputs=inputs, outputs=f.outputs,
                              states=f.states or None, minimum_deployment_target=ct.target.iOS18,
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
                        w, name = weights[n], const_name(n)
                        if w.dense is not None:
                            new = mb.const(val=w.dense, name=name, before_op=first)
                            stored = {"": new.op}
                        else:
                            new = mb.constexpr_lut_to_dense(indices=w.indices, lut=w.table,
                                                            name=name + "_lut", before_op=first)
                            stored = {f"_{k}": new.op.inputs[k].op for k in ("indices", "lut")}
                        # one blob for this weight in every function of a package
                        for suffix, const in stored.items():
                            const.weight_id = name + suffix
                        fn.replace_uses_of_var_after_op(anchor_op=None, old_var=fn.inputs[inp], new_var=new,
                                                        no_check_var_types=True)
                put(program.functions["main"])

        PutWeights()(prog)
        fn = prog.functions["main"]
        for inp in lifted:
            del fn._input_dict[inp]
            del fn.placeholder_inputs[inp]
        fn.input_types = [t for t in fn.input_types if t.name not in lifted]
