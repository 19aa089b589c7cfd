"""Torch parts -> Core ML packages: tracing, ``ct.convert`` with the input,
output and state names of the ANEMLL layout, LUT palettization, combining the
``infer`` and ``prefill`` functions, compiling to ``.mlmodelc``."""
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

# coremltools draws a tqdm bar for every pass; our progress reporting replaces
# them. tqdm reads this when first imported, so it is set before any import.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from torch import nn

from anemlld import __version__
from anemlld.convert.models.base import AneLM, causal_mask
from shared.errors import AnemllError

log = logging.getLogger(__name__)

STATE_NAME = "model.model.kv_cache_0"
INFER, PREFILL = "infer", "prefill"


def _ct():
    # coremltools logs "Failed to load ..." lines on Linux at import.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct
    return ct


@dataclass(frozen=True)
class Shapes:
    hidden: int
    context: int
    batch: int
    kv: tuple[int, int, int, int]


class EmbeddingsPart(nn.Module):
    def __init__(self, lm: AneLM):
        super().__init__()
        self.model = lm

    def forward(self, input_ids):
        return self.model.embed(input_ids)


class ChunkPart(nn.Module):
    """One function of an FFN chunk. The wrapper's ``model.`` plus the body's
    ``model.`` give the state its ANEMLL name, ``model.model.kv_cache_0``."""

    def __init__(self, lm: AneLM, prefill: bool):
        super().__init__()
        self.model = lm
        self.prefill = prefill

    def forward(self, hidden_states, position_ids, causal_mask, current_pos):
        return self.model.layers_forward(hidden_states, position_ids, causal_mask, current_pos,
                                         last_only=self.prefill)


class HeadPart(nn.Module):
    def __init__(self, lm: AneLM):
        super().__init__()
        self.model = lm

    def forward(self, hidden_states):
        return tuple(self.model.head(hidden_states))


def _trace(module: nn.Module, example: tuple) -> torch.jit.ScriptModule:
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the dynamic cache slice are expected
        return torch.jit.trace(module, example, check_trace=False)


def _convert(traced, inputs, outputs, states=None):
    ct = _ct()
    kw = dict(inputs=inputs, outputs=outputs, convert_to="mlprogram",
              minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
              skip_model_load=True)
    if states:
        kw["states"] = states
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(traced, **kw)


def _fp32_with_fp16_state(lm: AneLM) -> AneLM:
    """Trace in fp32 (coremltools' torch frontend mishandles fp16 conv biases)
    and let ``compute_precision=FLOAT16`` make the program fp16; the KV cache is
    fp16 already because Core ML states must be."""
    lm = lm.float()
    if hasattr(lm.model, "kv_cache_0"):
        lm.model.kv_cache_0 = lm.model.kv_cache_0.half()
    return lm


def export_embeddings(lm: AneLM, shapes: Shapes):
    ct = _ct()
    lm = _fp32_with_fp16_state(lm)
    traced = _trace(EmbeddingsPart(lm), (torch.zeros(1, 1, dtype=torch.int32),))
    ids = ct.TensorType(name="input_ids", dtype=np.int32,
                        shape=ct.EnumeratedShapes(shapes=[(1, 1), (1, shapes.batch)], default=(1, 1)))
    return _convert(traced, [ids], [ct.TensorType(name="hidden_states", dtype=np.float16)])


def export_chunk(lm: AneLM, shapes: Shapes, prefill: bool):
    ct = _ct()
    lm = _fp32_with_fp16_state(lm)
    seq = shapes.batch if prefill else 1
    positions = torch.arange(seq, dtype=torch.int32)
    example = (torch.zeros(1, seq, shapes.hidden), positions, causal_mask(positions, shapes.context),
               torch.zeros(1, dtype=torch.int32))
    traced = _trace(ChunkPart(lm, prefill), example)
    lm.reset_cache()  # tracing ran the model once; the state must start empty
    inputs = [
        ct.TensorType(name="hidden_states", shape=(1, seq, shapes.hidden), dtype=np.float16),
        ct.TensorType(name="position_ids", shape=(seq,), dtype=np.int32),
        ct.TensorType(name="causal_mask", shape=(1, 1, seq, shapes.context), dtype=np.float16),
        ct.TensorType(name="current_pos", shape=(1,), dtype=np.int32),
    ]
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=shapes.kv, dtype=np.float16), name=STATE_NAME)]
    return _convert(traced, inputs, [ct.TensorType(name="output_hidden_states", dtype=np.float16)], states)


def export_head(lm: AneLM, shapes: Shapes):
    ct = _ct()
    lm = _fp32_with_fp16_state(lm)
    traced = _trace(HeadPart(lm), (torch.zeros(1, 1, shapes.hidden),))
    outputs = [ct.TensorType(name=f"logits{i + 1}", dtype=np.float16) for i in range(len(lm.lm_head.sizes))]
    inputs = [ct.TensorType(name="hidden_states", shape=(1, 1, shapes.hidden), dtype=np.float16)]
    return _convert(traced, inputs, outputs)


# --- LUT ------------------------------------------------------------------

def palettize(mlmodel, bits: int, group_size: int, op_type: str):
    """k-means LUT per grouped channel on the weights feeding ``op_type`` ops
    (conv for projections, gather for embeddings; rotary tables stay fp16).
    A quantization that leaves any such weight dense is an error, not a warning."""
    ct = _ct()
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    cfg = OpPalettizerConfig(mode="kmeans", nbits=bits, granularity="per_grouped_channel",
                             group_size=group_size, weight_threshold=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = palettize_weights(mlmodel, OptimizationConfig(op_type_configs={op_type: cfg}))
    dense = _dense_weights(out, op_type)
    if dense:
        raise AnemllError(f"LUT {bits} quantization left {len(dense)} weights dense (first: {dense[0]})",
                          "report this with the model's config.json; convert with that part's LUT set to none "
                          "to get an unquantized model meanwhile", stage="quantize", code="quantize_failed")
    del ct
    return out


def _dense_weights(mlmodel, op_type: str) -> list[str]:
    weight_input = {"conv": "weight", "gather": "x"}[op_type]
    dense = []
    for fn in mlmodel._mil_program.functions.values():
        for op in fn.operations:
            if op.op_type != op_type:
                continue
            w = op.inputs[weight_input]
            producer = w.op.op_type if w.op is not None else None
            if producer == "const" and w.val is not None and w.val.size > 1:
                dense.append(op.name)
    return dense


# --- metadata, combine, compile -------------------------------------------

def set_metadata(mlmodel, meta: dict[str, str], description: str) -> None:
    mlmodel.author = f"anemlld {__version__}"
    mlmodel.version = __version__
    mlmodel.short_description = description
    for k, v in meta.items():
        mlmodel.user_defined_metadata[k] = str(v)


def combine(infer_pkg: Path, prefill_pkg: Path, out: Path, meta: dict[str, str], description: str) -> None:
    """One package with ``infer`` (default) and ``prefill``; weights that are
    byte-identical in both are stored once."""
    ct = _ct()
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(infer_pkg), src_function_name="main", target_function_name=INFER)
    desc.add_function(str(prefill_pkg), src_function_name="main", target_function_name=PREFILL)
    desc.default_function_name = INFER
    tmp = out.with_name(out.stem + ".combining.mlpackage")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct.utils.save_multifunction(desc, str(tmp))
        # save_multifunction builds a fresh spec: put the metadata back.
        model = ct.models.MLModel(str(tmp), skip_model_load=True)
        set_metadata(model, meta, description)
        model.save(str(out))
    shutil.rmtree(tmp, ignore_errors=True)


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
