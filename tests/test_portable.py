"""The portable executor runs saved Core ML packages on Linux with the
numbers Core ML would give (within fp16 tolerance)."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anemlld.runtime import portable
from anemlld.runtime.portable import PortableModel, blockwise_shift_scale, lut_to_dense
from shared.errors import AnemllError

logging.getLogger("coremltools").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

FP16 = dict(rtol=2e-2, atol=2e-2)


def convert(module: nn.Module, example: tuple, inputs: list, outputs: list, states: list | None = None):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
        kw = dict(states=states) if states else {}
        return ct.convert(traced, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                          minimum_deployment_target=ct.target.iOS18,
                          compute_precision=ct.precision.FLOAT16, skip_model_load=True, **kw)


def save(mlmodel, path) -> str:
    mlmodel.save(str(path))
    return str(path)


# --- a conv / layer_norm / silu / matmul / softmax block -----------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(16, 32, 1)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 24)

    def forward(self, x):  # (1, 16, 1, S), the channels-first layout of the ANE models
        h = self.proj(x).squeeze(2).transpose(1, 2)  # (1, S, 32)
        h = F.silu(self.norm(h))
        weights = torch.softmax(torch.matmul(h, h.transpose(1, 2)) * 0.2, dim=-1)
        return self.out(torch.matmul(weights, h))


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    torch.manual_seed(0)
    # Traced in fp32: coremltools 8.3 mixes dtypes on a biased fp16 conv. The
    # program is fp16 all the same (compute_precision).
    module = Block()
    x = torch.randn(1, 16, 1, 8)
    ml = convert(module, (x,), [ct.TensorType(name="x", shape=x.shape, dtype=np.float16)],
                 [ct.TensorType(name="y", dtype=np.float16)])
    return module, save(ml, tmp_path_factory.mktemp("block") / "block.mlpackage")


def test_block_of_conv_norm_silu_matmul_softmax_matches_torch(block):
    module, path = block
    model = PortableModel(path, device="cpu")
    assert {"conv", "layer_norm", "silu", "matmul", "softmax"} <= set(model.op_types())
    x = torch.randn(1, 16, 1, 8, dtype=torch.float16)
    out = model.predict({"x": x.numpy()})["y"]
    ref = module(x.float()).detach().numpy()
    assert out.dtype == np.float16 and out.shape == ref.shape
    np.testing.assert_allclose(out.astype(np.float32), ref, **FP16)


def test_unknown_op_is_refused_at_load_naming_the_op(block, monkeypatch):
    monkeypatch.delitem(portable.registry.BUILDERS, "softmax")
    with pytest.raises(AnemllError, match="'softmax'.*not implemented by the portable executor"):
        PortableModel(block[1], device="cpu")


def test_inputs_are_validated_by_name_and_shape(block):
    model = PortableModel(block[1], device="cpu")
    x = np.zeros((1, 16, 1, 8), np.float16)
    with pytest.raises(AnemllError, match="missing x"):
        model.predict({})
    with pytest.raises(AnemllError, match="unexpected extra"):
        model.predict({"x": x, "extra": x})
    with pytest.raises(AnemllError, match=r"shape \(1, 16, 1, 4\)"):
        model.predict({"x": x[..., :4]})
    with pytest.raises(AnemllError, match="no function 'prefill'"):
        model.predict({"x": x}, function="prefill")


# --- embeddings with enumerated input shapes -------------------------------------------

class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


def test_gather_runs_every_enumerated_shape_and_refuses_others(tmp_path):
    torch.manual_seed(1)
    module = Embeddings().half()
    ids = ct.TensorType(name="input_ids", dtype=np.int32,
                        shape=ct.EnumeratedShapes(shapes=[(1, 1), (1, 8)], default=(1, 1)))
    ml = convert(module, (torch.zeros(1, 1, dtype=torch.int32),), [ids],
                 [ct.TensorType(name="hidden_states", dtype=np.float16)])
    model = PortableModel(save(ml, tmp_path / "emb.mlpackage"), device="cpu")
    for n in (1, 8):
        tokens = torch.randint(0, 50, (1, n), dtype=torch.int32)
        out = model.predict({"input_ids": tokens.numpy()})["hidden_states"]
        np.testing.assert_array_equal(out, module(tokens).detach().numpy())
    with pytest.raises(AnemllError, match=r"accepts \(1, 1\) or \(1, 8\)"):
        model.predict({"input_ids": np.zeros((1, 3), np.int32)})


# --- a KV cache in a Core ML state ------------------------------------------------------

LAYERS, CTX, DIM = 2, 16, 8


class KVChunk(nn.Module):
    """Writes its layer's keys into the shared cache at ``current_pos`` and
    attends over that layer's whole cache, as the FFN chunks do."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer
        self.proj = nn.Conv2d(DIM, DIM, 1, bias=False)
        self.register_buffer("kv", torch.zeros(LAYERS, CTX, DIM, dtype=torch.float16))

    def forward(self, x, current_pos):  # x (1, S, DIM)
        pos, seq = current_pos[0], x.shape[1]
        k = self.proj(x.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)
        self.kv[self.layer:self.layer + 1, pos:pos + seq, :] = k
        keys = self.kv[self.layer]
        weights = torch.softmax(torch.matmul(x, keys.transpose(0, 1)), dim=-1)
        return x + torch.matmul(weights, keys)


def convert_chunk(module: KVChunk, seq: int):
    x = torch.zeros(1, seq, DIM, dtype=torch.float16)
    ml = convert(module, (x, torch.zeros(1, dtype=torch.int32)),
                 [ct.TensorType(name="x", shape=x.shape, dtype=np.float16),
                  ct.TensorType(name="current_pos", shape=(1,), dtype=np.int32)],
                 [ct.TensorType(name="y", dtype=np.float16)],
                 [ct.StateType(wrapped_type=ct.TensorType(shape=(LAYERS, CTX, DIM), dtype=np.float16), name="kv")])
    module.kv.zero_()  # tracing ran the module once
    return ml


@pytest.fixture(scope="module")
def chunks(tmp_path_factory):
    torch.manual_seed(2)
    modules = [KVChunk(0).half(), KVChunk(1).half()]
    d = tmp_path_factory.mktemp("chunks")
    infer = [save(convert_chunk(m, 1), d / f"chunk{i}.mlpackage") for i, m in enumerate(modules)]
    prefill = save(convert_chunk(modules[0], 4), d / "chunk0_prefill.mlpackage")
    return modules, infer, prefill


def step(module: KVChunk, x: torch.Tensor, pos: int) -> np.ndarray:
    with torch.no_grad():
        return module(x, torch.tensor([pos], dtype=torch.int32)).numpy()


def test_state_is_written_in_place_and_matches_torch_over_steps(chunks):
    modules, infer, _ = chunks
    module = modules[0]
    module.kv.zero_()
    model = PortableModel(infer[0], device="cpu")
    assert model.state_specs() == [portable.StateSpec("kv", (LAYERS, CTX, DIM), torch.float16)]
    state = model.make_state()
    cache = state["kv"]
    torch.manual_seed(3)
    for pos in range(6):
        x = torch.randn(1, 1, DIM, dtype=torch.float16)
        out = model.predict({"x": x.numpy(), "current_pos": np.array([pos], np.int32)}, state)["y"]
        np.testing.assert_allclose(out.astype(np.float32), step(module, x, pos), **FP16)
    assert state["kv"] is cache
    np.testing.assert_allclose(cache.float().numpy(), module.kv.float().numpy(), **FP16)
    assert cache[0, :6].abs().sum() > 0 and cache[0, 6:].abs().sum() == 0 and cache[1].abs().sum() == 0


def test_one_state_is_shared_by_two_packages(chunks):
    modules, infer, _ = chunks
    for m in modules:
        m.kv.zero_()
    modules[1].kv = modules[0].kv  # torch reference: one buffer, like one KV cache
    models = [PortableModel(p, device="cpu") for p in infer]
    state = models[0].make_state()
    torch.manual_seed(4)
    for pos in range(4):
        x = torch.randn(1, 1, DIM, dtype=torch.float16)
        h = models[0].predict({"x": x.numpy(), "current_pos": np.array([pos], np.int32)}, state)["y"]
        y = models[1].predict({"x": h, "current_pos": np.array([pos], np.int32)}, state)["y"]
        ref_h = step(modules[0], x, pos)
        ref_y = step(modules[1], torch.from_numpy(ref_h), pos)
        np.testing.assert_allclose(y.astype(np.float32), ref_y, **FP16)
    np.testing.assert_allclose(state["kv"].float().numpy(), modules[0].kv.float().numpy(), **FP16)
    assert state["kv"][1, :4].abs().sum() > 0


def test_stateful_model_needs_a_matching_state(chunks):
    model = PortableModel(chunks[1][0], device="cpu")
    feeds = {"x": np.zeros((1, 1, DIM), np.float16), "current_pos": np.array([0], np.int32)}
    with pytest.raises(AnemllError, match="stateful"):
        model.predict(feeds)
    with pytest.raises(AnemllError, match="needs"):
        model.predict(feeds, {"kv": torch.zeros(LAYERS, CTX, DIM)})  # fp32


def test_multifunction_package_runs_prefill_then_infer_on_one_state(chunks, tmp_path):
    modules, infer, prefill = chunks
    module = modules[0]
    module.kv.zero_()
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(infer[0], src_function_name="main", target_function_name="infer")
    desc.add_function(prefill, src_function_name="main", target_function_name="prefill")
    desc.default_function_name = "infer"
    path = str(tmp_path / "combined.mlpackage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct.utils.save_multifunction(desc, path)

    model = PortableModel(path, device="cpu")
    assert model.functions == ["infer", "prefill"] and model.default_function == "infer"
    assert model.state_specs("prefill") == model.state_specs("infer")
    state = model.make_state()
    torch.manual_seed(5)
    x = torch.randn(1, 4, DIM, dtype=torch.float16)
    out = model.predict({"x": x.numpy(), "current_pos": np.array([0], np.int32)}, state, function="prefill")
    np.testing.assert_allclose(out["y"].astype(np.float32), step(module, x, 0), **FP16)
    for pos in (4, 5):
        x = torch.randn(1, 1, DIM, dtype=torch.float16)
        out = model.predict({"x": x.numpy(), "current_pos": np.array([pos], np.int32)}, state)  # default: infer
        np.testing.assert_allclose(out["y"].astype(np.float32), step(module, x, pos), **FP16)
    np.testing.assert_allclose(state["kv"].float().numpy(), module.kv.float().numpy(), **FP16)


# --- palettized weights -------------------------------------------------------------------

class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Conv2d(64, 96, 1, bias=False)
        self.down = nn.Conv2d(96, 32, 1, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


def naive_lut(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Per-element reading of the iOS18 layout: dim d is cut into lut.shape[d] blocks."""
    out = np.empty(indices.shape, lut.dtype)
    block = [n // g for n, g in zip(indices.shape, lut.shape)]
    for pos in np.ndindex(indices.shape):
        group = tuple(p // b for p, b in zip(pos, block))
        out[pos] = lut[group + (indices[pos], 0)]
    return out


def test_palettized_weights_dequantize_once_and_match_torch(tmp_path):
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    torch.manual_seed(6)
    module = Projection().half()
    x = torch.randn(1, 64, 1, 4, dtype=torch.float16)
    ml = convert(module, (x,), [ct.TensorType(name="x", shape=x.shape, dtype=np.float16)],
                 [ct.TensorType(name="y", dtype=np.float16)])
    cfg = OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = palettize_weights(ml, OptimizationConfig(global_config=cfg))
    path = save(ml, tmp_path / "pal.mlpackage")

    luts = [op for op in ml._mil_program.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == 2
    dense = {}
    for op in luts:
        indices, lut = op.indices.val, op.lut.val
        assert lut.shape == (indices.shape[0] // 4, 1, 1, 1, 16, 1)  # per_grouped_channel: groups of 4 rows
        reference = naive_lut(indices, lut)
        ours = lut_to_dense(torch.from_numpy(indices.astype(np.uint8)), torch.from_numpy(lut)).numpy()
        np.testing.assert_array_equal(ours, reference)
        dense[tuple(reference.shape)] = reference

    model = PortableModel(path, device="cpu")
    assert not any(t.startswith("constexpr") for t in model.op_types())  # folded at load
    with torch.no_grad():
        module.up.weight.copy_(torch.from_numpy(dense[(96, 64, 1, 1)]))
        module.down.weight.copy_(torch.from_numpy(dense[(32, 96, 1, 1)]))
        ref = module.float()(x.float()).numpy()
    out = model.predict({"x": x.numpy()})["y"]
    np.testing.assert_allclose(out.astype(np.float32), ref, **FP16)


def test_lut_to_dense_vector_palettes_match_coremltools():
    from coremltools.optimize import _utils as ct_utils

    rng = np.random.default_rng(7)
    indices = rng.integers(0, 4, size=(4, 6, 3)).astype(np.uint8)
    lut = rng.standard_normal((2, 3, 1, 4, 2)).astype(np.float16)  # 2x3 groups, 4 palettes, vectors of 2
    ours = lut_to_dense(torch.from_numpy(indices), torch.from_numpy(lut), vector_axis=1).numpy()
    np.testing.assert_array_equal(ours, ct_utils.lut_to_dense(indices, lut, 1))
    assert ours.shape == (4, 12, 3)


def test_blockwise_shift_scale_matches_coremltools():
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale

    rng = np.random.default_rng(8)
    data = rng.integers(-8, 8, size=(8, 6)).astype(np.int8)
    scale = rng.random((2, 3)).astype(np.float16)
    offset = rng.integers(-2, 2, size=(2, 3)).astype(np.int8)
    ours = blockwise_shift_scale(torch.from_numpy(data), torch.from_numpy(scale), torch.from_numpy(offset))
    ref = constexpr_blockwise_shift_scale.decompress(data, scale, offset)
    np.testing.assert_allclose(ours.numpy().astype(np.float32), ref.astype(np.float32), rtol=1e-3)


# --- MIL op semantics, one program with many outputs -------------------------------------

RNG = np.random.default_rng(9)
XV = (RNG.random((2, 3, 4)) - 0.5).astype(np.float32)
W_CONV1 = RNG.random((4, 3, 2)).astype(np.float32)
W_GROUPED = RNG.random((4, 1, 2, 2)).astype(np.float32)
W_POINT, B_POINT = RNG.random((5, 2, 1, 1)).astype(np.float32), RNG.random(5).astype(np.float32)
W_ONE = RNG.random((5, 6, 1, 1)).astype(np.float32)
W_LIN, B_LIN = RNG.random((5, 4)).astype(np.float32), RNG.random(5).astype(np.float32)
MASK = np.triu(np.full((3, 3), -1e4, np.float32), 1)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _band(x, lower, upper):
    r, c = np.indices(x.shape[-2:])
    keep = ((lower < 0) | (r - c <= lower)) & ((upper < 0) | (c - r <= upper))
    return np.where(keep, x, 0)


def _cumsum_excl_rev(x):
    rev = x[..., ::-1]
    return (np.cumsum(rev, axis=-1) - rev)[..., ::-1]


def _layer_norm(x, axes, eps=1e-5):
    mean = x.mean(axis=tuple(axes), keepdims=True)
    var = x.var(axis=tuple(axes), keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# name -> (MIL body on x, numpy expectation on XV)
MIL_CASES = {
    "slice_negative_strides": (
        lambda x: mb.slice_by_index(x=x, begin=[0, 2, 3], end=[2, 0, 0], stride=[1, -1, -2],
                                    end_mask=[False, True, True]),
        lambda x: x[:, ::-1, ::-2]),
    "slice_squeeze": (
        lambda x: mb.slice_by_index(x=x, begin=[1, 0, -1], end=[2, 3, 0], squeeze_mask=[True, False, True],
                                    end_mask=[False, True, False]),
        lambda x: x[1, :, -1]),
    "slice_update_strided": (
        lambda x: mb.slice_update(x=x, update=np.ones((2, 1, 2), np.float32), begin=[0, 1, 0], end=[2, 2, 4],
                                  stride=[1, 1, 2]),
        lambda x: np.where(np.isin(np.arange(4), [0, 2])[None, None] & (np.arange(3) == 1)[None, :, None], 1.0, x)),
    "slice_by_size": (lambda x: mb.slice_by_size(x=x, begin=[0, 1, 0], size=[-1, 2, 3]), lambda x: x[:, 1:3, :3]),
    "gather_negative": (lambda x: mb.gather(x=x, indices=np.array([[0, 2], [1, -1]], np.int32), axis=2),
                        lambda x: np.take(x, [[0, 2], [1, 3]], axis=2)),
    "gather_batch_dims": (
        lambda x: mb.gather(x=x, indices=np.array([[0, 2], [1, 1]], np.int32), axis=2, batch_dims=1),
        lambda x: np.stack([np.take(x[b], [[0, 2], [1, 1]][b], axis=1) for b in range(2)])),
    "gather_nd": (lambda x: mb.gather_nd(x=x, indices=np.array([[0, 1], [1, 2]], np.int32)),
                  lambda x: np.stack([x[0, 1], x[1, 2]])),
    "gather_along_axis": (
        lambda x: mb.gather_along_axis(x=x, indices=np.tile(np.array([3, 0], np.int32), (2, 3, 1)), axis=2),
        lambda x: x[..., [3, 0]]),
    "concat_interleave": (lambda x: mb.concat(values=[x, mb.mul(x=x, y=2.0)], axis=1, interleave=True),
                          lambda x: np.stack([x, 2 * x], axis=2).reshape(2, 6, 4)),
    "split_sizes": (lambda x: mb.split(x=x, split_sizes=[1, 3], axis=2)[1], lambda x: x[:, :, 1:]),
    "stack": (lambda x: mb.stack(values=[x, x], axis=1), lambda x: np.stack([x, x], axis=1)),
    "expand_dims": (lambda x: mb.expand_dims(x=x, axes=[0, -1]), lambda x: x[None, ..., None]),
    "squeeze": (lambda x: mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1]), lambda x: x),
    "reshape_zero_from_right": (lambda x: mb.reshape(x=x, shape=[1, 0, -1, 0]), lambda x: x.reshape(1, 2, 3, 4)),
    "transpose": (lambda x: mb.transpose(x=x, perm=[2, 0, 1]), lambda x: x.transpose(2, 0, 1)),
    "tile": (lambda x: mb.tile(x=x, reps=[1, 2, 1]), lambda x: np.tile(x, (1, 2, 1))),
    "pad": (lambda x: mb.pad(x=x, pad=[1, 0, 0, 2], constant_val=0.5),
            lambda x: np.pad(x, [(0, 0), (1, 0), (0, 2)], constant_values=0.5)),
    "band_part": (lambda x: mb.band_part(x=x, lower=0, upper=1), lambda x: _band(x, 0, 1)),
    "select": (lambda x: mb.select(cond=mb.greater(x=x, y=0.0), a=x, b=mb.mul(x=x, y=2.0)),
               lambda x: np.where(x > 0, x, 2 * x)),
    "topk_values": (lambda x: mb.topk(x=x, k=2)[0], lambda x: -np.sort(-x, axis=-1)[..., :2]),
    "topk_indices": (lambda x: mb.topk(x=x, k=2)[1], lambda x: np.argsort(-x, axis=-1, kind="stable")[..., :2]),
    "argsort_descending": (lambda x: mb.argsort(x=x, axis=1), lambda x: np.argsort(-x, axis=1, kind="stable")),
    "cumsum_exclusive_reverse": (lambda x: mb.cumsum(x=x, axis=2, exclusive=True, reverse=True), _cumsum_excl_rev),
    "reduce_mean": (lambda x: mb.reduce_mean(x=x, axes=[0, 2], keep_dims=True),
                    lambda x: x.mean(axis=(0, 2), keepdims=True)),
    "reduce_max_all": (lambda x: mb.reduce_max(x=x), lambda x: x.max()),
    "reduce_prod": (lambda x: mb.reduce_prod(x=x, axes=[1, 2]), lambda x: x.prod(axis=(1, 2))),
    "reduce_log_sum_exp": (lambda x: mb.reduce_log_sum_exp(x=x, axes=[-1]),
                           lambda x: np.log(np.exp(x).sum(axis=-1))),
    "reduce_argmax": (lambda x: mb.reduce_argmax(x=x, axis=1), lambda x: x.argmax(axis=1)),
    "real_div": (lambda x: mb.real_div(x=x, y=3.0), lambda x: x / 3.0),
    "floor_div": (lambda x: mb.floor_div(x=x, y=0.3), lambda x: np.floor_divide(x, np.float32(0.3))),
    "mod": (lambda x: mb.mod(x=x, y=0.3), lambda x: np.mod(x, np.float32(0.3))),
    "pow": (lambda x: mb.pow(x=mb.abs(x=x), y=1.5), lambda x: np.abs(x) ** 1.5),
    "clip": (lambda x: mb.clip(x=x, alpha=-0.1, beta=0.2), lambda x: np.clip(x, -0.1, 0.2)),
    "rsqrt_epsilon": (lambda x: mb.rsqrt(x=mb.abs(x=x), epsilon=1e-3), lambda x: 1 / np.sqrt(np.abs(x) + 1e-3)),
    "inverse_default_epsilon": (lambda x: mb.inverse(x=x), lambda x: 1 / (x + 1e-4)),
    "log": (lambda x: mb.log(x=mb.abs(x=x)), lambda x: np.log(np.abs(x))),
    "gelu_tanh": (lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"),
                  lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))),
    "gelu_exact": (lambda x: mb.gelu(x=x), lambda x: F.gelu(_t(x)).numpy()),
    "cast_truncates": (lambda x: mb.cast(x=mb.mul(x=x, y=10.0), dtype="int32"),
                       lambda x: np.trunc(x * np.float32(10.0)).astype(np.int32)),
    "reverse": (lambda x: mb.reverse(x=x, axes=[1]), lambda x: x[:, ::-1]),
    "l2_norm": (lambda x: mb.l2_norm(x=x), lambda x: x / np.sqrt((x ** 2).sum() + 1e-6)),
    "sigmoid_hard": (lambda x: mb.sigmoid_hard(x=x, alpha=0.3, beta=0.4), lambda x: np.clip(0.3 * x + 0.4, 0, 1)),
    "leaky_relu": (lambda x: mb.leaky_relu(x=x, alpha=0.1), lambda x: np.where(x > 0, x, 0.1 * x)),
    "silu": (lambda x: mb.silu(x=x), lambda x: x / (1 + np.exp(-x))),
    "erf": (lambda x: mb.erf(x=x), lambda x: torch.erf(_t(x)).numpy()),
    "flatten2d": (lambda x: mb.flatten2d(x=x, axis=2), lambda x: x.reshape(6, 4)),
    "shape": (lambda x: mb.shape(x=x), lambda x: np.array(x.shape, np.int32)),
    "fill_dynamic_shape": (lambda x: mb.fill(shape=mb.shape(x=x), value=2.0), lambda x: np.full(x.shape, 2.0)),
    "range_dynamic_end": (lambda x: mb.range_1d(start=0.0, end=mb.reduce_sum(x=mb.abs(x=x)), step=0.5),
                          lambda x: np.arange(0.0, np.abs(x).sum(), 0.5)),
    "one_hot": (lambda x: mb.one_hot(indices=mb.cast(x=mb.mul(x=mb.abs(x=x), y=5.0), dtype="int32"),
                                     one_hot_vector_size=3),
                lambda x: np.eye(3)[(np.abs(x) * 5).astype(int)]),
    "softmax_axis1": (lambda x: mb.softmax(x=x, axis=1), lambda x: _softmax(x, 1)),
    "layer_norm_axes_0_2": (lambda x: mb.layer_norm(x=x, axes=[0, 2]), lambda x: _layer_norm(x, [0, 2])),
    "layer_norm_affine": (
        lambda x: mb.layer_norm(x=x, axes=[-1], gamma=np.arange(4, dtype=np.float32), beta=np.ones(4, np.float32),
                                epsilon=1e-3),
        lambda x: _layer_norm(x, [-1], 1e-3) * np.arange(4) + 1),
    "matmul_transpose_y": (lambda x: mb.matmul(x=x, y=x, transpose_y=True), lambda x: x @ x.transpose(0, 2, 1)),
    "linear": (lambda x: mb.linear(x=x, weight=W_LIN, bias=B_LIN), lambda x: x @ W_LIN.T + B_LIN),
    "sdpa_float_mask": (
        lambda x: mb.scaled_dot_product_attention(query=x, key=x, value=x, attn_mask=MASK),
        lambda x: _softmax(x @ x.transpose(0, 2, 1) / 2.0 + MASK, -1) @ x),
    "conv1d_same": (lambda x: mb.conv(x=x, weight=W_CONV1, pad_type="same"),
                    lambda x: F.conv1d(F.pad(_t(x), (0, 1)), _t(W_CONV1)).numpy()),
    "conv2d_grouped_dilated": (
        lambda x: mb.conv(x=mb.reshape(x=x, shape=[1, 2, 3, 4]), weight=W_GROUPED, groups=2, dilations=[1, 2],
                          pad_type="custom", pad=[1, 0, 0, 1]),
        lambda x: F.conv2d(F.pad(_t(x.reshape(1, 2, 3, 4)), (0, 1, 1, 0)), _t(W_GROUPED), groups=2,
                           dilation=(1, 2)).numpy()),
    "conv_pointwise_bias": (
        lambda x: mb.conv(x=mb.reshape(x=x, shape=[1, 2, 3, 4]), weight=W_POINT, bias=B_POINT),
        lambda x: F.conv2d(_t(x.reshape(1, 2, 3, 4)), _t(W_POINT), _t(B_POINT)).numpy()),
    "conv_pointwise_one_position": (  # the decoding shape, (B, C, 1, 1)
        lambda x: mb.conv(x=mb.reshape(x=x, shape=[4, 6, 1, 1]), weight=W_ONE, bias=B_POINT),
        lambda x: F.conv2d(_t(x.reshape(4, 6, 1, 1)), _t(W_ONE), _t(B_POINT)).numpy()),
}


@pytest.fixture(scope="module")
def mil_outputs(tmp_path_factory):
    names = list(MIL_CASES)

    @mb.program(input_specs=[mb.TensorSpec(shape=XV.shape)], opset_version=ct.target.iOS18)
    def prog(x):
        return tuple(mb.identity(x=MIL_CASES[n][0](x), name=n) for n in names)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                        pass_pipeline=ct.PassPipeline.EMPTY, compute_precision=ct.precision.FLOAT32,
                        skip_model_load=True)
    model = PortableModel(save(ml, tmp_path_factory.mktemp("ops") / "ops.mlpackage"), device="cpu")
    return model.predict({"x": XV})


@pytest.mark.parametrize("case", list(MIL_CASES))
def test_mil_op_semantics(mil_outputs, case):
    expected = np.asarray(MIL_CASES[case][1](XV))
    out = mil_outputs[case]
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.astype(np.float64), expected.astype(np.float64), rtol=1e-5, atol=1e-5)


# --- the in-place state plan keeps MIL semantics -------------------------------------------

def _state_program(build, tmp_path, name):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4), dtype=types.fp16),
                             mb.StateTensorSpec(shape=(3, 4), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x, cache):
        return build(x, cache)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                        pass_pipeline=ct.PassPipeline.EMPTY, compute_precision=ct.precision.FLOAT16,
                        skip_model_load=True)
    return PortableModel(save(ml, tmp_path / f"{name}.mlpackage"), device="cpu")


def _write_row(value, row, index=1):
    return mb.slice_update(x=value, update=mb.identity(x=row), begin=[index, 0], end=[index + 1, 4])


def test_value_read_before_a_state_update_keeps_the_old_contents(tmp_path):
    def build(x, cache):
        old = mb.read_state(input=cache)
        mb.coreml_update_state(state=cache, value=_write_row(old, x))
        return mb.add(x=old, y=mb.read_state(input=cache), name="y")  # old + new

    model = _state_program(build, tmp_path, "read_old")
    state = {"cache": torch.ones(3, 4, dtype=torch.float16)}
    x = np.full((1, 4), 5.0, np.float16)
    y = model.predict({"x": x}, state)["y"]
    np.testing.assert_array_equal(y, [[2] * 4, [6] * 4, [2] * 4])
    np.testing.assert_array_equal(state["cache"].numpy(), [[1] * 4, [5] * 4, [1] * 4])


def test_state_read_between_write_and_store_sees_the_old_contents(tmp_path):
    def build(x, cache):
        new = _write_row(mb.read_state(input=cache), x)
        seen = mb.read_state(input=cache)  # before the store: still the old contents
        stored = mb.coreml_update_state(state=cache, value=new)
        return mb.add(x=seen, y=stored, name="y")

    model = _state_program(build, tmp_path, "read_between")
    state = {"cache": torch.ones(3, 4, dtype=torch.float16)}
    y = model.predict({"x": np.full((1, 4), 5.0, np.float16)}, state)["y"]
    np.testing.assert_array_equal(y, [[2] * 4, [6] * 4, [2] * 4])
    np.testing.assert_array_equal(state["cache"].numpy(), [[1] * 4, [5] * 4, [1] * 4])


def test_two_writes_then_one_store_land_both(tmp_path):
    def build(x, cache):
        both = _write_row(_write_row(mb.read_state(input=cache), x, 0), mb.mul(x=x, y=np.float16(2.0)), 2)
        return mb.identity(x=mb.coreml_update_state(state=cache, value=both), name="y")

    model = _state_program(build, tmp_path, "two_writes")
    state = {"cache": torch.ones(3, 4, dtype=torch.float16)}
    y = model.predict({"x": np.full((1, 4), 5.0, np.float16)}, state)["y"]
    np.testing.assert_array_equal(y, [[5] * 4, [1] * 4, [10] * 4])
    np.testing.assert_array_equal(state["cache"].numpy(), y)


def test_outputs_do_not_alias_the_state(tmp_path):
    def build(x, cache):
        stored = mb.coreml_update_state(state=cache, value=_write_row(mb.read_state(input=cache), x))
        return mb.identity(x=stored, name="y")

    model = _state_program(build, tmp_path, "alias_out")
    state = {"cache": torch.zeros(3, 4, dtype=torch.float16)}
    y = model.predict_tensors({"x": np.full((1, 4), 5.0, np.float16)}, state)["y"]
    state["cache"].zero_()
    assert y[1].tolist() == [5.0] * 4
