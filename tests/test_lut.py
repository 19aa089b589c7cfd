"""Our grouped-channel k-means LUT quantizer and its exact MIL encoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anemlld.convert import lut
from tests.conftest import DEMO_MODEL


def demo_weight(name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(DEMO_MODEL / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_each_group_gets_at_most_2_to_the_bits_values_and_the_lut_reproduces_it(bits):
    w = demo_weight("model.layers.0.mlp.down_proj.weight")  # (256, 768)
    q = lut.quantize_weight(w, bits, 16)
    assert q.lut.shape == (256 // 16, 1 << bits) and q.lut.dtype == torch.float16
    groups = q.dense.reshape(16, -1)
    assert max(len(torch.unique(g)) for g in groups) <= 1 << bits
    rebuilt = q.lut.gather(1, q.indices.reshape(16, -1).long()).reshape(w.shape)
    assert torch.equal(rebuilt, q.dense)
    # every value is mapped to its nearest table entry
    dist = (w.float().reshape(16, -1, 1) - q.lut.float()[:, None, :]).abs()
    chosen = (w.float().reshape(16, -1) - q.dense.float().reshape(16, -1)).abs()
    assert torch.all(chosen <= dist.min(dim=-1).values + 1e-3)


def test_quantization_is_deterministic():
    w = demo_weight("model.layers.1.self_attn.q_proj.weight")
    a, b = lut.quantize_weight(w, 4, 16), lut.quantize_weight(w.clone(), 4, 16)
    assert torch.equal(a.lut, b.lut) and torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("bits", [4, 6])
def test_error_is_no_worse_than_coremltools_kmeans(bits):
    """Within 2% of coremltools' own k-means on a trained weight (measured
    here: 6-8% lower at both sizes)."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    w = demo_weight("model.layers.2.self_attn.q_proj.weight")
    ours = ((lut.quantize_weight(w, bits, 16).dense.float() - w.float()) ** 2).mean().item()
    wn = w.numpy().astype(np.float16)
    theirs = 0.0
    for i in range(0, wn.shape[0], 16):
        table, idx = _get_kmeans_lookup_table_and_weight(bits, wn[i:i + 16])
        theirs += float(((table[idx].reshape(16, -1) - wn[i:i + 16].astype(np.float64)) ** 2).sum())
    theirs /= wn.size
    assert ours <= theirs * 1.02, (ours, theirs)


def test_group_size_falls_back_to_a_divisor_of_the_rows():
    w = torch.randn(24, 8)
    q = lut.quantize_weight(w, 4, 16)  # 24 rows: groups of gcd(24, 16) = 8
    assert q.lut.shape == (3, 16)


def test_exact_encoding_round_trips_and_refuses_too_many_values():
    w = demo_weight("model.layers.0.self_attn.o_proj.weight")
    dense = lut.quantize_weight(w, 4, 16).dense[:, :, None, None].numpy()
    table, indices = lut.encode_exact(dense, 4, 16)
    assert table.shape == (16, 1, 1, 1, 16, 1) and indices.shape == dense.shape
    rebuilt = np.take_along_axis(table.reshape(16, 16), indices.reshape(16, -1).astype(np.int64), 1)
    assert np.array_equal(rebuilt.reshape(dense.shape), dense)
    from shared.errors import AnemllError

    with pytest.raises(AnemllError, match="distinct values"):
        lut.encode_exact(w.numpy()[:, :, None, None], 4, 16)  # unquantized: thousands of values per group
