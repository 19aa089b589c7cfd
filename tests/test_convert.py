"""Whole conversions of tiny models of each architecture, inspected through
coremltools' own spec reader, plus resuming and re-running."""
from __future__ import annotations

import json
from pathlib import Path
import numpy as np

import pytest
import yaml

from anemlld import layout
from anemlld.convert import export, pipeline, program, spill
from anemlld.convert.models import ARCHITECTURES
from shared.options import ConvertOptions
from tests.conftest import ARCHS, TINY

CTX, BATCH = 64, 16
OPTIONS = dict(context_length=CTX, batch_size=BATCH, chunks=2, lut_embeddings=8, lut_ffn=4, lut_lm_head=6)
STATE = "model_model_kv_cache_0"  # coremltools turns the buffer's dots into underscores


def spec_of(path: Path):
    import coremltools as ct

    return ct.utils.load_spec(str(path))


def op_types(spec, function: str) -> list[str]:
    fn = spec.mlProgram.functions[function]
    return [op.type for block in fn.block_specializations.values() for op in block.operations]


def array_shape(feature) -> tuple[int, ...]:
    return tuple(feature.type.multiArrayType.shape)


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory) -> dict[str, tuple[Path, list]]:
    out = {}
    for arch in ARCHS:
        events: list[pipeline.Progress] = []
        dest = tmp_path_factory.mktemp("out") / f"{arch}-ane"
        pipeline.convert(tiny_models[arch], dest, ConvertOptions.from_mapping(OPTIONS), progress=events.append)
        out[arch] = (dest, events)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_conversion_writes_the_anemll_layout(arch, converted):
    dest, _ = converted[arch]
    prefix = ARCHITECTURES[arch].PREFIX
    meta = yaml.safe_load((dest / "meta.yaml").read_text())["model_info"]
    p = meta["parameters"]
    assert meta["architecture"] == arch
    assert p["context_length"] == CTX and p["batch_size"] == BATCH and p["num_chunks"] == 2
    assert (p["lut_embeddings"], p["lut_ffn"], p["lut_lmhead"]) == (8, 4, 6)
    assert p["embeddings"] == f"{prefix}_embeddings_lut8.mlpackage"
    assert p["lm_head"] == f"{prefix}_lm_head_lut6.mlpackage"
    assert p["ffn"] == f"{prefix}_FFN_PF_lut4.mlpackage"
    assert p["split_lm_head"] == (8 if arch == "llama" else 16)
    assert p.get("sliding_window") == TINY[arch].get("sliding_window")  # Mistral's window of 4, else none
    assert sum(p["lm_head_chunk_sizes"]) == p["vocab_size"] == 4096
    for name in (p["embeddings"], p["lm_head"], f"{prefix}_FFN_PF_lut4_chunk_01of02.mlpackage",
                 f"{prefix}_FFN_PF_lut4_chunk_02of02.mlpackage", "tokenizer.json", "tokenizer_config.json",
                 "config.json", "anemlld.json"):
        assert (dest / name).exists(), name
    # the runtime-side reader resolves the same files
    lay = layout.read_meta(dest)
    assert [c.name for c in lay.chunks()] == [f"{prefix}_FFN_PF_lut4_chunk_0{i}of02.mlpackage" for i in (1, 2)]
    # nothing temporary left beside the output
    assert sorted(x.name for x in dest.parent.iterdir()) == [dest.name]


@pytest.mark.parametrize("arch", ARCHS)
def test_chunks_carry_infer_and_prefill_over_one_kv_state(arch, converted):
    dest, _ = converted[arch]
    cfg = TINY[arch]
    hidden, layers, kv_heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim", hidden // cfg["num_attention_heads"])
    chunks = layout.read_meta(dest).chunks()
    for i, chunk in enumerate(chunks):
        spec = spec_of(chunk)
        desc = spec.description
        assert [f.name for f in desc.functions] == ["infer", "prefill"]
        assert desc.defaultFunctionName == "infer"
        for fn in desc.functions:
            seq = 1 if fn.name == "infer" else BATCH
            inputs = {x.name: array_shape(x) for x in fn.input}
            want = {"hidden_states": (1, seq, hidden), "position_ids": (seq,),
                    "causal_mask": (1, 1, seq, CTX), "current_pos": (1,)}
            # Windows of 4 keep their layers in a ring of 2 batches: every layer's
            # (Mistral) or those layer_types names sliding (Gemma 3, beside a full cache).
            kinds = cfg.get("layer_types") or ["sliding_attention"] * layers
            local = kinds.count("sliding_attention") if cfg.get("sliding_window") else 0
            states = {STATE: (2 * layers, kv_heads, CTX, head_dim)}
            if local:
                want.update(local_mask=(1, 1, seq, 2 * BATCH), ring_pos=(1,))
                states = {"model_model_kv_cache_local": (2 * local, kv_heads, 2 * BATCH, head_dim)}
                if local < layers:
                    states["model_model_kv_cache_global"] = (2 * (layers - local), kv_heads, CTX, head_dim)
                else:
                    del want["causal_mask"], want["current_pos"]
            assert inputs == want
            assert [o.name for o in fn.output] == ["output_hidden_states"]
            assert {x.name: tuple(x.type.stateType.arrayType.shape) for x in fn.state} == states
            assert {x.type.stateType.arrayType.dataType for x in fn.state} == {65552}  # FLOAT16
            ops = op_types(spec, fn.name)
            # every projection weight is a 4-bit LUT: one lut_to_dense per conv
            assert ops.count("constexpr_lut_to_dense") == ops.count("conv") > 0
            # coreml_update_state is serialized as write_state (+ read_state)
            assert "read_state" in ops and "write_state" in ops
        meta = dict(desc.metadata.userDefined)
        assert meta["com.anemll.context_length"] == str(CTX)
        assert meta["com.anemll.num_chunks"] == "2"
        assert meta["com.anemll.chunk_no"] == str(i + 1)
        assert meta["com.anemll.batch_size"] == str(BATCH)
        assert meta["com.anemll.lut_bits"] == "4"
        assert meta["com.anemll.functions"] == "infer,prefill"
        assert desc.metadata.author.startswith("anemlld ") and desc.metadata.versionString


@pytest.mark.parametrize("arch", ARCHS)
def test_embeddings_and_split_head_have_the_reference_interfaces(arch, converted):
    dest, _ = converted[arch]
    hidden = TINY[arch]["hidden_size"]
    lay = layout.read_meta(dest)
    emb = spec_of(lay.part("embeddings"))
    (ids,) = emb.description.input
    assert ids.name == "input_ids"
    shapes = {tuple(s.shape) for s in ids.type.multiArrayType.enumeratedShapes.shapes}
    assert shapes == {(1, 1), (1, BATCH)}
    assert [o.name for o in emb.description.output] == ["hidden_states"]
    assert "constexpr_lut_to_dense" in op_types(emb, "main")

    head = spec_of(lay.part("lm_head"))
    (h,) = head.description.input
    assert (h.name, array_shape(h)) == ("hidden_states", (1, 1, hidden))
    k = lay.split_lm_head
    assert [o.name for o in head.description.output] == [f"logits{i}" for i in range(1, k + 1)]
    ops = op_types(head, "main")
    assert ops.count("constexpr_lut_to_dense") == ops.count("conv") == k
    assert dict(head.description.metadata.userDefined)["com.anemll.lut_bits"] == "6"


def test_uneven_layer_counts_are_balanced_never_dropped(converted):
    dest, _ = converted["llama"]  # 3 layers in 2 chunks
    manifest = json.loads((dest / "anemlld.json").read_text())
    assert manifest["chunks"] == [[0, 2], [2, 3]]
    for layers in range(1, 13):
        for n in range(1, layers + 1):
            ranges = pipeline.split_layers(layers, n)
            assert [i for r in ranges for i in r] == list(range(layers))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_auto_chunks_pick_the_fewest_under_the_size_limit(tiny_models):
    from anemlld.convert.models import ARCHITECTURES
    from anemlld.convert.source import HFSource

    args = ARCHITECTURES["llama"].model_args(HFSource.open(tiny_models["llama"]).config)
    one_layer = pipeline.chunk_bytes(args, 1, 4)
    big = ConvertOptions.from_mapping({"chunks": "auto", "max_chunk_mb": 1})
    assert pipeline.choose_chunks(args, big) == 1
    # a limit that admits two layers but not three -> two chunks (2 + 1 layers)
    limit = ConvertOptions(chunks="auto", max_chunk_mb=1)
    object.__setattr__(limit, "max_chunk_mb", (2 * one_layer + 1) / pipeline.MB)
    assert pipeline.choose_chunks(args, limit) == 2


def test_progress_reports_every_stage_in_order(converted):
    _, events = converted["qwen3"]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = [e.stage for e in events]
    for stage in ("inspect", "export", "quantize", "compile", "publish", "done"):
        assert stage in stages
    compile_note = next(e.message for e in events if e.stage == "compile")
    assert "macOS" in compile_note or compile_note == ""
    quantized = [e.part for e in events if e.stage == "quantize"]
    # each part's weights are clustered once, whichever functions use them
    assert sorted(quantized) == sorted(set(quantized))
    assert "qwen_FFN_PF_lut4_chunk_02of02" in quantized
    exported = [e.part for e in events if e.stage == "export"]
    # a chunk's two functions are exported together, once
    assert exported.count("qwen_FFN_PF_lut4_chunk_02of02") == 1


def test_interrupted_conversion_resumes_without_redoing_finished_parts(tiny_models, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    opts = ConvertOptions.from_mapping({**OPTIONS, "lut_embeddings": "none", "lut_ffn": "none", "lut_lm_head": "none"})

    real = program.DirectPart.export

    def crash_in_the_head(self, function, *a, **k):
        if function is export.head_function:
            raise KeyboardInterrupt  # as if killed while exporting the head
        return real(self, function, *a, **k)

    monkeypatch.setattr(program.DirectPart, "export", crash_in_the_head)
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(tiny_models["qwen2"], dest, opts)
    assert not dest.exists()  # nothing that looks finished
    work = tmp_path / ".out.partial"
    assert (work / "qwen_FFN_PF_chunk_02of02.mlpackage").exists()
    assert not list(work.glob(f"{spill.PREFIX}*"))  # the head's spilled weights went with it
    (work / f"{spill.PREFIX}killed.spill").write_bytes(b"as a kill -9 leaves it")
    monkeypatch.undo()

    exported = []
    monkeypatch.setattr(program.DirectPart, "export",
                        lambda self, function, *a, **k: exported.append(function) or real(self, function, *a, **k))
    result = pipeline.convert(tiny_models["qwen2"], dest, opts)
    assert exported == [export.head_function]  # the embeddings and both chunks came from the first run
    assert not result.reused and (dest / "qwen_lm_head.mlpackage").exists()
    assert not work.exists() and not list(dest.glob(f"{spill.PREFIX}*"))

    again = pipeline.convert(tiny_models["qwen2"], dest, opts)
    assert again.reused  # same inputs and options: nothing to do
    other = pipeline.convert(tiny_models["qwen2"], dest, ConvertOptions.from_mapping({**OPTIONS, "lut_ffn": "none",
                                                                                       "lut_embeddings": "none"}))
    assert not other.reused and (dest / "qwen_lm_head_lut6.mlpackage").exists()
    assert not (dest / "qwen_lm_head.mlpackage").exists()


def test_combined_chunk_stores_shared_weights_once(tmp_path):
    """infer + prefill in one package costs no more than 5% over one function
    (the program text; the LUT weights are byte-identical and stored once).
    Shaped like a real layer (wide MLP) so weights dominate as they do in real models."""
    from anemlld.convert.models import build
    from anemlld.convert.models.base import ModelArgs

    args = ModelArgs(hidden_size=512, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=8,
                     num_key_value_heads=8, head_dim=64, vocab_size=256, rms_norm_eps=1e-5, rope_theta=1e4,
                     rope_scaling=None, tie_word_embeddings=True)
    from torch import nn

    from anemlld.convert import lut

    lm = build("llama", args, layers=range(1), embeddings=False, lm_head=False, context_length=CTX)
    shapes = export.Shapes(512, CTX, BATCH)
    lut.quantize_module(lm, 4, 16, nn.Conv2d)
    paths = {}
    for fn, prefill in (("infer", False), ("prefill", True)):
        model = export.export_chunk(lm, shapes, prefill, export.Lut(4, 16, "conv"))
        paths[fn] = tmp_path / f"{fn}.mlpackage"
        model.save(str(paths[fn]))
    combined = tmp_path / "chunk.mlpackage"
    export.combine(paths, combined, {"k": "v"}, "test")

    def size(p: Path, pattern: str = "*") -> int:
        return sum(f.stat().st_size for f in p.rglob(pattern) if f.is_file())

    assert size(combined, "weight.bin") == size(paths["infer"], "weight.bin")
    ratio = size(combined) / size(paths["infer"])
    assert ratio <= 1.05, ratio


def test_fp16_overflow_test_answers_as_coremltools_does():
    """Our replacement of coremltools' fp16 overflow check against its own
    formula, on the cases it is there for."""
    from anemlld.convert.export import overflows_fp16

    def theirs(v):
        a = np.abs(np.expand_dims(v, 0))
        return bool(np.max(a[np.where(a < 1e38)], initial=0.0) > 65504)

    rng = np.random.default_rng(0)
    cases = [rng.normal(0, 0.02, (64, 64)).astype(np.float32), np.array([65504.0, -65504.0], np.float32),
             np.array([70000.0], np.float32), np.array([-70000.0, 1.0], np.float32),
             np.array([-np.inf, 0.0, 1.0], np.float32), np.array([-3e38, 2.0], np.float32),
             np.array([np.nan, 1.0], np.float32), np.array([np.nan, 1e5], np.float32),
             np.array([-1e38, 1e5], np.float32), np.float32(3.0), np.float32(1e6), np.zeros(0, np.float32)]
    for v in cases:
        assert overflows_fp16(v) == theirs(v), v


def test_the_converter_installs_its_overflow_check_into_coremltools():
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    export._ct()
    assert FP16ComputePrecision.fp16_overflow is export.fp16_overflow
