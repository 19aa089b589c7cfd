"""Our LUT quantizer: grouped-channel k-means, vectorized over every group of
a weight at once, and the MIL pass that stores the result as Core ML's
``constexpr_lut_to_dense``.

Two steps, so that each weight is clustered once however many functions use it:

1. :func:`quantize_module` runs k-means on the torch weights of a part (before
   tracing) and writes each weight back as its dequantized value: every group
   of ``group_size`` output channels then holds at most ``2**bits`` distinct
   fp16 values.
2. :func:`encode_program` runs on the converted MIL program of each function
   and replaces those weights by ``constexpr_lut_to_dense(indices, lut)``.
   It only re-encodes values exactly (no clustering), so the ``infer`` and
   ``prefill`` functions get byte-identical tables and indices, which
   ``save_multifunction`` stores once.

The k-means works on each group's sorted distinct values with their counts:
a cluster is then a contiguous run, and prefix sums give any run's mean and
squared error in O(1). Those come from a histogram of the group's fp16 bit
patterns (:func:`quantize_counted`: O(values), the indices a lookup of each
value's pattern), or, for small groups spread over many patterns, from one
radix sort of them (:func:`quantize_sorted`); both give the same tables and
indices. Lloyd's iterations start from quantiles of the companded density
(see :func:`companded_start`, deterministic), then :func:`refine` moves each
cut to the best place for its two runs. A group's result depends on its own
values only, not on the slab it is computed in. Measured against
coremltools' exact 1-D k-means on 1B-shaped weights, the error ends 0.3%
above the optimum at 4 bits and 1.3-1.6% at 6 bits (fp16 and bf16 weights);
speeds in README.md (``bench/quantizer.py``).
"""
from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from shared.errors import AnemllError
from shared.settings import env_count

log = logging.getLogger(__name__)

# Groups are processed in slabs of at most this many values, two at a time:
# the temporaries (histogram or sort order, prefix sums) take 7 bytes per
# value on a bf16 weight, about 70 on fp16 groups of 16 K values (measured).
SLAB_VALUES = 8_000_000
# Groups are counted, not sorted, when they span at most this many fp16
# patterns per value (1B-shaped groups of 16-65 K values span 0.4-1.5).
BINS_PER_VALUE = 4
CHUNK_VALUES = 1 << 18  # values per pass of the histogram and the lookup (int64 bins: 2 MB)
QUANTIZE_THREADS = 2  # ANEMLL_QUANTIZE_THREADS changes it
LLOYD_ITERATIONS = 20
REFINE_SWEEPS = 10
REFINE_WINDOW = 8
RELOCATIONS = 8
SPLIT_STEPS = 4


def group_size_for(channels: int, group_size: int) -> int:
    """The requested group size, or the largest divisor of it that divides
    ``channels`` (vocabulary splits are not always multiples of 16)."""
    return math.gcd(channels, group_size)


def order_keys(bits: np.ndarray) -> np.ndarray:
    """int16 keys of fp16 bit patterns that order as the values compare:
    negative floats have their magnitude bits flipped, so a larger magnitude
    sorts lower; the sign bit orders the rest. The transform is its own
    inverse."""
    return bits ^ ((bits >> 15) & np.int16(0x7FFF))


def sort_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``values`` rounded to fp16 (what Core ML will store and
    run) and sorted ascending, as float32, with the permutation that sorts
    it. On the CPU this is a radix sort of the fp16 bit patterns (numpy's
    stable sort of 16-bit keys): 0.16 s for 16 M values on this machine,
    against 0.3 s for numpy's float argsort and 1.5 s for torch's sort."""
    half = values.detach().half()
    if half.device.type != "cpu":
        xs, order = half.float().sort(dim=1)
        return xs, order
    keys = order_keys(half.numpy().view(np.int16))
    order = np.argsort(keys, axis=1, kind="stable")
    keys = order_keys(np.take_along_axis(keys, order, axis=1))
    return torch.from_numpy(keys.view(np.float16)).float(), torch.from_numpy(order)


def unsort(order: torch.Tensor, in_sorted_order: torch.Tensor) -> torch.Tensor:
    """Values given in sorted order put back where :func:`sort_rows` found them."""
    return torch.empty_like(in_sorted_order).scatter_(1, order, in_sorted_order)


def first_of_each_value(xs: torch.Tensor) -> torch.Tensor:
    """(G, N) bool: True where a sorted row holds a value for the first time."""
    new = torch.ones_like(xs, dtype=torch.bool)
    new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    return new


def run_ids(cuts: torch.Tensor, n: int) -> torch.Tensor:
    """(G, n) uint8: the run each sorted position falls in, runs starting at
    0 and at each of the (G, k-1) non-decreasing ``cuts``."""
    marks = torch.zeros(cuts.shape[0], n + 1, dtype=torch.uint8, device=cuts.device)
    marks.scatter_add_(1, cuts, torch.ones_like(cuts, dtype=torch.uint8))
    return marks[:, :n].cumsum(dim=1, dtype=torch.uint8)


def shifted(t: torch.Tensor, by: int, width: int) -> torch.Tensor:
    """(G, width): column i is ``t[:, i + by]``, the index clamped to t's
    columns. Slices, not a gather: the same columns of every row (a gather
    or index_select costs 10x more here)."""
    columns = t.shape[1]
    before = min(max(-by, 0), width)
    after = min(max(by + width - columns, 0), width)
    start = max(by, 0)
    parts = [t[:, :1].expand(-1, before), t[:, start:start + width - before - after],
             t[:, columns - 1:].expand(-1, after)]
    return torch.cat(parts, 1)


def companded_start(runs: "Runs", k: int, window: int = 4) -> torch.Tensor:
    """Starting centroids (G, k, float64): quantiles of the density
    p(x)^(1/3), the point density of an optimal high-resolution quantizer.
    Plain quantiles crowd the centre and starve the tails; from them Lloyd
    stalls at 2.5x the error of a good solution at 6 bits (measured on
    pico-llama). The density at each distinct value is the count of values
    within ``window`` distinct values either side over the span they cover;
    smoothing more (a wider window, or a subsample) makes Lloyd end 1-2%
    worse at 6 bits."""
    x = runs.xs.double()
    g, m = x.shape
    span = (shifted(x, window, m) - shifted(x, -window, m)).clamp(min=1e-12)
    counted = shifted(runs.ccount, window + 1, m) - shifted(runs.ccount, -window, m)
    density = (counted / span) ** (1.0 / 3.0)
    step = torch.diff(x, dim=1, prepend=x[:, :1])  # 0 on the padding, which repeats the largest value
    mass = (density * step).cumsum(dim=1)
    mass = mass / mass[:, -1:].clamp(min=1e-300)
    targets = ((torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k).expand(g, k).contiguous()
    return x.gather(1, torch.searchsorted(mass.contiguous(), targets).clamp(max=m - 1))


class Runs:
    """The distinct values of sorted rows with their counts, and prefix sums
    over them: the count, sum and squared error of any contiguous run in O(1),
    in float64 (a run's sum is the difference of two large prefix sums).

    Clusters are runs of distinct values, not of positions: fp16 weights
    repeat values (a 1B model's bf16 weights hold ~1,500 distinct values per
    group of 16,384), and a cut between two copies of one value is never
    better than one beside them."""

    def __init__(self, xs: torch.Tensor, count: torch.Tensor):
        """``xs`` (G, n) float32: each row's distinct values ascending; rows
        with fewer are padded with their largest value, counted zero times.
        ``count`` (G, n + 1) float64: a leading 0 (the empty prefix), then
        how often each value occurs. ``count`` becomes the prefix counts."""
        g, self.n = xs.shape
        dev = xs.device
        self.xs = xs
        self.distinct = (count[:, 1:] > 0).sum(dim=1)  # (G,): the row's own values, before its padding
        weighted = count.clone()
        weighted[:, 1:] *= self.xs
        self.csum = weighted.cumsum(dim=1)
        weighted[:, 1:] *= self.xs
        self.csq = weighted.cumsum_(dim=1)
        self.ccount = count.cumsum_(dim=1)
        self.first = torch.zeros(g, 1, dtype=torch.long, device=dev)
        self.last = torch.full((g, 1), self.n, dtype=torch.long, device=dev)

    @classmethod
    def of_sorted(cls, xs: torch.Tensor) -> "Runs":
        """The runs of rows sorted ascending (G, N)."""
        g, n = xs.shape
        dev = xs.device
        new = first_of_each_value(xs)
        rank = new.cumsum(dim=1) - 1
        distinct = int(rank[:, -1].max()) + 1
        values = xs[:, -1:].repeat(1, distinct)
        values.scatter_(1, rank, xs)
        count = torch.zeros(g, distinct + 1, dtype=torch.float64, device=dev)
        count[:, 1:].scatter_add_(1, rank, torch.ones(g, n, dtype=torch.float64, device=dev))
        return cls(values, count)

    def at(self, i: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(count, sum, sum of squares) of the prefixes ending before each
        distinct value ``i`` (G, any), for :func:`run_sse`; with ``rows``,
        of those groups only (``i`` then has a row for each)."""
        if rows is None:
            return self.ccount.gather(1, i), self.csum.gather(1, i), self.csq.gather(1, i)
        flat = i + (rows * self.ccount.shape[1]).unsqueeze(1)  # one index for the three takes
        return self.ccount.take(flat), self.csum.take(flat), self.csq.take(flat)

    def positions(self, cuts: torch.Tensor) -> torch.Tensor:
        """Where ``cuts`` (indices of distinct values) fall in the sorted row."""
        return self.ccount.gather(1, cuts).long()

    def bounds(self, cuts: torch.Tensor) -> torch.Tensor:
        """(G, k+1) run boundaries from the (G, k-1) cuts."""
        return torch.cat([self.first, cuts, self.last], 1)

    def count(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.ccount.gather(1, b) - self.ccount.gather(1, a)

    def sum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.csum.gather(1, b) - self.csum.gather(1, a)

    def mean(self, a: torch.Tensor, b: torch.Tensor, otherwise: torch.Tensor) -> torch.Tensor:
        """Each run's mean, ``otherwise`` where it is empty."""
        counts = self.count(a, b)
        return torch.where(counts > 0, self.sum(a, b) / counts.clamp(min=1), otherwise)

    def sse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return run_sse(self.at(a), self.at(b))

    def cuts(self, centroids: torch.Tensor) -> torch.Tensor:
        """Where each run of the nearest-centroid assignment starts (G, k-1)."""
        c = centroids.double()
        return torch.searchsorted(self.xs, ((c[:, 1:] + c[:, :-1]) / 2).float().contiguous())


def run_sse(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The squared error of the runs between prefixes ``a`` and ``b`` (from
    :meth:`Runs.at`, broadcast against each other), so that a prefix
    gathered once serves every candidate cut."""
    s = b[1] - a[1]
    return (b[2] - a[2]) - s * s / (b[0] - a[0]).clamp(min=1)


def lloyd(runs: Runs, c: torch.Tensor, iterations: int) -> torch.Tensor:
    """Lloyd's iterations from centroids ``c`` (G, k, float64). Each cluster
    is a contiguous run of the sorted distinct values, so an iteration is one
    searchsorted and a few gathers."""
    g = c.shape[0]
    rows = torch.arange(g, device=c.device)
    n = runs.n
    for _ in range(iterations):
        b = runs.bounds(runs.cuts(c))
        starts, ends = b[:, :-1], b[:, 1:]
        new = runs.mean(starts, ends, c)
        # An empty cluster (duplicate start values, or squeezed out) is moved
        # into the cluster with the largest squared error, splitting it.
        empty = runs.count(starts, ends) == 0
        if bool(empty.any()):
            worst = runs.sse(starts, ends).argmax(dim=1)
            victim = empty.float().argmax(dim=1)
            has = empty.any(dim=1)
            # (the row's own end, not its padding's: the same result in any slab)
            s0, e0 = starts[rows, worst], torch.minimum(ends[rows, worst], runs.distinct)
            lo = runs.xs[rows, (s0 + (e0 - s0) // 4).clamp(max=n - 1)].double()
            hi = runs.xs[rows, (s0 + 3 * (e0 - s0) // 4).clamp(max=n - 1)].double()
            new[rows[has], worst[has]] = lo[has]
            new[rows[has], victim[has]] = hi[has]
            new = new.sort(dim=1).values
        elif torch.equal(new, c):
            break
        c = new
    return c


def strictly_inside(at: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``at`` moved into lo+1..hi-1, so a cut there leaves both runs
    non-empty; ``hi`` when the runs together hold fewer than two values."""
    return torch.minimum(torch.maximum(torch.minimum(at, hi - 1), lo + 1), hi)


def refine(runs: Runs, cuts: torch.Tensor, window: int, sweeps: int,
           groups: torch.Tensor | None = None) -> torch.Tensor:
    """Move each cut to the best place for the two runs beside it, within
    ``window`` values either side: the split of their union with the least
    squared error. Alternating even and odd cuts (neighbours never move
    together), every move lowers the error, so this ends at a point where no
    single cut can improve. Lloyd stops where every cut sits at the midpoint of
    its neighbours' means, which this also satisfies, but it cannot leave a
    local optimum by moving a cut past a gap; at 6 bits that leaves it 2.3%
    above the exact optimum on 1B-shaped weights, this 1.3% (measured against
    coremltools' exact 1-D k-means). With ``groups`` (indices), only those
    groups' cuts move."""
    g, m = cuts.shape
    dev = cuts.device
    offsets = torch.arange(-window, window + 1, device=dev)
    cuts = cuts.clone()
    # A group in which no cut moved in a sweep has converged: the next sweeps
    # would find the same, so they run on the others only.
    active = groups
    for _ in range(sweeps):
        rows = cuts if active is None else cuts[active]
        moved = torch.zeros(rows.shape[0], dtype=torch.bool, device=dev)
        for parity in (0, 1):
            j = torch.arange(parity, m, 2, device=dev)
            b = torch.cat([runs.first[:rows.shape[0]], rows, runs.last[:rows.shape[0]]], 1)
            lo, hi, now = b[:, j], b[:, j + 2], rows[:, j]
            cand = strictly_inside(now.unsqueeze(-1) + offsets, lo.unsqueeze(-1), hi.unsqueeze(-1))
            at_lo, at_hi, at_now = runs.at(lo, active), runs.at(hi, active), runs.at(now, active)
            at_cand = tuple(t.reshape(cand.shape) for t in runs.at(cand.reshape(cand.shape[0], -1), active))
            wide_lo, wide_hi = tuple(t.unsqueeze(-1) for t in at_lo), tuple(t.unsqueeze(-1) for t in at_hi)
            least, where = (run_sse(wide_lo, at_cand) + run_sse(at_cand, wide_hi)).min(dim=-1)
            # move only for a real gain, so that equal-cost places do not cycle
            stay = run_sse(at_lo, at_now) + run_sse(at_now, at_hi)
            best = torch.where(least < stay * (1 - 1e-9), cand.gather(-1, where.unsqueeze(-1)).squeeze(-1), now)
            moved |= (best != now).any(dim=1)
            rows[:, j] = best
        if active is not None:
            cuts[active] = rows
            active = active[moved]
        else:
            active = torch.nonzero(moved).squeeze(1)
        if not len(active):
            break
    return cuts


def relocate(runs: Runs, cuts: torch.Tensor, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One move per group that local moves cannot make: take away the cut
    whose removal costs least (merging two runs) and put it where a new cut
    gains most (splitting a run in two), when the gain is larger. This is
    how clusters reach outliers and sparse tails: a few far values share a
    run with the edge of the bulk until a cut is moved out to them. Each
    run's split is found by a few 2-means steps within it, not by trying
    every place, so a round costs about one Lloyd iteration. Only the
    ``groups`` given (a bool mask) move; returns the new cuts and which moved."""
    g, m = cuts.shape
    dev = cuts.device
    b = runs.bounds(cuts)
    starts, ends = b[:, :-1], b[:, 1:]
    sse = runs.sse(starts, ends)
    loss = runs.sse(starts[:, :-1], ends[:, 1:]) - sse[:, :-1] - sse[:, 1:]  # removing cut j
    mean = runs.mean(starts, ends, runs.xs.gather(1, starts.clamp(max=runs.n - 1)).double())
    split = torch.searchsorted(runs.xs, mean.float().contiguous())
    for _ in range(SPLIT_STEPS):
        split = strictly_inside(split, starts, ends)
        low, high = runs.mean(starts, split, mean), runs.mean(split, ends, mean)
        split = torch.searchsorted(runs.xs, ((low + high) / 2).float().contiguous())
    split = strictly_inside(split, starts, ends)
    usable = split < ends
    gain = torch.where(usable, sse - runs.sse(starts, split) - runs.sse(split, ends), torch.zeros_like(sse))
    best_gain, at = gain.max(dim=1)
    # the cut to remove may not border the run being split
    j = torch.arange(m, device=dev).expand(g, m)
    near = (j == at.unsqueeze(1)) | (j == at.unsqueeze(1) - 1)
    least_loss, remove = torch.where(near, torch.full_like(loss, float("inf")), loss).min(dim=1)
    move = best_gain > least_loss * (1 + 1e-9) + 1e-30
    if groups is not None:
        move &= groups
    if not bool(move.any()):
        return cuts, move
    rows = torch.nonzero(move).squeeze(1)
    new = cuts.clone()
    new[rows, remove[rows]] = split[rows, at[rows]]
    return new.sort(dim=1).values, move


def kmeans_sorted(runs: Runs, k: int, iterations: int = LLOYD_ITERATIONS,
                  sweeps: int = REFINE_SWEEPS, window: int = REFINE_WINDOW,
                  relocations: int | None = None) -> torch.Tensor:
    """Centroids (G, k, float64), non-decreasing, for each sorted row of
    ``runs``: Lloyd from the companded start, then :func:`refine`, with
    :func:`relocate` between rounds of it; a group leaves the rounds once a
    relocation does not move it. Each group's result depends on its own
    values only, not on the others in its slab (nor on the slab's padding),
    so the slabs a weight is cut into do not change it."""
    c = lloyd(runs, companded_start(runs, k), iterations)
    if sweeps and k > 1:
        cuts = refine(runs, runs.cuts(c), window, sweeps)
        moved = None
        for _ in range(RELOCATIONS if relocations is None else relocations):
            cuts, moved = relocate(runs, cuts, moved)
            if not bool(moved.any()):
                break
            cuts = refine(runs, cuts, window, min(sweeps, 2), torch.nonzero(moved).squeeze(1))
        b = runs.bounds(cuts)
        c = runs.mean(b[:, :-1], b[:, 1:], c)
    return c


@dataclass
class Quantized:
    lut: torch.Tensor      # (groups, 2**bits) fp16
    indices: torch.Tensor  # weight-shaped, uint8

    @cached_property
    def dense(self) -> torch.Tensor:
        """Weight-shaped fp16: ``lut[indices]``, made when first asked for
        (the direct export stores only the table and the indices)."""
        rows = self.indices.reshape(self.lut.shape[0], -1).long()
        return self.lut.gather(1, rows).reshape(self.indices.shape)


def quantize_slab(groups: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lut (G, k) fp16, indices (G, N) uint8) for the rows of ``groups``:
    from a histogram of their fp16 patterns where that is cheaper than a
    sort (:func:`quantize_counted`, the same result), else sorted; computed
    on the GPU when there is one (not tested here: no GPU on the project's
    machines)."""
    if torch.cuda.is_available() and groups.device.type == "cpu":
        return tuple(t.cpu() for t in quantize_slab(groups.cuda(), k))
    if groups.device.type == "cpu":
        counted = quantize_counted(groups, k)
        if counted is not None:
            return counted
    return quantize_sorted(groups, k)


def quantize_sorted(groups: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_slab` by one sort of each group's fp16 values."""
    xs, order = sort_rows(groups)
    runs = Runs.of_sorted(xs)
    lut = kmeans_sorted(runs, k).half()
    lut = lut.sort(dim=1).values  # fp16 rounding may reorder near-equal centroids
    # nearest entry of the fp16 table: contiguous runs of the sorted row
    return lut, unsort(order, run_ids(runs.positions(runs.cuts(lut)), xs.shape[1]))


def _key_of(value: float) -> int:
    return int(order_keys(np.array([value], dtype=np.float16).view(np.int16))[0])


NEGATIVE_INF_KEY, POSITIVE_INF_KEY = _key_of(-math.inf), _key_of(math.inf)
NEGATIVE_ZERO_KEY, ZERO_KEY = _key_of(-0.0), _key_of(0.0)


def chunks_of(g: int, n: int) -> list[tuple[slice, slice]]:
    """(rows, columns) pieces of a (g, n) slab of about ``CHUNK_VALUES``
    values: whole rows, or pieces of one row when a row is longer (one
    table per tensor)."""
    if n >= CHUNK_VALUES:
        return [(slice(r, r + 1), slice(c, min(c + CHUNK_VALUES, n))) for r in range(g) for c in range(0, n, CHUNK_VALUES)]
    step = CHUNK_VALUES // max(n, 1)
    return [(slice(r, min(r + step, g)), slice(0, n)) for r in range(0, g, step)]


def fp16_keys(groups: torch.Tensor, chunks: list[tuple[slice, slice]]) -> np.ndarray:
    """(G, N) int16: the order keys of ``groups`` rounded to fp16, a chunk
    at a time (torch rounds 3x faster than numpy here)."""
    keys = np.empty(groups.shape, dtype=np.int16)
    for piece in chunks:
        bits = groups[piece].detach().half().numpy().view(np.int16)
        np.bitwise_xor(bits, (bits >> 15) & np.int16(0x7FFF), out=keys[piece])
    return keys


def bin_of(keys: np.ndarray, piece: tuple[slice, slice], low: np.ndarray, span: int) -> np.ndarray:
    """int64 bin of each value of ``keys[piece]`` in the flattened (rows,
    span) histogram of the piece's rows, bin 0 of each row being its key ``low``."""
    rows = piece[0]
    return np.add(keys[piece], (np.arange(rows.stop - rows.start, dtype=np.int64) * span - low[rows])[:, None])


def quantize_counted(groups: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`quantize_slab`'s result from a histogram of each group's fp16
    bit patterns instead of a sort: the same tables and indices, in
    O(values) plus O(bins). A group's bins are the patterns from its
    smallest value to its largest, in order, so its nonzero bins are its
    sorted distinct values with their counts (a bf16 weight has ~2,500 per
    group of 65 K values, an fp16 one ~13,000), and the indices are a lookup
    of each value's bin in a (bin -> table entry) map, not an unsort. The
    histogram and the lookup run ``CHUNK_VALUES`` at a time, so that the
    int64 bin numbers stay in cache.

    None (the sort's turn) when a group spans more than ``BINS_PER_VALUE``
    bins per value (small groups of spread values: sorting is cheaper) or
    holds inf or NaN (which the sort handled before this path existed)."""
    g, n = groups.shape
    chunks = chunks_of(g, n)
    keys = fp16_keys(groups, chunks)
    if not keys.size:
        return None
    low, high = keys.min(axis=1).astype(np.int64), keys.max(axis=1).astype(np.int64)
    span = int((high - low).max()) + 1
    if low.min() <= NEGATIVE_INF_KEY or high.max() >= POSITIVE_INF_KEY or span > BINS_PER_VALUE * n:
        return None
    counts = np.zeros((g, span), dtype=np.int64)
    for piece in chunks:
        rows = piece[0]
        counts[rows] += np.bincount(bin_of(keys, piece, low, span).ravel(),
                                    minlength=(rows.stop - rows.start) * span).reshape(-1, span)
    # -0 and +0 compare equal, so the sort's runs count them as one value
    # (+0 where a group has both)
    signed = np.nonzero((low <= NEGATIVE_ZERO_KEY) & (high >= ZERO_KEY))[0]
    minus, plus = signed * span + NEGATIVE_ZERO_KEY - low[signed], signed * span + ZERO_KEY - low[signed]
    tally = counts.ravel()
    both = (tally[minus] > 0) & (tally[plus] > 0)
    minus, plus = minus[both], plus[both]
    tally[plus] += tally[minus]
    tally[minus] = 0
    flat = np.flatnonzero(counts)  # 2x np.nonzero's speed here
    rows, bins = np.divmod(flat, span)
    per_row = np.bincount(rows, minlength=g)
    start = np.cumsum(per_row) - per_row
    rank = np.arange(len(rows)) - start[rows]
    values = order_keys((bins + low[rows]).astype(np.int16)).view(np.float16).astype(np.float32)
    distinct = int(per_row.max())
    xs = np.repeat(values[start + per_row - 1][:, None], distinct, axis=1)
    xs[rows, rank] = values
    count = np.zeros((g, distinct + 1))
    count[rows, rank + 1] = tally[flat]
    runs = Runs(torch.from_numpy(xs), torch.from_numpy(count))
    lut = kmeans_sorted(runs, k).half().sort(dim=1).values  # as quantize_slab
    entry = np.zeros((g, span), dtype=np.uint8)
    entry.ravel()[flat] = run_ids(runs.cuts(lut), distinct).numpy()[rows, rank]
    entry.ravel()[minus] = entry.ravel()[plus]
    indices = np.empty((g, n), dtype=np.uint8)
    for piece in chunks:
        np.take(entry[piece[0]].ravel(), bin_of(keys, piece, low, span), out=indices[piece])
    return lut, torch.from_numpy(indices)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def workers() -> ThreadPoolExecutor:
    """Threads that quantize slabs side by side, each running torch with one
    thread. k-means issues thousands of small ops; spread over torch's own
    threads they stall as soon as another process wants a core (a 1B MLP
    weight: 9 s per 100 M weights on one thread, 30-90 s on two under load,
    measured), and half the work is numpy, which uses one core anyway."""
    global _pool
    with _pool_lock:
        if _pool is None:
            threads = env_count("ANEMLL_QUANTIZE_THREADS", QUANTIZE_THREADS)
            _pool = ThreadPoolExecutor(max(1, min(threads, os.cpu_count() or 1)),
                                       thread_name_prefix="anemlld-lut", initializer=torch.set_num_threads,
                                       initargs=(1,))
        return _pool


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> Quantized:
    """k-means LUT of ``bits`` per group of ``group_size`` rows (axis 0)."""
    k = 1 << bits
    rows = weight.shape[0]
    g = group_size_for(rows, group_size)
    flat = weight.detach().reshape(rows // g, -1)
    pool = workers()
    # as many slabs on each worker, so that none waits for another's last one
    slabs = pool._max_workers * math.ceil(flat.numel() / (SLAB_VALUES * pool._max_workers))
    step = max(1, math.ceil(flat.shape[0] / slabs))
    done = list(pool.map(lambda start: quantize_slab(flat[start:start + step], k), range(0, flat.shape[0], step)))
    lut, indices = (torch.cat(parts) for parts in zip(*done))
    return Quantized(lut, indices.reshape(weight.shape))


def quantize_module(module: nn.Module, bits: int, group_size: int, kind: type[nn.Module]) -> int:
    """Replace the weight of every ``kind`` submodule (Conv2d, Embedding) by
    its k-means dequantized value, in place. Returns the weights done."""
    done = 0
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, kind):
                q = quantize_weight(sub.weight, bits, group_size)
                sub.weight.copy_(q.dense)
                done += 1
    return done


# --- the MIL side -----------------------------------------------------------

WEIGHT_INPUT = {"conv": "weight", "gather": "x"}


def encode_exact(values: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(lut, indices) in iOS18 ``constexpr_lut_to_dense`` layout for a weight
    whose groups already hold at most ``2**bits`` distinct values."""
    k = 1 << bits
    rows = values.shape[0]
    g = group_size_for(rows, group_size)
    flat = torch.from_numpy(np.ascontiguousarray(values)).reshape(rows // g, -1)
    step = max(1, SLAB_VALUES // flat.shape[1])
    tables, indices = zip(*(encode_slab(flat[i:i + step], k) for i in range(0, flat.shape[0], step)))
    lut_shape = (rows // g,) + (1,) * (values.ndim - 1) + (k, 1)
    np_lut = torch.cat(tables).numpy().astype(values.dtype).reshape(lut_shape)
    return np_lut, torch.cat(indices).numpy().reshape(values.shape)


def encode_slab(groups: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lut (G, k), indices (G, N) uint8) of groups holding at most k values."""
    xs, order = sort_rows(groups)
    new = first_of_each_value(xs)
    distinct = int(new.sum(dim=1).max())
    if distinct > k:
        raise AnemllError(f"a weight group holds {distinct} distinct values, more than a {k.bit_length() - 1}-bit LUT",
                          "this is a converter bug: report it with the model's config.json",
                          stage="quantize", code="quantize_failed")
    rank = new.cumsum(dim=1, dtype=torch.uint8) - 1  # at most 256 distinct: fits
    # Unused entries repeat the group's largest value, so each row stays sorted.
    lut = xs[:, -1:].repeat(1, k)
    lut.scatter_(1, rank.long(), xs)
    return lut, unsort(order, rank)


def index_dtype(bits: int):
    """The numpy dtype of ``bits``-bit LUT indices in a MIL program."""
    from coremltools.converters.mil.mil import types

    return types.nptype_from_builtin(types.string_to_builtin(f"uint{bits}"))


def encode_program(prog, bits: int, group_size: int, op_type: str, scope: str = "") -> int:
    """Replace every dense weight feeding an ``op_type`` op in ``prog`` (a
    pymil Program) with ``constexpr_lut_to_dense``; with ``scope``, only the
    weights whose names start with it (one part of a monolithic model).
    Returns the count."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager

    indices_as = index_dtype(bits)
    weight_input = WEIGHT_INPUT[op_type]

    def is_weight(op) -> bool:
        value = op.outputs[0].val
        if op.op_type != "const" or not isinstance(value, np.ndarray) or value.size < 2 or value.dtype.kind != "f":
            return False
        if not op.name.startswith(scope):
            return False
        uses = op.outputs[0].child_ops
        return bool(uses) and all(u.op_type == op_type and u.inputs.get(weight_input) is op.outputs[0] for u in uses)

    class LutEncode(AbstractGraphPass):
        """Run as a coremltools graph pass, so the new ops get scope info."""

        done = 0

        def apply(self, program):
            @block_context_manager
            def visit(block):
                for op in list(block.operations):
                    for inner in op.blocks:
                        visit(inner)
                    if not is_weight(op):
                        continue
                    table, indices = encode_exact(op.outputs[0].val, bits, group_size)
                    new = mb.constexpr_lut_to_dense(indices=indices.astype(indices_as), lut=table,
                                                    before_op=op, name=op.name + "_lut")
                    block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                                       no_check_var_types=True)
                    block.remove_ops([op])
                    self.done += 1

            for fn in program.functions.values():
                visit(fn)

    encode = LutEncode()
    encode(prog)
    return encode.done
