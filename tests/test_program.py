"""Parts built with lifted weights (anemlld/convert/program.py) against the
torch frontend's (export's ``export_*``): the same interface, ops and stored
size, and the same outputs and cache through the portable executor, for
FFN chunks and monolithic models of every architecture, embeddings and LM
heads (logits and argmax functions), with and without LUTs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from torch import nn

from anemlld.convert import export, lut, program
from anemlld.convert.models import ARCHITECTURES, build
from anemlld.convert.models.base import causal_mask, ring_size, sliding_window
from anemlld.convert.source import HFSource
from tests.conftest import ARCHS, TINY

CTX, BATCH, BITS, GROUP = 32, 8, 4, 16


def interface(path: Path) -> dict:
    import coremltools as ct

    desc = ct.utils.load_spec(str(path)).description
    fields = lambda xs: [(x.name, x.type.WhichOneof("Type"), str(x.type).replace("\n", " ")) for x in xs]  # noqa: E731
    return {fn.name: (fields(fn.input), fields(fn.output), fields(fn.state)) for fn in desc.functions} or \
        {"main": (fields(desc.input), fields(desc.output), fields(desc.state))}


def op_counts(path: Path) -> dict[str, int]:
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    counts: dict[str, int] = {}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                counts[op.type] = counts.get(op.type, 0) + 1
    return counts


@dataclass(frozen=True)
class Part:
    """One part as both routes build it: ``build``'s arguments, the LUTs
    (scope -> bits) and the functions (name -> arguments of ``function``)."""

    arch: str
    part: dict
    luts: dict
    function: Callable
    variants: dict

    @property
    def stateful(self) -> bool:
        return self.function in (export.chunk_function, export.monolithic_function)


CHUNK = {export.INFER: {"prefill": False}, export.PREFILL: {"prefill": True}}
HEAD = {export.LOGITS: {"argmax": False}, export.ARGMAX: {"argmax": True}}
ALL_LUTS = {export.EMBEDDINGS_SCOPE: 8, export.LAYERS_SCOPE: BITS, export.HEAD_SCOPE: 6}


def frontend(lm, shapes: export.Shapes, part: Part, out: Path) -> Path:
    """``part`` through the torch frontend: its torch weights k-means
    quantized in place (lut.quantize_module), each function exported and,
    when there are several, combined, as the pipeline did before the direct
    route."""
    scopes = {export.EMBEDDINGS_SCOPE: (lambda: lm.model.embed_tokens, nn.Embedding, "gather"),
              export.LAYERS_SCOPE: (lambda: lm.model.layers, nn.Conv2d, "conv"),
              export.HEAD_SCOPE: (lambda: lm.lm_head, nn.Conv2d, "conv")}
    tables = []
    for scope, bits in part.luts.items():
        module, kind, op_type = scopes[scope]
        if module() is not None and lut.quantize_module(module(), bits, GROUP, kind):
            tables.append(export.Lut(bits, GROUP, op_type, scope))
    paths = {}
    for name, kw in part.variants.items():
        paths[name] = out / f"frontend.{name}.mlpackage"
        export._export(lm, shapes, part.function, tables, **kw).save(str(paths[name]))
    made = out / "frontend.mlpackage"
    if len(paths) == 1:
        paths.popitem()[1].rename(made)
    else:
        export.combine(paths, made, {"k": "v"}, "frontend")
    return made


def both_routes(folder: Path, out: Path, part: Part) -> dict[str, Path]:
    """``part`` exported by each route."""
    source = HFSource.open(folder)
    module = ARCHITECTURES[part.arch]
    args = module.model_args(source.config)
    shapes = export.Shapes(args.hidden_size, CTX, BATCH)
    window = sliding_window(source.config, CTX)
    ring = None if window is None else ring_size(window, BATCH, CTX)
    lm = build(part.arch, args, context_length=CTX, ring=ring, **part.part)
    lm.load_weights(source.get)
    made = {"frontend": frontend(lm, shapes, part, out), "direct": out / "direct.mlpackage"}
    direct = program.DirectPart(part.arch, args, CTX, source.get, ring=ring, **part.part)
    direct.read({scope: (bits, GROUP) for scope, bits in part.luts.items()})
    direct.export(part.function, shapes, part.variants).save(str(made["direct"]))
    source.close()
    return made


def step_inputs(path: Path, function: str, start: int, seq: int) -> dict[str, np.ndarray]:
    """The inputs after hidden_states of ``function`` for ``seq`` tokens from
    ``start``: masks causal over the context or over the ring's slots."""
    import coremltools as ct
    import torch

    desc = ct.utils.load_spec(str(path)).description
    (fn,) = [f for f in desc.functions if f.name == function]
    shapes = {x.name: tuple(x.type.multiArrayType.shape) for x in fn.input}
    positions = torch.arange(start, start + seq, dtype=torch.int32)
    slots = shapes.get("local_mask", (CTX,))[-1]
    out = {"position_ids": positions.numpy()}
    for name, shape in shapes.items():
        if name in ("causal_mask", "local_mask"):
            out[name] = causal_mask(positions % shape[-1], shape[-1], torch.float16).numpy()
        elif name == "current_pos":
            out[name] = np.array([start], np.int32)
        elif name == "ring_pos":
            out[name] = np.array([start % slots], np.int32)
    return out


def run(path: Path, part: Part, config: dict, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every output of a few calls, and the final caches: a stateful part
    runs a prefill of BATCH rows, then two infer steps; embeddings one
    token, then BATCH; a head each function once."""
    from anemlld.runtime.portable import PortableModel

    model = PortableModel(path, device="cpu")
    state = model.make_state()
    rng = np.random.default_rng(seed)
    hidden = lambda seq: rng.standard_normal((1, seq, config["hidden_size"])).astype(np.float16)  # noqa: E731
    ids = lambda seq: rng.integers(0, config["vocab_size"], (1, seq)).astype(np.int32)  # noqa: E731
    if part.stateful:
        first = "input_ids" if part.function is export.monolithic_function else "hidden_states"
        calls = [(fn, {first: (ids if first == "input_ids" else hidden)(seq), **step_inputs(path, fn, start, seq)})
                 for fn, start, seq in (("prefill", 0, BATCH), ("infer", BATCH, 1), ("infer", BATCH + 1, 1))]
    elif part.function is export.embeddings_function:
        calls = [(None, {"input_ids": ids(1)}), (None, {"input_ids": ids(BATCH)})]
    else:
        calls = [(fn if len(part.variants) > 1 else None, {"hidden_states": hidden(1)}) for fn in part.variants]
    outs = []
    for fn, inputs in calls:
        result = model.predict(inputs, state, fn)
        outs += [result[k] for k in sorted(result)]
    return outs, [state[k].float().numpy() for k in sorted(state)]


def parts() -> dict[str, Part]:
    """Per architecture, a chunk of the last layer (the final norm included)
    with a 4-bit LUT; Llama also its first chunk without a LUT. Llama's
    embeddings, LM head (both functions, or logits only) and monolithic
    model with a LUT on each part; without LUTs, Gemma 3's (embeddings
    folded, a head tied to them, ring caches) and Qwen2's monolithic model
    (traced in fp32 for its biases)."""
    out = {}
    for arch in ARCHS:
        layers = TINY[arch]["num_hidden_layers"]
        out[arch] = Part(arch, dict(layers=range(layers - 1, layers), embeddings=False, lm_head=False),
                         {export.LAYERS_SCOPE: BITS}, export.chunk_function, CHUNK)
    out["llama-fp16"] = Part("llama", dict(layers=range(0, 1), embeddings=False, lm_head=False), {},
                             export.chunk_function, CHUNK)
    ends = dict(layers=range(0), embeddings=False, lm_head=False)
    for arch, luts in (("llama", ALL_LUTS), ("gemma3", {})):
        out[f"{arch}-embeddings"] = Part(arch, {**ends, "embeddings": True}, luts, export.embeddings_function,
                                         {"main": {}})
        out[f"{arch}-head"] = Part(arch, {**ends, "lm_head": True, "lm_head_split": 4}, luts,
                                   export.head_function, HEAD)
    out["llama-head-logits"] = Part("llama", {**ends, "lm_head": True, "lm_head_split": 4}, ALL_LUTS,
                                    export.head_function, {"main": {}})
    for arch, luts in (("llama", ALL_LUTS), ("gemma3", {}), ("qwen2", {})):
        out[f"{arch}-monolithic"] = Part(arch, {"lm_head_split": 4}, luts, export.monolithic_function, CHUNK)
    return out


PARTS = parts()
CASES = tuple(PARTS)


@pytest.fixture(scope="module")
def made(tiny_models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    return {case: both_routes(tiny_models[part.arch], tmp_path_factory.mktemp(case), part)
            for case, part in PARTS.items()}


@pytest.mark.parametrize("case", CASES)
def test_direct_part_has_the_frontends_interface_and_ops(case, made):
    made = made[case]
    assert interface(made["direct"]) == interface(made["frontend"])
    # the frontend's Gemma 3 program keeps 4 identity ops (they compute
    # nothing) that the direct one does not have; every other op matches
    ours, theirs = op_counts(made["direct"]), op_counts(made["frontend"])
    theirs.pop("identity", None)
    assert "identity" not in ours and ours == theirs


@pytest.mark.parametrize("case", CASES)
def test_direct_part_computes_what_the_frontends_does(case, made, tiny_models):
    part, made = PARTS[case], made[case]
    config = HFSource.open(tiny_models[part.arch]).config
    ours, cache = run(made["direct"], part, config, seed=1)
    theirs, their_cache = run(made["frontend"], part, config, seed=1)
    assert len(cache) == len(their_cache) and (not part.stateful or any(np.abs(c).max() > 0 for c in cache))
    for a, b in zip(cache, their_cache):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and np.isfinite(a).all() and np.abs(a).max() > 0
        if a.dtype.kind == "i":  # the argmax heads' indices
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=0, atol=2e-2)


@pytest.mark.parametrize("case", CASES)
def test_direct_part_stores_what_the_frontends_stores(case, made):
    def size(p: Path, pattern: str) -> int:
        return sum(f.stat().st_size for f in p.rglob(pattern) if f.is_file())

    made = made[case]
    assert size(made["direct"], "weight.bin") == size(made["frontend"], "weight.bin")
    assert size(made["direct"], "*") <= 1.01 * size(made["frontend"], "*")
