"""Torch parts -> Core ML packages: each part's functions with the input,
output and state names of the ANEMLL layout (what both routes trace), the
torch frontend's route (``ct.convert`` of the traced part with its weights,
LUT encoding; the reference and baseline of convert/program.py's),
combining single-function packages, metadata, compiling to ``.mlmodelc``."""
from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anemlld import __version__
from anemlld.convert.lut import encode_program
from anemlld.convert.models.base import AneLM, causal_mask
from shared.errors import AnemllError

log = logging.getLogger(__name__)

INFER, PREFILL = "infer", "prefill"
LOGITS, ARGMAX = "logits", "argmax"  # the LM head's functions (with --argmax-in-model)


def _ct():
    # coremltools logs "Failed to load ..." lines on Linux at import.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct
        try:  # coremltools 8.3's layout; elsewhere its own, slower check stays
            from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision
        except ImportError:
            FP16ComputePrecision = None
    if FP16ComputePrecision is not None and hasattr(FP16ComputePrecision, "fp16_overflow"):
        FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)
    return ct


FP16_MAX = 65504.0


def overflows_fp16(value) -> bool:
    """Whether a finite value of ``value`` (|x| < 1e38; larger ones stand for
    infinity, as in attention masks) is beyond fp16's range: the test
    coremltools' fp16 pass applies to every fp32 constant."""
    value = np.asarray(value)
    if value.size == 0 or (-FP16_MAX <= value.min() and value.max() <= FP16_MAX):
        return False  # the usual case: two passes over the weight, no copies
    magnitude = np.abs(value)
    return bool(np.max(magnitude, where=magnitude < 1e38, initial=0.0) > FP16_MAX)


def fp16_overflow(op) -> bool:
    """Replaces ``FP16ComputePrecision.fp16_overflow`` of coremltools 8.3
    with the same answer: theirs indexes the values below 1e38 through
    ``np.where`` (int64 index arrays, about 40 bytes per weight) and was a
    quarter of a 1B-shaped chunk's export time here. The torch frontend
    promotes our fp16 weights to fp32 next to fp32 activations, so every
    weight goes through this test."""
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, (list, tuple)) else (inputs,):
            if (var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")
                    and overflows_fp16(var.op.val.val)):
                return True
    return False


@dataclass(frozen=True)
class Shapes:
    hidden: int
    context: int
    batch: int


class EmbeddingsPart(nn.Module):
    def __init__(self, lm: AneLM):
        super().__init__()
        self.model = lm

    def forward(self, input_ids):
        return self.model.embed(input_ids)


class ChunkPart(nn.Module):
    """One function of an FFN chunk, taking ``hidden_states``,
    ``position_ids`` and then the inputs named ``names``. The wrapper's
    ``model.`` plus the body's ``model.`` give the states their ANEMLL names
    (``model.model.kv_cache_0``)."""

    def __init__(self, lm: AneLM, prefill: bool, names: list[str]):
        super().__init__()
        self.model = lm
        self.prefill = prefill
        self.names = names

    def forward(self, hidden_states, position_ids, *step):
        return self.model.layers_forward(hidden_states, position_ids, **dict(zip(self.names, step)),
                                         last_only=self.prefill)


class HeadPart(nn.Module):
    """The split LM head: ``logits1..K``, or with ``argmax`` each split's
    winner, ``argmax_idx`` (int32, index within the split) and
    ``argmax_val`` (its logit), as ANEMLL's ``--argmax`` heads return them:
    2K numbers leave the model instead of the vocabulary."""

    def __init__(self, lm: AneLM, argmax: bool = False):
        super().__init__()
        self.model = lm
        self.argmax = argmax

    def forward(self, hidden_states):
        splits = self.model.head(hidden_states)
        return argmax_pair(splits) if self.argmax else tuple(splits)


def argmax_pair(splits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each split's winner: (index within the split int32, its logit), (K,) each."""
    values = torch.cat([s.reshape(-1).max(dim=0, keepdim=True).values for s in splits])
    indices = torch.cat([s.reshape(-1).argmax(dim=0, keepdim=True).to(torch.int32) for s in splits])
    return indices, values


class MonolithicPart(nn.Module):
    """One function of a monolithic model: token ids through the embeddings,
    every layer and the head, ANEMLL's inputs and outputs (``input_ids``,
    ``position_ids``, ``causal_mask``, ``current_pos`` -> ``logits1..K``; the
    prefill function returns the last row's)."""

    def __init__(self, lm: AneLM, prefill: bool, names: list[str], argmax: bool = False):
        super().__init__()
        self.model = lm
        self.prefill = prefill
        self.names = names
        self.argmax = argmax

    def forward(self, input_ids, position_ids, *step):
        h = self.model.embed(input_ids)
        h = self.model.layers_forward(h, position_ids, **dict(zip(self.names, step)), last_only=self.prefill)
        splits = self.model.head(h)
        return argmax_pair(splits) if self.argmax else tuple(splits)


def _trace(module: nn.Module, example: tuple) -> torch.jit.ScriptModule:
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the dynamic cache slice are expected
        return torch.jit.trace(module, example, check_trace=False)


@dataclass(frozen=True)
class Lut:
    """How a part's weights were quantized: ``bits`` per entry, one table per
    ``group_size`` output channels, for weights feeding ``op_type`` ops."""

    bits: int
    group_size: int
    op_type: str  # "conv" (projections) or "gather" (embeddings)
    scope: str = ""  # only weights whose names start with it (one part of a monolithic model)


# The weights of each part, by the names tracing gives them (a monolithic model holds all three).
EMBEDDINGS_SCOPE, LAYERS_SCOPE, HEAD_SCOPE = "model.model.embed_tokens.", "model.model.layers.", "model.lm_head."


def _convert(traced, inputs, outputs, states=None, lut: Lut | list[Lut] | None = None):
    """ct.convert to an fp16 ML program; with ``lut`` (one per part the
    model holds), the weights (already k-means quantized in torch) are
    stored as ``constexpr_lut_to_dense``."""
    ct = _ct()
    luts = [lut] if isinstance(lut, Lut) else list(lut or [])
    kw = dict(inputs=inputs, outputs=outputs, states=states or None, minimum_deployment_target=ct.target.iOS18,
              compute_precision=ct.precision.FLOAT16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not luts:
            return ct.convert(traced, convert_to="mlprogram", skip_model_load=True, **kw)
        prog = ct.convert(traced, convert_to="milinternal", **kw)
        encoded = [encode_program(prog, t.bits, t.group_size, t.op_type, t.scope) for t in luts]
        # The program went through the whole pass pipeline already; running it
        # again would only re-hash every weight (const_deduplication) and
        # re-check it for fp16 overflow.
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                           pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    for t, count in zip(luts, encoded):
        dense = dense_weights(model, t.op_type, t.scope)
        if dense or not count:
            raise AnemllError(f"LUT {t.bits} encoding left {len(dense)} weights dense (first: {dense[:1]})",
                              "report this with the model's config.json; convert with that part's LUT set to none "
                              "to get an unquantized model meanwhile", stage="quantize", code="quantize_failed")
    return model


def _trace_dtype(lm: AneLM) -> tuple[AneLM, torch.dtype]:
    """The dtype to trace ``lm`` in, and ``lm`` cast to it.

    fp16 wherever possible: tracing in fp32 makes coremltools hold several fp32
    copies of every weight (the 1B-shaped embeddings peaked at 9.7 GB and took
    27 s in fp32, 2.0 GB and 9 s in fp16). Parts with biased convolutions
    (Qwen2's q/k/v) are traced in fp32 instead, because coremltools 8.3's torch
    frontend mishandles fp16 conv biases; ``compute_precision=FLOAT16`` makes
    their program fp16 all the same. The KV cache is fp16 either way: Core ML
    states must be."""
    biased = any(isinstance(m, nn.Conv2d) and m.bias is not None for m in lm.modules())
    dtype = torch.float32 if biased else torch.float16
    lm = lm.to(dtype)
    for name, kv in lm.caches().items():
        setattr(lm.model, name, kv.half())
    return lm, dtype


@dataclass
class Function:
    """One function of a part, as both routes build it: the torch module to
    trace (one of the parts above, over the model), example inputs to trace
    it with, and the Core ML inputs, outputs and states."""

    module: nn.Module
    example: tuple
    inputs: list
    outputs: list
    states: list


def embeddings_function(lm: AneLM, shapes: Shapes, dtype: torch.dtype) -> Function:
    ct = _ct()
    ids = ct.TensorType(name="input_ids", dtype=np.int32,
                        shape=ct.EnumeratedShapes(shapes=[(1, 1), (1, shapes.batch)], default=(1, 1)))
    return Function(EmbeddingsPart(lm), (torch.zeros(1, 1, dtype=torch.int32),), [ids],
                    [ct.TensorType(name="hidden_states", dtype=np.float16)], [])


def _step(lm: AneLM, seq: int, dtype) -> tuple[list, list, list[str]]:
    """The example tensors and Core ML inputs of ``position_ids`` and the step
    inputs after it (masks, write positions), and the step inputs' names."""
    ct = _ct()
    positions = torch.arange(seq, dtype=torch.int32)
    example = [positions]
    inputs = [ct.TensorType(name="position_ids", shape=(seq,), dtype=np.int32)]
    step = lm.step_inputs(seq)
    for name, shape in step.items():
        mask = name.endswith("_mask")
        example.append(causal_mask(positions, shape[-1], dtype) if mask else torch.zeros(shape, dtype=torch.int32))
        inputs.append(ct.TensorType(name=name, shape=shape, dtype=np.float16 if mask else np.int32))
    return example, inputs, list(step)


def _states(lm: AneLM) -> list:
    ct = _ct()
    return [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(kv.shape), dtype=np.float16),
                         name=f"model.model.{name}") for name, kv in lm.caches().items()]


def chunk_function(lm: AneLM, shapes: Shapes, dtype: torch.dtype, prefill: bool) -> Function:
    """``infer`` (one token) or ``prefill`` (a batch) of an FFN chunk."""
    ct = _ct()
    seq = shapes.batch if prefill else 1
    example, inputs, names = _step(lm, seq, dtype)
    return Function(ChunkPart(lm, prefill, names), (torch.zeros(1, seq, shapes.hidden, dtype=dtype), *example),
                    [ct.TensorType(name="hidden_states", shape=(1, seq, shapes.hidden), dtype=np.float16), *inputs],
                    chunk_outputs(ct), _states(lm))


def chunk_outputs(ct) -> list:
    return [ct.TensorType(name="output_hidden_states", dtype=np.float16)]


def head_function(lm: AneLM, shapes: Shapes, dtype: torch.dtype, argmax: bool = False) -> Function:
    """The split LM head's logits, or with ``argmax`` each split's winner."""
    ct = _ct()
    inputs = [ct.TensorType(name="hidden_states", shape=(1, 1, shapes.hidden), dtype=np.float16)]
    return Function(HeadPart(lm, argmax), (torch.zeros(1, 1, shapes.hidden, dtype=dtype),), inputs,
                    _head_outputs(ct, len(lm.lm_head.sizes), argmax), [])


def _head_outputs(ct, splits: int, argmax: bool) -> list:
    if argmax:
        return [ct.TensorType(name="argmax_idx", dtype=np.int32), ct.TensorType(name="argmax_val", dtype=np.float16)]
    return [ct.TensorType(name=f"logits{i + 1}", dtype=np.float16) for i in range(splits)]


def monolithic_function(lm: AneLM, shapes: Shapes, dtype: torch.dtype, prefill: bool,
                        argmax: bool = False) -> Function:
    """``infer`` or ``prefill`` of a monolithic model; with ``argmax`` it
    returns each split's winner, as ANEMLL's ``--argmax``."""
    ct = _ct()
    seq = shapes.batch if prefill else 1
    example, inputs, names = _step(lm, seq, dtype)
    return Function(MonolithicPart(lm, prefill, names, argmax), (torch.zeros(1, seq, dtype=torch.int32), *example),
                    [ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32), *inputs],
                    _head_outputs(ct, len(lm.lm_head.sizes), argmax), _states(lm))


def _export(lm: AneLM, shapes: Shapes, function, lut: Lut | list[Lut] | None, **kw):
    """One function through the torch frontend, the weights in the traced
    graph: the route before convert/program.py's, kept as its reference and
    the bench's baseline (bench/export_paths.py)."""
    lm, dtype = _trace_dtype(lm)
    f = function(lm, shapes, dtype, **kw)
    traced = _trace(f.module, f.example)
    lm.reset_cache()  # tracing ran the model once; the state must start empty
    return _convert(traced, f.inputs, f.outputs, f.states, lut)


def export_embeddings(lm: AneLM, shapes: Shapes, lut: Lut | None = None):
    return _export(lm, shapes, embeddings_function, lut)


def export_chunk(lm: AneLM, shapes: Shapes, prefill: bool, lut: Lut | None = None):
    return _export(lm, shapes, chunk_function, lut, prefill=prefill)


def export_head(lm: AneLM, shapes: Shapes, lut: Lut | None = None, argmax: bool = False):
    return _export(lm, shapes, head_function, lut, argmax=argmax)


def export_monolithic(lm: AneLM, shapes: Shapes, prefill: bool, luts: list[Lut] | None = None,
                      argmax: bool = False):
    return _export(lm, shapes, monolithic_function, luts, prefill=prefill, argmax=argmax)


def dense_weights(mlmodel, op_type: str, scope: str = "") -> list[str]:
    """Names of ``op_type`` ops whose weight (named ``scope``...) is still a plain constant."""
    weight_input = {"conv": "weight", "gather": "x"}[op_type]
    dense = []
    for fn in mlmodel._mil_program.functions.values():
        for op in fn.operations:
            if op.op_type != op_type:
                continue
            w = op.inputs[weight_input]
            producer = w.op.op_type if w.op is not None else None
            if (producer == "const" and w.val is not None and w.val.size > 1 and w.val.dtype.kind == "f"
                    and w.op.name.startswith(scope)):
                dense.append(op.name)
    return dense


# --- metadata, combine, compile -------------------------------------------

def set_metadata(mlmodel, meta: dict[str, str], description: str) -> None:
    set_spec_metadata(mlmodel._spec, meta, description)


def set_spec_metadata(spec, meta: dict[str, str], description: str) -> None:
    spec.description.metadata.author = f"anemlld {__version__}"
    spec.description.metadata.versionString = __version__
    spec.description.metadata.shortDescription = description
    for k, v in meta.items():
        spec.description.metadata.userDefined[k] = str(v)


def package_spec_path(pkg: Path) -> Path:
    """The protobuf spec file of an .mlpackage, found through its Manifest."""
    import json

    manifest = json.loads((pkg / "Manifest.json").read_text())
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
    return pkg / "Data" / root["path"]


def combine(functions: dict[str, Path], out: Path, meta: dict[str, str], description: str) -> None:
    """One package with a function per entry of ``functions`` (name ->
    single-function package), the first the default; weights that are
    byte-identical in all of them are stored once."""
    ct = _ct()
    desc = ct.utils.MultiFunctionDescriptor()
    for name, pkg in functions.items():
        desc.add_function(str(pkg), src_function_name="main", target_function_name=name)
    desc.default_function_name = next(iter(functions))
    tmp = out.with_name(out.stem + ".combining.mlpackage")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct.utils.save_multifunction(desc, str(tmp))
    # save_multifunction builds a fresh spec: put the metadata back into its
    # protobuf in place (loading and saving the model would copy the weights).
    spec_path = package_spec_path(tmp)
    spec = ct.utils.load_spec(str(tmp))
    set_spec_metadata(spec, meta, description)
    spec_path.write_bytes(spec.SerializeToString())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def compiler() -> str | None:
    """Why compiling is impossible here, or None when xcrun can compile."""
    if platform.system() != "Darwin":
        return f"compiling .mlmodelc needs macOS (this is {platform.system()}); the .mlpackage files are the output"
    if shutil.which("xcrun") is None:
        return "xcrun not found: install the Xcode command line tools (xcode-select --install)"
    return None


def compile_package(pkg: Path, out_dir: Path) -> Path:
    target = out_dir / (pkg.stem + ".mlmodelc")
    shutil.rmtree(target, ignore_errors=True)
    proc = subprocess.run(["xcrun", "coremlcompiler", "compile", str(pkg), str(out_dir)],
                          capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0 or not target.exists():
        raise AnemllError(f"coremlcompiler failed on {pkg.name}: {proc.stderr.strip()[-500:]}",
                          "check that Xcode command line tools are current (xcode-select --install)",
                          stage="compile", code="compile_failed")
    return target
