"""Our LUT k-means (anemlld.convert.lut.quantize_weight) against coremltools'
k-means, side by side in one run.

What is measured, per weight and per LUT size (default 4 and 6 bits, groups
of 8 output rows, as palettize_weights(mode="kmeans",
granularity="per_grouped_channel", group_size=8) does it):

- ours: seconds for the whole weight, passed as the converter passes it (an
  fp32 tensor holding fp16 values), median of --repeats runs after a warm-up,
  as the converter runs it (slabs of groups on two threads, one torch thread
  each). Reported as seconds per 100 M weights. Timed: the table and the
  indices, what the converter stores and what coremltools' function below
  returns. The dense copy (``Quantized.dense``, made on demand, which only
  the torch frontend's route reads) is timed apart: column "dense".
- coremltools: ``_get_kmeans_lookup_table_and_weight(nbits, group)`` on fp16
  numpy groups, the function palettize_weights calls once per group. It is
  slow, so it runs on --ct-groups groups chosen at random (seeded) and the
  time is EXTRAPOLATED per weight to 100 M weights; the table says so. For
  fp16 groups of at least 10,000 values coremltools uses its exact 1-D
  k-means (column "ct algo" = kmeans1d), for smaller groups scikit-learn
  (sklearn), one process.
- speedup = coremltools s/100M / ours s/100M.
- MSE: mean squared error of the dequantized weight against the fp16 weight,
  both computed on the same sampled groups; "MSE ratio" = ours / theirs
  (below 1: ours reconstructs better). ``ours MSE (all)`` covers every group.

Weights: random normal (std 0.02, fp16, seeded) of Llama-3.2-1B's MLP shapes
(down_proj 2048x8192, gate/up 8192x2048); the down_proj rounded to bf16 (what
a bf16 checkpoint holds: ~2,500 distinct values per group of 65 K), and that
times a per-column factor in [0.5, 1.5] (a norm folded into it: no longer
bf16 values, ~13,000 distinct per group; no converted architecture folds one
into a projection today, so this is the worst case, not a real one); trained
weights of
examples/pico-llama. The last section times the public palettize_weights
route on a one-conv model, as a check that the direct call is what it costs
(and with num_kmeans_workers=2, the most coremltools can get from 2 cores).

Targets (brief): ours >= 20x faster; MSE ratio <= 1.02.

Run: .venv/bin/python bench/quantizer.py [--bits 4,6] [--group-size 8]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch
from common import REPO, load_average, print_header, quiet_coremltools, table

PICO = REPO / "examples" / "pico-llama" / "model.safetensors"
PICO_WEIGHTS = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
                "model.layers.2.self_attn.q_proj.weight", "lm_head.weight")
PER_100M = 1e8


@dataclass
class Row:
    name: str
    shape: tuple[int, ...]
    bits: int
    group_size: int
    ours_s100m: float
    ct_s100m: float
    ct_groups: int
    groups: int
    ct_algo: str
    ours1_s100m: float    # ours on one thread
    dense_s100m: float    # making the dense copy from the table and indices
    ours_min_s100m: float  # fastest of the timed runs (least disturbed by other processes)
    mse_ours: float       # on the sampled groups
    mse_ct: float         # on the sampled groups
    mse_ours_all: float   # on every group
    ours_cpu_s100m: float  # CPU seconds of the process (both threads), median
    ct_cpu_s100m: float

    @property
    def cpu_speedup(self) -> float:
        return self.ct_cpu_s100m / self.ours_cpu_s100m

    @property
    def speedup(self) -> float:
        return self.ct_s100m / self.ours_s100m

    @property
    def mse_ratio(self) -> float:
        return self.mse_ours / self.mse_ct


def random_weight(rows: int, cols: int, seed: int, std: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.empty(rows, cols, dtype=torch.float16).normal_(0.0, std, generator=g)


def time_ours(weight16: torch.Tensor, bits: int, group_size: int, repeats: int, min_seconds: float = 0.5,
              threads: int | None = None):
    """(median seconds per call, Quantized, fastest call, median CPU seconds
    of the process per call) for our quantizer on
    the whole weight; with ``threads``, its slabs run on that many threads
    (default: two, each with one torch thread)."""
    from concurrent.futures import ThreadPoolExecutor

    from anemlld.convert import lut

    default = lut.workers()
    if threads:
        lut._pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        return _time_ours(lut.quantize_weight, weight16, bits, group_size, repeats, min_seconds)
    finally:
        if lut._pool is not default:
            lut._pool.shutdown()
        lut._pool = default


def _time_ours(quantize_weight, weight16, bits, group_size, repeats, min_seconds):
    w = weight16.float()  # the converter's modules are fp32 holding fp16 values
    quantize_weight(w[: min(w.shape[0], 4 * group_size)], bits, group_size)  # warm-up
    times, cpu, q = [], [], None
    t_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_all < min_seconds and len(times) < 200):
        t, c = time.perf_counter(), time.process_time()
        q = quantize_weight(w, bits, group_size)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(times), q, min(times), statistics.median(cpu)


def ct_algorithm(values_per_group: int) -> str:
    from coremltools._deps import _HAS_KMEANS1D
    return "kmeans1d" if values_per_group >= 10_000 and _HAS_KMEANS1D else "sklearn"


def sample_groups(n_groups: int, want: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_groups, size=min(want, n_groups), replace=False))


def time_coremltools(weight16: torch.Tensor, bits: int, group_size: int, groups: np.ndarray):
    """(seconds per weight, dequantized groups (n, group_size*cols) fp16, CPU
    seconds per weight) for
    coremltools' k-means run on the chosen groups only."""
    quiet_coremltools()
    from coremltools.models.neural_network.quantization_utils import (
        _get_kmeans_lookup_table_and_weight,
    )

    wn = weight16.numpy().reshape(weight16.shape[0] // group_size, -1)
    out = np.empty((len(groups), wn.shape[1]), dtype=np.float16)
    elapsed = cpu = 0.0
    for j, gi in enumerate(groups):
        # the same slice palettize_weights hands over: group_size rows, fp16
        part = np.ascontiguousarray(weight16.numpy()[gi * group_size:(gi + 1) * group_size])
        t, c = time.perf_counter(), time.process_time()
        lut, idx = _get_kmeans_lookup_table_and_weight(bits, part)
        lut, idx = lut.astype(part.dtype), idx.astype(np.uint8)  # as palettize_weights does
        elapsed += time.perf_counter() - t
        cpu += time.process_time() - c
        out[j] = lut.reshape(-1)[idx.reshape(-1)]
    return elapsed / (len(groups) * wn.shape[1]), out, cpu / (len(groups) * wn.shape[1])


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def measure(name: str, weight16: torch.Tensor, bits: int, group_size: int, ct_groups: int, repeats: int,
            seed: int, one_thread: bool = True) -> Row:
    rows = weight16.shape[0]
    n_groups = rows // group_size
    t_ours, q, t_min, c_ours = time_ours(weight16, bits, group_size, repeats)
    t = time.perf_counter()
    q.dense
    t_dense = time.perf_counter() - t
    t_one = time_ours(weight16, bits, group_size, repeats, threads=1)[0] if one_thread else float("nan")
    chosen = sample_groups(n_groups, ct_groups, seed)
    s_per_w, theirs, c_per_w = time_coremltools(weight16, bits, group_size, chosen)
    ref = weight16.numpy().reshape(n_groups, -1)
    ours = q.dense.numpy().reshape(n_groups, -1)
    return Row(name, tuple(weight16.shape), bits, group_size, t_ours / weight16.numel() * PER_100M,
               s_per_w * PER_100M, len(chosen), n_groups, ct_algorithm(ref.shape[1]),
               t_one / weight16.numel() * PER_100M, t_dense / weight16.numel() * PER_100M,
               t_min / weight16.numel() * PER_100M,
               mse(ours[chosen], ref[chosen]), mse(theirs, ref[chosen]), mse(ours, ref),
               c_ours / weight16.numel() * PER_100M, c_per_w * PER_100M)


def weights(seed: int, pico: bool, bf16: bool = True) -> list[tuple[str, torch.Tensor]]:
    out = [("randn mlp.down 1B", random_weight(2048, 8192, seed)),
           ("randn mlp.gate 1B", random_weight(8192, 2048, seed + 1))]
    if bf16:
        # Llama-3.2-1B ships bf16: its weights as fp16 hold far fewer distinct values per group
        bf16 = random_weight(2048, 8192, seed).to(torch.bfloat16)
        out.append(("randn mlp.down 1B bf16", bf16.to(torch.float16)))
        norm = torch.rand(8192, generator=torch.Generator().manual_seed(seed + 2)) + 0.5
        out.append(("randn mlp.down 1B bf16*norm", (bf16.float() * norm).to(torch.float16)))
    if pico and PICO.exists():
        from safetensors import safe_open
        with safe_open(str(PICO), framework="pt") as f:
            for key in PICO_WEIGHTS:
                out.append(("pico " + key.replace("model.layers.", "L").replace(".weight", ""),
                            f.get_tensor(key).to(torch.float16).contiguous()))
    return out


def palettize_check(weight16: torch.Tensor, bits: int, group_size: int, out_rows: int, workers: int,
                    ours: Row) -> list[str]:
    """Time the public palettize_weights route on a one-conv model built from
    the first ``out_rows`` rows of ``weight16``."""
    ct = quiet_coremltools()
    import warnings

    from coremltools.optimize.coreml import (
        OpPalettizerConfig,
        OptimizationConfig,
        decompress_weights,
        palettize_weights,
    )

    w = weight16[:out_rows]
    conv = torch.nn.Conv2d(w.shape[1], out_rows, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w.float()[:, :, None, None])
    # coremltools' progress bars (stderr) would bury the numbers
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(conv.eval(), torch.zeros(1, w.shape[1], 1, 1))
        model = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, w.shape[1], 1, 1))],
                           convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                           compute_precision=ct.precision.FLOAT16, skip_model_load=True)
        cfg = OptimizationConfig(global_config=OpPalettizerConfig(
            mode="kmeans", nbits=bits, granularity="per_grouped_channel", group_size=group_size,
            num_kmeans_workers=workers))
        # coremltools 8.3 closes its class-level worker pool when a pass object is
        # deleted but keeps the closed pool for the next call ("Pool not running")
        from coremltools.optimize.coreml import _quantization_passes as qp
        if qp.palettize_weights._compress_pool is not None:
            qp.palettize_weights._compress_pool.terminate()
            qp.palettize_weights._compress_pool = None
        t = time.perf_counter()
        pal = palettize_weights(model, cfg)
        dt = time.perf_counter() - t
        dense = decompress_weights(pal)
    consts = [op.outputs[0].val for fn in dense._mil_program.functions.values() for op in fn.operations
              if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)
              and op.outputs[0].val.size == w.numel()]
    rate = dt / w.numel() * PER_100M
    lines = [(f"  {bits}-bit, conv {out_rows}x{w.shape[1]} ({out_rows // group_size} groups), "
             f"num_kmeans_workers={workers}: palettize_weights {dt:.2f} s = {rate:.1f} s/100M "
             f"(direct call above: {ours.ct_s100m:.1f} s/100M, ratio {rate / ours.ct_s100m:.2f}; "
             f"ours {ours.ours_s100m:.1f} s/100M, speedup vs this route {rate / ours.ours_s100m:.1f}x)")]
    if consts:
        rec = consts[0].reshape(w.shape).astype(np.float16)
        from anemlld.convert.lut import quantize_weight
        ours_rows = quantize_weight(w.float(), bits, group_size).dense.numpy()
        m_ct, m_ours = mse(rec, w.numpy()), mse(ours_rows, w.numpy())
        lines.append(f"    MSE via palettize_weights {m_ct:.4e}, ours on the same rows {m_ours:.4e} "
                     f"(ratio {m_ours / m_ct:.4f})")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="4,6", help="comma-separated LUT sizes (default 4,6)")
    ap.add_argument("--group-size", default="8", help="comma-separated output rows per LUT (default 8; "
                    "the converter's default lut_group_size is 16)")
    ap.add_argument("--ct-groups", type=int, default=64, help="groups coremltools' k-means runs on per "
                    "weight, then extrapolated (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of ours per weight (median; default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-pico", action="store_true", help="skip the trained pico-llama weights")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16-rounded copies of the 1B down_proj")
    ap.add_argument("--only", default="", help="comma-separated substrings: measure only the weights whose "
                    "names contain one (e.g. 'bf16' for both bf16 rows)")
    ap.add_argument("--no-one-thread", action="store_true",
                    help="skip timing ours again on one thread (the 'ours 1thr' column)")
    ap.add_argument("--no-palettize-check", action="store_true",
                    help="skip timing the public palettize_weights route")
    ap.add_argument("--palettize-rows", type=int, default=128,
                    help="output channels of the one-conv model for the palettize_weights check")
    a = ap.parse_args(argv)
    bits_list = [int(b) for b in a.bits.split(",")]
    group_sizes = [int(g) for g in a.group_size.split(",")]

    print_header("bench/quantizer.py: our LUT k-means vs coremltools' k-means", argv)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    ws = weights(a.seed, not a.no_pico, not a.no_bf16)
    if a.only:
        ws = [(name, w) for name, w in ws if any(part in name for part in a.only.split(","))]
    rows: list[Row] = []
    for g in group_sizes:
        for bits in bits_list:
            for name, w in ws:
                r = measure(name, w, bits, g, a.ct_groups, a.repeats, a.seed, not a.no_one_thread)
                rows.append(r)
                print(f"  measured {name} {bits}-bit g{g}: ours {r.ours_s100m:.1f} s/100M "
                      f"(1 thread {r.ours1_s100m:.1f}), coremltools {r.ct_s100m:.1f} s/100M "
                      f"(load avg {load_average()})", flush=True)
    print()
    print("coremltools column: timed on 'ct groups' of the weight's groups and EXTRAPOLATED per weight to 100 M;")
    print("ours: the whole weight's table and indices, median ('ours min': fastest) of runs, two threads (the")
    print("default); 'ours 1thr': median with its slabs on one thread; 'dense': making lut[indices] afterwards.")
    print("MSE columns on the same sampled groups, against the fp16 weight. speedup = ct / ours (two threads).")
    print("CPU columns: CPU seconds per 100M of the process (ours: both threads), less disturbed by other")
    print("processes than the wall clock when the machine is busy; CPU ratio = ct CPU / ours CPU.")
    print()
    body = [[r.name, "x".join(map(str, r.shape)), str(r.bits), str(r.group_size), f"{r.ours_s100m:.1f}",
             f"{r.ours_min_s100m:.1f}", f"{r.ours1_s100m:.1f}", f"{r.dense_s100m:.2f}", f"{r.ct_s100m:.1f}", f"{r.ct_groups}/{r.groups}", r.ct_algo, f"{r.speedup:.1f}x",
             f"{r.mse_ours:.4e}", f"{r.mse_ct:.4e}", f"{r.mse_ratio:.4f}", f"{r.mse_ours_all:.4e}",
             f"{r.ours_cpu_s100m:.1f}", f"{r.ct_cpu_s100m:.1f}", f"{r.cpu_speedup:.1f}x"]
            for r in rows]
    print(table(body, ["weight", "shape", "bits", "g", "ours s/100M", "ours min", "ours 1thr", "dense", "ct s/100M", "ct groups", "ct algo",
                       "speedup", "ours MSE", "ct MSE", "MSE ratio", "ours MSE (all)", "ours CPU", "ct CPU",
                       "CPU ratio"]))
    print()
    print("targets: speedup >= 20x, MSE ratio <= 1.02 on the fp16 and the bf16 random 1B-shaped weights (the bf16")
    print("row is what a real Llama-3.2-1B checkpoint holds); the bf16*norm and pico rows: no regression")
    for g in group_sizes:
        for bits in bits_list:
            sel = [r for r in rows if r.bits == bits and r.group_size == g]
            for label, names in (("1B fp16", ("randn mlp.down 1B", "randn mlp.gate 1B")),
                                 ("1B bf16", ("randn mlp.down 1B bf16",)),
                                 ("bf16*norm", ("randn mlp.down 1B bf16*norm",)),
                                 ("pico", tuple(r.name for r in sel if r.name.startswith("pico")))):
                part = [r for r in sel if r.name in names]
                if not part:
                    continue
                ours = sum(r.ours_s100m for r in part) / len(part)
                best = sum(r.ours_min_s100m for r in part) / len(part)
                theirs = sum(r.ct_s100m for r in part) / len(part)
                worst = max(part, key=lambda r: r.mse_ratio)
                cpu_ratio = sum(r.ct_cpu_s100m for r in part) / sum(r.ours_cpu_s100m for r in part)
                print(f"  {bits}-bit g{g} {label:9s}: ours {ours:6.1f} (fastest runs {best:5.1f}) vs coremltools "
                      f"{theirs:7.1f} s/100M -> {theirs / ours:5.1f}x (fastest {theirs / best:5.1f}x) "
                      f"[{'MET' if theirs / ours >= 20 else 'NOT MET'}]; worst MSE ratio {worst.mse_ratio:.4f} "
                      f"[{'MET' if worst.mse_ratio <= 1.02 else 'NOT MET'}]; CPU ratio {cpu_ratio:.1f}x")
    if not a.no_palettize_check:
        print()
        print("public route check: coremltools.optimize.coreml.palettize_weights on a one-conv model "
              f"(first {a.palettize_rows} rows of '{ws[0][0]}', fp16, g{group_sizes[0]})")
        for bits in bits_list:
            ref = next(r for r in rows if r.bits == bits and r.group_size == group_sizes[0] and r.name == ws[0][0])
            for workers in (1, 2):
                for line in palettize_check(ws[0][1], bits, group_sizes[0], a.palettize_rows, workers, ref):
                    print(line, flush=True)
    print()
    print(f"load avg at end {Path('/proc/loadavg').read_text().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
