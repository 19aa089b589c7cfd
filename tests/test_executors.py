"""Executor selection, argument building and the Core ML path. Core ML cannot
predict on Linux, so the Core ML executor is driven here through stand-ins for
``MLModel``/``CompiledMLModel`` that record how they were called and compute
with the portable executor: the executor's own logic runs for real."""
from __future__ import annotations

import platform

import numpy as np
import pytest

from anemlld.layout import read_meta
from anemlld.runtime import executors
from anemlld.runtime.engine import Engine
from anemlld.runtime.sampling import SamplingParams
from shared.errors import AnemllError


def test_auto_picks_portable_off_macos_and_unknown_names_are_refused():
    if platform.system() != "Darwin":
        assert executors.choose("auto") == "portable"
        assert "macOS" in executors.coreml_unavailable()
    assert executors.choose("portable") == "portable"
    with pytest.raises(AnemllError, match="unknown executor"):
        executors.choose("gpu")


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML is available on macOS")
def test_coreml_executor_says_why_it_cannot_run_here(tiny_converted):
    with pytest.raises(AnemllError) as info:
        executors.CoreMLExecutor(read_meta(tiny_converted))
    assert "macOS" in info.value.message and "portable" in info.value.hint


def test_ffn_arguments_have_the_names_dtypes_and_shapes_of_the_packages():
    mask = np.zeros((1, 1, 4, 64), dtype=np.float32)
    step = {"position_ids": np.arange(3, 7), "causal_mask": mask, "current_pos": np.array([3]),
            "local_mask": mask[..., :12], "ring_pos": np.array([3])}
    args = executors._ffn_inputs(np.zeros((1, 4, 8), np.float16), step)
    assert set(args) == {"hidden_states", "position_ids", "causal_mask", "current_pos", "local_mask", "ring_pos"}
    assert args["position_ids"].dtype == np.int32 and args["causal_mask"].dtype == np.float16
    assert args["local_mask"].dtype == np.float16 and args["local_mask"].shape == (1, 1, 4, 12)
    assert args["current_pos"].tolist() == [3] and args["current_pos"].dtype == np.int32
    assert args["ring_pos"].dtype == np.int32


@pytest.fixture(scope="module")
def tiny_converted(tiny_models, tmp_path_factory):
    from anemlld.convert import pipeline
    from shared.options import ConvertOptions

    out = tmp_path_factory.mktemp("ex") / "tiny"
    opts = ConvertOptions.from_mapping({"context_length": 64, "batch_size": 16, "chunks": 2,
                                        "lut_ffn": 4, "lut_lm_head": 6})
    pipeline.convert(tiny_models["qwen3"], out, opts)
    return out


class FakeCoreML:
    """Stands in for coremltools' model classes: records the arguments and
    predicts with the portable executor."""

    calls: list[tuple[str, str, str | None, object]] = []

    def __init__(self, kind: str, real):
        self.kind, self.real = kind, real

    def __call__(self, path, compute_units=None, function_name=None, **kw):
        from anemlld.runtime.portable import PortableModel

        if kw.get("skip_model_load"):  # the portable executor reading the package itself
            return self.real(path, **kw)

        FakeCoreML.calls.append((self.kind, path, function_name, compute_units))
        model = PortableModel(path)
        fn = function_name

        class Loaded:
            def predict(self, inputs, state=None):
                return model.predict(inputs, state, fn)

            def make_state(self):
                return model.make_state()

        return Loaded()


def test_coreml_executor_loads_each_function_shares_one_state_and_matches_portable(tiny_converted, monkeypatch):
    import coremltools as ct

    monkeypatch.setattr(executors, "coreml_unavailable", lambda: None)
    monkeypatch.setattr(ct.models, "MLModel", FakeCoreML("MLModel", ct.models.MLModel))
    monkeypatch.setattr(ct.models, "CompiledMLModel", FakeCoreML("CompiledMLModel", ct.models.CompiledMLModel))
    FakeCoreML.calls.clear()
    coreml = Engine(tiny_converted, executor="coreml")
    assert coreml.executor.name == "coreml"
    chunk_calls = [c for c in FakeCoreML.calls if "FFN" in c[1]]
    assert sorted((c[1].rsplit("/", 1)[-1], c[2]) for c in chunk_calls) == sorted(
        (f"qwen_FFN_PF_lut4_chunk_0{i}of02.mlpackage", fn) for i in (1, 2) for fn in ("infer", "prefill"))
    assert all(c[0] == "MLModel" and c[3] == ct.ComputeUnit.CPU_AND_NE for c in FakeCoreML.calls)
    portable = Engine(tiny_converted, executor="portable")
    prompt = "The shell reads a line of input and splits it into words before it looks up the command"
    params = SamplingParams(max_tokens=12)
    a, b = coreml.complete(prompt=prompt, params=params), portable.complete(prompt=prompt, params=params)
    assert a.token_ids == b.token_ids and a.stats.prefill_tokens == b.stats.prefill_tokens


def test_compiled_models_load_through_compiled_mlmodel(tiny_converted, tmp_path, monkeypatch):
    import coremltools as ct

    seen = []

    def compiled(path, compute_units=None, function_name=None):
        seen.append((path, function_name))
        raise RuntimeError("stop here")

    monkeypatch.setattr(executors, "coreml_unavailable", lambda: None)
    monkeypatch.setattr(ct.models, "CompiledMLModel", compiled)
    ex = object.__new__(executors.CoreMLExecutor)
    ex._units = ct.ComputeUnit.CPU_AND_NE
    with pytest.raises(RuntimeError):
        ex._load(tmp_path / "llama_FFN_PF_lut4_chunk_01of02.mlmodelc", "prefill")
    assert seen == [(str(tmp_path / "llama_FFN_PF_lut4_chunk_01of02.mlmodelc"), "prefill")]
