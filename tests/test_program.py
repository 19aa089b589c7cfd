"""FFN chunks built with lifted weights (anemlld/convert/program.py) against
the torch frontend's (export.export_chunk): the same interface, and the same
outputs and cache through the portable executor, on every architecture."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from anemlld.convert import export, lut, program
from anemlld.convert.models import ARCHITECTURES, build
from anemlld.convert.models.base import causal_mask, ring_size, sliding_window
from anemlld.convert.source import HFSource
from tests.conftest import ARCHS

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


def both_routes(arch: str, folder: Path, out: Path, bits: int | None, layers: range) -> dict[str, Path]:
    """The chunk of ``layers`` exported by each route, infer and prefill
    combined (the frontend's by ``export.combine``, as the pipeline did)."""
    source = HFSource.open(folder)
    module = ARCHITECTURES[arch]
    args = module.model_args(source.config)
    shapes = export.Shapes(args.hidden_size, CTX, BATCH)
    window = sliding_window(source.config, CTX)
    ring = None if window is None else ring_size(window, BATCH, CTX)
    lm = build(arch, args, layers=layers, embeddings=False, lm_head=False, context_length=CTX, ring=ring)
    lm.load_weights(source.get)
    table = None
    if bits is not None:
        lut.quantize_module(lm, bits, GROUP, nn.Conv2d)
        table = export.Lut(bits, GROUP, "conv")
    direct = program.DirectChunk(arch, args, layers, CTX, source.get, ring=ring)
    direct.read(bits, GROUP)
    made = {"frontend": out / "frontend.mlpackage", "direct": out / "direct.mlpackage"}
    paths = {}
    for name, prefill in ((export.INFER, False), (export.PREFILL, True)):
        paths[name] = out / f"frontend.{name}.mlpackage"
        export.export_chunk(lm, shapes, prefill, table).save(str(paths[name]))
    export.combine(paths, made["frontend"], {"k": "v"}, "frontend")
    direct.export_combined(shapes).save(str(made["direct"]))
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


def run(path: Path, hidden: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A prefill of BATCH rows, then two infer steps; outputs and final caches."""
    from anemlld.runtime.portable import PortableModel

    model = PortableModel(path, device="cpu")
    state = model.make_state()
    rng = np.random.default_rng(seed)
    outs = []
    for function, start, seq in (("prefill", 0, BATCH), ("infer", BATCH, 1), ("infer", BATCH + 1, 1)):
        inputs = {"hidden_states": rng.standard_normal((1, seq, hidden)).astype(np.float16),
                  **step_inputs(path, function, start, seq)}
        outs.append(model.predict(inputs, state, function)["output_hidden_states"])
    return outs, [state[k].float().numpy() for k in sorted(state)]


@pytest.fixture(scope="module")
def chunks(tiny_models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per architecture, a chunk of the last layer (the final norm included) with a 4-bit
    LUT; Llama also its first chunk without a LUT."""
    out = {}
    for arch in ARCHS:
        folder = tiny_models[arch]
        layers = HFSource.open(folder).config["num_hidden_layers"]
        out[arch] = both_routes(arch, folder, tmp_path_factory.mktemp(arch), BITS, range(layers - 1, layers))
    out["llama-fp16"] = both_routes("llama", tiny_models["llama"], tmp_path_factory.mktemp("fp16"), None, range(0, 1))
    return out


CASES = ARCHS + ("llama-fp16",)


@pytest.mark.parametrize("case", CASES)
def test_direct_chunk_has_the_frontends_interface_and_ops(case, chunks):
    made = chunks[case]
    assert interface(made["direct"]) == interface(made["frontend"])
    # the frontend's Gemma 3 program keeps 4 identity ops (they compute
    # nothing) that the direct one does not have; every other op matches
    ours, theirs = op_counts(made["direct"]), op_counts(made["frontend"])
    theirs.pop("identity", None)
    assert "identity" not in ours and ours == theirs


@pytest.mark.parametrize("case", CASES)
def test_direct_chunk_computes_what_the_frontends_does(case, chunks, tiny_models):
    made = chunks[case]
    hidden = HFSource.open(tiny_models[case.split("-")[0]]).config["hidden_size"]
    ours, cache = run(made["direct"], hidden, seed=1)
    theirs, their_cache = run(made["frontend"], hidden, seed=1)
    assert len(cache) == len(their_cache) and any(np.abs(c).max() > 0 for c in cache)
    for a, b in zip(cache, their_cache):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3)
    for a, b in zip(ours, theirs):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=0, atol=2e-2)


@pytest.mark.parametrize("case", CASES)
def test_direct_chunk_stores_what_the_frontends_stores(case, chunks):
    def size(p: Path, pattern: str) -> int:
        return sum(f.stat().st_size for f in p.rglob(pattern) if f.is_file())

    made = chunks[case]
    assert size(made["direct"], "weight.bin") == size(made["frontend"], "weight.bin")
    assert size(made["direct"], "*") <= 1.01 * size(made["frontend"], "*")
