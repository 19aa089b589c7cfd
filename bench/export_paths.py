"""One FFN chunk of the Llama-3.2-1B shape exported both ways, in one run:
the torch frontend's route (trace with the weights, ``ct.convert``, LUT
encoding of the converted program: ``export.export_chunk``) against the
direct route (``program.DirectPart``: trace with the weights lifted out,
each weight quantized straight into ``constexpr_lut_to_dense``).

What it does:

1. Writes (once; reused, see --workdir) Llama-3.2-1B-shaped folders of each
   --layers count with random bf16 weights (bench/convert_1b.py's writer; a
   256-token vocabulary, since a chunk holds no embeddings).
2. For each layer count and route, in a child process of its own (so the
   peak resident memory, getrusage's ru_maxrss, is that export's and nothing
   else's): load or read the chunk's weights, k-means them (LUT 4, group 16
   as the conversion does), export ``infer`` and ``prefill``, save both and
   combine them into one package, as ``pipeline.convert`` does for a chunk.
   Each step's seconds and the peak RSS after it are reported by the child.
3. Prints both routes per layer count with the ratios old / new, the
   per-layer slope (from the smallest and largest layer counts), the
   combined package sizes, and the load average before and after.

Run: .venv/bin/python bench/export_paths.py [--layers 2 4] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, load_average, print_header, table  # noqa: E402
from convert_1b import model_is_ready, write_model  # noqa: E402

ROUTES = ("frontend", "direct")
CTX, BATCH, BITS, GROUP, VOCAB = 512, 64, 4, 16, 256
MB = 1024 ** 2


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(route: str, folder: str, out: str) -> int:
    """One route on one folder; prints a JSON line of step -> (seconds, peak MB)."""
    from torch import nn

    from anemlld.convert import export, lut, program
    from anemlld.convert.models import ARCHITECTURES, build
    from anemlld.convert.models.base import weights_loaded_later
    from anemlld.convert.source import HFSource

    export._ct()
    steps = {"imports": (0.0, peak_mb())}
    source = HFSource.open(folder)
    args = ARCHITECTURES["llama"].model_args(source.config)
    layers = range(args.num_hidden_layers)
    shapes = export.Shapes(args.hidden_size, CTX, BATCH)
    out_dir = Path(out)

    def step(name, fn, *a):
        t = time.perf_counter()
        result = fn(*a)
        steps[name] = (time.perf_counter() - t, peak_mb())
        return result

    target = out_dir / "chunk.mlpackage"
    if route == "frontend":
        with weights_loaded_later():
            lm = build("llama", args, layers=layers, embeddings=False, lm_head=False, context_length=CTX)
        step("load", lm.load_weights, source.get)
        source.close()
        step("quantize", lut.quantize_module, lm, BITS, GROUP, nn.Conv2d)
        table_ = export.Lut(BITS, GROUP, "conv")
        paths = {}
        for fn, prefill in ((export.INFER, False), (export.PREFILL, True)):
            model = step(f"export {fn}", export.export_chunk, lm, shapes, prefill, table_)
            paths[fn] = out_dir / f"{fn}.mlpackage"
            step(f"save {fn}", model.save, str(paths[fn]))
            del model
        step("combine", export.combine, paths, target, {"bench": route}, "bench")
    else:
        chunk = step("load", lambda: program.DirectPart("llama", args, CTX, source.get, source.close, layers=layers,
                                                        embeddings=False, lm_head=False))
        step("quantize", chunk.read, {export.LAYERS_SCOPE: (BITS, GROUP)})
        model = step("export infer+prefill", chunk.export, export.chunk_function, shapes,
                     {export.INFER: {"prefill": False}, export.PREFILL: {"prefill": True}})
        step("save combined", model.save, str(target))
    size = sum(f.stat().st_size for f in (out_dir / "chunk.mlpackage").rglob("*") if f.is_file())
    print(json.dumps({"steps": steps, "bytes": size}))
    return 0


def run_child(route: str, folder: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", route, str(folder), str(out)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{route} on {folder.name} failed:\n{proc.stderr[-3000:]}")
    print(proc.stdout.strip().splitlines()[-1], flush=True)  # the raw figures, should the report fail
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["wall"] = wall
    doc["peak"] = max(mb for _, mb in doc["steps"].values())
    doc["work"] = sum(s for s, _ in doc["steps"].values())
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="chunk sizes to measure (at most 4 here)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "anemlld-bench-export")
    ap.add_argument("--child", nargs=3, metavar=("ROUTE", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    print_header("export of one FFN chunk: torch frontend vs direct (Llama-3.2-1B shape, LUT 4)")
    print(f"context {CTX}, batch {BATCH}, LUT {BITS} bits per group of {GROUP}, bf16 checkpoint\n")
    results: dict[tuple[int, str], dict] = {}
    for n in a.layers:
        folder = a.workdir / f"llama1b-{n}layers"
        if not model_is_ready(folder, "bf16", n, VOCAB):
            shutil.rmtree(folder, ignore_errors=True)
            write_model(folder, "bf16", 0, n, VOCAB)
        for route in ROUTES:
            out = a.workdir / f"out-{n}-{route}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"{n} layers, {route} route ... (load avg {load_average()})", flush=True)
            results[n, route] = run_child(route, folder, out)
            shutil.rmtree(out, ignore_errors=True)

    for n in a.layers:
        rows = []
        for r in ROUTES:
            for s, (sec, mb) in results[n, r]["steps"].items():
                rows.append([r, s, f"{sec:.1f}", f"{mb:.0f}"])
        old, new = (results[n, r] for r in ROUTES)
        for r, d in zip(ROUTES, (old, new)):
            rows.append([r, "total", f"{d['work']:.1f}", f"{d['peak']:.0f}"])
        print(f"\n{n} layers (seconds; peak RSS in MB after each step)")
        print(table(rows, ["route", "step", "seconds", "peak MB"]))
        export_s = lambda d: sum(v[0] for k, v in d["steps"].items()  # noqa: E731
                                 if k.startswith(("export", "save", "combine")))
        print(f"ratios old/new: time {old['work'] / new['work']:.2f}x (export, save and combine alone "
              f"{export_s(old) / export_s(new):.2f}x), peak RSS {old['peak'] / new['peak']:.2f}x; "
              f"package {old['bytes'] / MB:.1f} MB vs {new['bytes'] / MB:.1f} MB")
    if len(a.layers) > 1:
        lo, hi = min(a.layers), max(a.layers)
        print(f"\nper added layer ({lo} -> {hi} layers):")
        for r in ROUTES:
            dt = (results[hi, r]["work"] - results[lo, r]["work"]) / (hi - lo)
            dm = (results[hi, r]["peak"] - results[lo, r]["peak"]) / (hi - lo)
            print(f"  {r:9s} {dt:6.1f} s  {dm:7.0f} MB peak")
    print(f"\nload avg after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
