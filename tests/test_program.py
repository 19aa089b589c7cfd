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
from anemlld.convert.models.base import causal_mask
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
    shapes = export.Shapes(args.hidden_size, CTX, BATCH,
                           (2 * args.num_hidden_layers, args.num_key_value_heads, CTX, args.head_dim))
    lm = build(arch, args, layers=layers, embeddings=False, lm_head=False, context_length=CTX)
    lm.load_weights(source.get)
    table = None
    if bits is not None:
        lut.quantize_module(lm, bits, GROUP, nn.Conv2d)
        table = export.Lut(bits, GROUP, "conv")
    direct = program.DirectChunk(arch, args, layers, CTX, source.get)
    direct.read(bits, GROUP)
    made = {"frontend": out / "frontend.mlpackage", "direct": out / "direct.mlpackage"}
    paths = {}
    for name, prefill in ((export.INFER, False), (export.PREFILL, True)):
        paths[name] = out / f"frontend.{name}.mlpackage"
        export.export_chunk(lm, shapes, prefill, table).save(str(paths[name]))
    export.combine(paths[export.INFER], paths[export.PREFILL], made["frontend"], {"k": "v"}, "frontend")
    direct.export_combined(shapes).save(str(made["direct"]))
    source.close()
    return made


def run(path: Path, hidden: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """A prefill of BATCH rows, then two infer steps; outputs and final cache."""
    from anemlld.runtime.portable import PortableModel

    model = PortableModel(path, device="cpu")
    state = model.make_state()
    rng = np.random.default_rng(seed)
    import torch

    outs = []
    positions = torch.arange(BATCH, dtype=torch.int32)
    outs.append(model.predict({"hidden_states": rng.standard_normal((1, BATCH, hidden)).astype(np.float16),
                               "position_ids": positions.numpy(),
                               "causal_mask": causal_mask(positions, CTX, torch.float16).numpy(),
                               "current_pos": np.array([0], np.int32)}, state, "prefill")["output_hidden_states"])
    for pos in (BATCH, BATCH + 1):
        p = torch.tensor([pos], dtype=torch.int32)
        outs.append(model.predict({"hidden_states": rng.standard_normal((1, 1, hidden)).astype(np.float16),
                                   "position_ids": p.numpy(), "causal_mask": causal_mask(p, CTX, torch.float16).numpy(),
                                   "current_pos": np.array([pos], np.int32)}, state, "infer")["output_hidden_states"])
    (cache,) = state.values()
    return outs, cache.float().numpy()


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
    assert op_counts(made["direct"]) == op_counts(made["frontend"])


@pytest.mark.parametrize("case", CASES)
def test_direct_chunk_computes_what_the_frontends_does(case, chunks, tiny_models):
    made = chunks[case]
    hidden = HFSource.open(tiny_models[case.split("-")[0]]).config["hidden_size"]
    ours, cache = run(made["direct"], hidden, seed=1)
    theirs, their_cache = run(made["frontend"], hidden, seed=1)
    assert np.abs(cache).max() > 0
    np.testing.assert_allclose(cache, their_cache, rtol=0, atol=2e-3)
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
