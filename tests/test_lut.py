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


def test_sort_rows_orders_fp16_bit_patterns_like_the_values():
    """The radix sort's keys must order negatives, zeros, subnormals and
    large values as the floats compare; the permutation must sort the row."""
    special = [-65504.0, -1.5, -6e-8, -0.0, 0.0, 6e-8, 1e-5, 0.33, 2.0, 65504.0]
    rows = torch.tensor([special, special[::-1]], dtype=torch.float32)
    rows = torch.cat([rows, torch.randn(3, len(special))])
    xs, order = lut.sort_rows(rows)
    expect = rows.half().float().sort(dim=1).values
    assert torch.equal(xs, expect)
    assert torch.equal(rows.half().float().gather(1, order), xs)
    assert torch.equal(lut.unsort(order, xs), rows.half().float())


def test_runs_count_distinct_values_with_their_multiplicity():
    xs = torch.tensor([[1.0, 1.0, 1.0, 2.0, 5.0, 5.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    runs = lut.Runs.of_sorted(xs)
    assert runs.n == 6 and torch.equal(runs.xs[0, :3], torch.tensor([1.0, 2.0, 5.0]))
    a, b = torch.tensor([[0], [0]]), torch.tensor([[2], [2]])
    assert runs.count(a, b).tolist() == [[4.0], [2.0]]
    assert runs.sum(a, b).tolist() == [[5.0], [1.0]]
    # padding (the row's largest value, counted zero times) adds nothing
    assert runs.count(torch.tensor([[3], [6]]), torch.tensor([[6], [6]])).tolist() == [[0.0], [0.0]]
    assert runs.sse(a, b)[0].item() == pytest.approx(3 + 4 - 25 / 4)


def exact_kmeans_sse(values: np.ndarray, k: int) -> float:
    """Optimal 1-D k-means squared error by dynamic programming over the
    sorted values (O(k n^2), for small n)."""
    x = np.sort(values.astype(np.float64))
    n = len(x)
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    i, j = np.triu_indices(n + 1, 1)  # run x[i:j]
    cost = np.full((n + 1, n + 1), np.inf)
    cost[i, j] = (s2[j] - s2[i]) - (s1[j] - s1[i]) ** 2 / (j - i)
    best = cost[0].copy()  # one cluster covering x[:j]
    for _ in range(k - 1):
        best = np.min(best[:, None] + cost, axis=0)
    return float(best[n])


@pytest.mark.parametrize("bits,rounding,within", [(4, torch.float16, 1.01), (4, torch.bfloat16, 1.01),
                                                   (6, torch.float16, 1.03), (6, torch.bfloat16, 1.03)])
def test_kmeans_is_close_to_the_exact_optimum(bits, rounding, within):
    """Against an exact DP on groups of 2,000 values with outliers (as trained
    weights have; bf16-rounded ones repeat values), summed over the groups.
    Measured: 0.5-0.7% above the optimum at 4 bits, 1.7-2.0% at 6 bits (on
    1B-shaped groups of 16,384 values: 0.3% and 1.3-1.6%)."""
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(3, 2000, generator=gen) * (torch.rand(3, 1, generator=gen) + 0.5) * 0.05).to(rounding).float()
    w[:, :3] *= 6
    q = lut.quantize_weight(w, bits, 1)
    ours = ((q.dense.double() - w.half().double()) ** 2).sum().item()
    optimum = sum(exact_kmeans_sse(row.half().double().numpy(), 1 << bits) for row in w)
    assert optimum <= ours <= optimum * within, (ours / optimum)


@pytest.mark.parametrize("bits", [4, 6])
def test_groups_with_fewer_distinct_values_than_the_table_are_kept_exactly(bits):
    w = torch.zeros(4, 500)
    w[1] = torch.tensor([0.5, -0.25, 0.125]).repeat(167)[:500]  # three values
    w[2, ::7] = 1.0  # two values, one rare
    w[3] = torch.arange(500) % 20 / 64  # 20 values, fewer than 64
    q = lut.quantize_weight(w, bits, 1)
    if bits == 6:
        assert torch.equal(q.dense.float(), w)
    else:
        assert torch.equal(q.dense.float()[:3], w[:3])
    assert torch.equal(q.lut.gather(1, q.indices.long()), q.dense)


def bf16_groups(groups: int, values: int, seed: int) -> torch.Tensor:
    """Random groups as a bf16 checkpoint holds them (fp32 copies of bf16
    values), large enough for the counted path (~2,500 distinct values each)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(groups, values, generator=gen) * 0.02).to(torch.bfloat16).float()


def counted_cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    fp16 = torch.randn(6, 8192, generator=gen) * 0.02
    folded = bf16_groups(6, 8192, 6) * (torch.rand(8192, generator=gen) + 0.5)  # a norm folded in: not bf16
    few = torch.tensor([-0.5, 0.25, 0.125, 1.0])[torch.randint(0, 4, (6, 8192), generator=gen)]
    few[1] = 0.375  # a group of one value
    few[2, ::2] = -0.0  # signed zeros, which compare equal: one value
    few[3, :100] = 0.0
    few[3, 100:200] = -0.0
    few[4] = -0.0  # only -0
    zeros = bf16_groups(4, 8192, 10)  # sparse: many zeros of both signs, whose count moves the centroids
    zeros[:, :3000] = 0.0
    zeros[:3, 1000:3000] = -0.0
    zeros[3, :3000] = -0.0
    return {"bf16": bf16_groups(6, 8192, 4), "fp16": fp16, "folded bf16": folded, "few values": few,
            "signed zeros": zeros}


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("case", ["bf16", "fp16", "folded bf16", "few values", "signed zeros"])
def test_counting_patterns_gives_the_sorts_tables_and_indices(case, bits):
    groups = counted_cases()[case]
    counted = lut.quantize_counted(groups, 1 << bits)
    assert counted is not None, "these groups span few enough fp16 patterns for the histogram"
    expect = lut.quantize_sorted(groups, 1 << bits)
    for got, want in zip(counted, expect):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.int8) if got.dtype == torch.uint8 else got.view(torch.int16),
                           want.view(torch.int8) if want.dtype == torch.uint8 else want.view(torch.int16))


def test_a_group_of_one_value_gets_a_table_of_that_value():
    groups = torch.full((2, 500), 0.0312)
    groups[1] = -2.5
    counted = lut.quantize_counted(groups, 16)
    assert counted is not None
    table, indices = counted
    assert torch.equal(table.float(), groups.half().float()[:, :1].expand(2, 16))
    assert torch.equal(table.gather(1, indices.long()).float(), groups.half().float())
    assert all(torch.equal(a, b) for a, b in zip(counted, lut.quantize_sorted(groups, 16)))


def test_counting_leaves_inf_nan_and_widely_spread_small_groups_to_the_sort():
    groups = bf16_groups(4, 8192, 7)
    groups[1, 3] = float("inf")
    assert lut.quantize_counted(groups, 16) is None
    groups[1, 3] = float("nan")
    assert lut.quantize_counted(groups, 16) is None
    spread = torch.randn(16, 256) * 0.02  # 256 values spread over ~24,000 patterns
    assert lut.quantize_counted(spread, 16) is None
    assert lut.quantize_slab(spread, 16)[1].shape == spread.shape  # sorted instead


@pytest.mark.parametrize("bits", [4, 6])
def test_a_group_quantizes_the_same_in_any_slab(bits):
    """Slab sizes follow the worker count and the weight's size: each group's
    result must depend on its own values only (padding and the rounds its
    neighbours need included)."""
    for groups in (bf16_groups(12, 8192, 8), demo_weight("model.layers.0.mlp.gate_proj.weight").float().reshape(64, -1)):
        whole = lut.quantize_slab(groups, 1 << bits)
        cut = [lut.quantize_slab(groups[a:b], 1 << bits) for a, b in ((0, 1), (1, 4), (4, 5), (5, groups.shape[0]))]
        for got, want in zip((torch.cat(parts) for parts in zip(*cut)), whole):
            assert torch.equal(got, want)


def test_dense_is_the_table_looked_up_by_the_indices():
    w = bf16_groups(64, 2048, 9)  # 8 groups of 8 rows, counted
    q = lut.quantize_weight(w, 4, 8)
    assert q.dense.dtype == torch.float16 and q.dense.shape == w.shape
    assert torch.equal(q.dense.reshape(8, -1), q.lut.gather(1, q.indices.reshape(8, -1).long()))


@pytest.mark.parametrize("chunk", [1000, 20_000])
def test_counting_in_pieces_of_rows_or_of_one_long_row_gives_the_same(chunk, monkeypatch):
    """Pieces of several rows (groups of 8 K values) and pieces of one row
    (one table per tensor: a row longer than a piece)."""
    groups = bf16_groups(5, 8192, 11)
    whole = lut.quantize_counted(groups, 16), lut.quantize_counted(groups.reshape(1, -1), 16)
    monkeypatch.setattr(lut, "CHUNK_VALUES", chunk)
    assert len(lut.chunks_of(*groups.shape)) > 1
    pieces = lut.quantize_counted(groups, 16), lut.quantize_counted(groups.reshape(1, -1), 16)
    for got, want in zip(pieces, whole):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_shifted_columns_are_the_clamped_index():
    t = torch.randn(3, 6)
    for by in range(-8, 9):
        for width in (1, 5, 6, 9):
            assert torch.equal(lut.shifted(t, by, width), t[:, (torch.arange(width) + by).clamp(0, 5)])
