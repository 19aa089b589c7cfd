"""End-to-end conversion of a Llama-3.2-1B-shaped model (or, with --model
gemma-3-1b, a Gemma-3-1B-shaped one): wall time per stage, peak resident
memory, output sizes, and a coremltools k-means baseline measured in the same
run.

What it does:

1. Writes (once; reused when present, see --workdir) a Hugging Face folder
   shaped like Llama-3.2-1B (REFERENCE.md section 3: hidden 2048,
   intermediate 8192, 16 layers, 32/8 heads, head_dim 64, vocab 128256,
   llama3 rope scaling, tied embeddings) with random weights: built tensor by
   tensor directly in --dtype (bf16 by default, like the published checkpoint)
   from a seeded generator, std 0.02, norms 1.0, one model.safetensors, the
   tokenizer copied from examples/pico-llama (its 4096-token vocabulary does
   not match; the converter is expected not to care). Gemma-3-1B's shape
   (its public config.json: hidden 1152, intermediate 6912, 26 layers, 4/1
   heads, head_dim 256, vocab 262144, a window of 512 on five layers in six,
   tied embeddings) has its four norms per layer and q/k norms, at zero (its
   norms scale by 1 + weight); it converts at context 1024 by default, so
   that the window binds, and its conversion includes the fp16-range
   calibration (convert/calibrate.py).
2. Baseline: coremltools' k-means (``_get_kmeans_lookup_table_and_weight``,
   what palettize_weights runs per group) timed on --baseline-groups groups
   sampled from this model's own weights, as fp16, at the converter's group
   size, then EXTRAPOLATED to every weight the conversion quantizes (FFN at
   lut_ffn bits, LM head at lut_lm_head bits). Measured before the conversion
   so the two do not share the CPU.
3. Runs ``anemlld.convert.pipeline.convert`` in a child process (this same
   script with --child) with LUT 4 FFN / 6 head / none embeddings, 2 chunks,
   context 512, batch 64. The child logs every progress event with a
   timestamp; the parent samples the child's resident memory (VmRSS of it and
   its descendants, from /proc) every --sample-seconds, reads the kernel's
   high-water mark (VmHWM; the child reads its own at the end: the peak the targets use) and,
   after exit, getrusage(RUSAGE_CHILDREN).ru_maxrss (which includes the parent's RSS at fork).
   Above --rss-limit-gb the child is killed and the report says where.
4. Prints: the event timeline with the peak RSS inside each step, seconds per
   stage (Result.stage_seconds and the manifest), total, peak RSS, size of
   each output part, each part's weight.bin against its weights stored once
   (every function of a part is built over one copy of them: no combine),
   and quantize time against the coremltools baseline.

Targets (issue 14): Llama-3.2-1B shape end to end <= 90 s and peak RSS <= 3 GB;
Llama-3.1-8B shape (--model llama-3.1-8b: hidden 4096, 32 layers, MLP 14336,
untied head, five bf16 shards, about 16 GB written; run with --chunks auto)
<= 15 min and <= 4 GB; the disk used during the run is reported too.
Every part: weight.bin <= 1.01 x its weights stored once.

Run: .venv/bin/python bench/convert_1b.py [--model gemma-3-1b] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    REPO,
    load_average,
    meminfo_gb,
    print_header,
    quiet_coremltools,
    table,
)

GB = 1024 ** 3
MB = 1024 ** 2
PICO = REPO / "examples" / "pico-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


GEMMA3_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vocab_size": 262144,
}

# Llama-3.1-8B's public config.json: untied LM head, five shards as published
LLAMA8_CONFIG = dict(CONFIG, head_dim=128, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     tie_word_embeddings=False)

# --model -> (its name, its config.json, the value its norm weights are written with, default context)
MODELS = {"llama-3.2-1b": ("Llama-3.2-1B", CONFIG, 1.0, 512),
          "gemma-3-1b": ("Gemma-3-1B", GEMMA3_CONFIG, 0.0, 1024),
          "llama-3.1-8b": ("Llama-3.1-8B", LLAMA8_CONFIG, 1.0, 512)}
SHARDS = {"llama-3.1-8b": 5}  # safetensors files the folder is written in (default one)
# issue 14's targets per shape: (end to end seconds, peak resident GB)
TARGETS = {"llama-3.2-1b": (90, 3.0), "llama-3.1-8b": (900, 4.0)}


# --- the model folder --------------------------------------------------------

def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q = cfg["num_attention_heads"] * hd
    kv = cfg["num_key_value_heads"] * hd
    gemma = cfg["model_type"] == "gemma3_text"
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
        if gemma:
            out += [(p + "pre_feedforward_layernorm.weight", (h,)), (p + "post_feedforward_layernorm.weight", (h,)),
                    (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", True):
        out.append(("lm_head.weight", (v, h)))
    return out


def model_config(dtype_name: str, layers: int, vocab: int, model: str = "llama-3.2-1b") -> dict:
    return dict(MODELS[model][1], num_hidden_layers=layers, vocab_size=vocab,
                torch_dtype={"bf16": "bfloat16", "fp16": "float16"}[dtype_name])


def write_model(folder: Path, dtype_name: str, seed: int, layers: int, vocab: int, model: str = "llama-3.2-1b"
                ) -> float:
    """The random ``model``-shaped folder; returns seconds spent. Each tensor
    is drawn directly in the target dtype: the state dict peaks at the size of
    the checkpoint (2.5 GB), never an fp32 copy of it."""
    import torch
    from safetensors.torch import save_file

    t = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    cfg = model_config(dtype_name, layers, vocab, model)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(cfg)
    shards = SHARDS.get(model, 1)
    per_shard = -(-sum(math_prod(s) for _, s in shapes) // shards)  # elements, by running total
    files, weight_map, state, filled = [], {}, {}, 0

    def flush() -> None:
        name = "model.safetensors" if shards == 1 else f"model-{len(files) + 1:05d}-of-{shards:05d}.safetensors"
        tmp = folder / (name + ".partial")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.rename(folder / name)
        files.append(name)
        weight_map.update({k: name for k in state})
        state.clear()

    for name, shape in shapes:  # one shard in memory at a time
        if len(shape) == 1:
            state[name] = torch.full(shape, MODELS[model][2], dtype=dtype)
        else:
            state[name] = torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)
        filled += math_prod(shape)
        if filled >= per_shard * (len(files) + 1) and len(files) < shards - 1:
            flush()
    flush()
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum((folder / f).stat().st_size for f in files)}, "weight_map": weight_map},
            indent=2))
    for f in TOKENIZER_FILES:
        shutil.copy2(PICO / f, folder / f)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": True,
         "temperature": 0.6, "top_p": 0.9}, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))  # last: marks the folder complete
    return time.perf_counter() - t


def model_is_ready(folder: Path, dtype_name: str, layers: int, vocab: int, model: str = "llama-3.2-1b") -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if cfg != model_config(dtype_name, layers, vocab, model):
        return False
    if SHARDS.get(model, 1) == 1:
        return (folder / "model.safetensors").is_file()
    try:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    return all((folder / f).is_file() for f in set(index["weight_map"].values()))


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def get_tensor(folder: Path, name: str):
    """One tensor of the (possibly sharded) checkpoint."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(folder / file), framework="pt") as f:
        return f.get_tensor(name)


def math_prod(shape) -> int:
    import math
    return math.prod(shape)


# --- the coremltools baseline -----------------------------------------------

def baseline(folder: Path, bits_ffn: int | None, bits_head: int | None, group_size: int, groups: int, seed: int,
             layers: range, lm_head_split: int) -> dict:
    """coremltools' k-means seconds, extrapolated to the weights the conversion
    quantizes, from a sample of this model's own weights."""
    import numpy as np
    import torch

    quiet_coremltools()
    from coremltools.models.neural_network.quantization_utils import (
        _get_kmeans_lookup_table_and_weight,
    )

    cfg = json.loads((folder / "config.json").read_text())
    rng = np.random.default_rng(seed)
    out = {"bits": (bits_ffn, bits_head), "rows": [], "ffn_seconds": 0.0, "head_seconds": 0.0, "ffn_weights": 0, "head_weights": 0}

    def rate(tensor: torch.Tensor, bits: int, label: str) -> float:
        w = tensor.to(torch.float16).numpy()  # palettize_weights sees the fp16 program's weights
        g = math_gcd(w.shape[0], group_size)
        n = w.shape[0] // g
        chosen = np.sort(rng.choice(n, size=min(groups, n), replace=False))
        t = time.perf_counter()
        for gi in chosen:
            _get_kmeans_lookup_table_and_weight(bits, np.ascontiguousarray(w[gi * g:(gi + 1) * g]))
        dt = time.perf_counter() - t
        per_w = dt / (len(chosen) * g * w.shape[1])
        out["rows"].append([label, "x".join(map(str, w.shape)), str(bits), str(g), f"{len(chosen)}/{n}",
                            f"{dt:.1f}", f"{per_w * 1e8:.1f}"])
        return per_w

    if True:
        if bits_ffn:
            # one layer's projections stand for all (same shapes, same distribution)
            p = "model.layers.0."
            per_layer = 0.0
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                t = get_tensor(folder, p + name + ".weight")
                r = rate(t, bits_ffn, "L0." + name)
                per_layer += r * t.numel()
                out["ffn_weights"] += t.numel() * len(layers)
            out["ffn_seconds"] = per_layer * len(layers)
        if bits_head:
            emb = get_tensor(folder, "model.embed_tokens.weight" if cfg.get("tie_word_embeddings", True)
                             else "lm_head.weight")
            from anemlld.convert.models.base import split_sizes
            start, total = 0, 0.0
            sizes = split_sizes(cfg["vocab_size"], lm_head_split)
            r = None
            for n in sizes:
                if r is None or math_gcd(n, group_size) != math_gcd(sizes[0], group_size):
                    r = rate(emb[start:start + n], bits_head, f"lm_head split ({n} rows)")
                total += r * n * emb.shape[1]
                start += n
            out["head_seconds"] = total
            out["head_weights"] = emb.numel()
    return out


def math_gcd(a: int, b: int) -> int:
    import math
    return math.gcd(a, b)


# --- the child: the conversion itself ----------------------------------------

def child(src: str, out: str, options_json: str, events: str) -> int:
    """Runs in the measured process: convert, logging each event with its time."""
    with open(events, "a", buffering=1) as log:
        return _convert_logged(src, out, options_json, log)


def _convert_logged(src: str, out: str, options_json: str, log) -> int:
    import resource as res

    def emit(kind: str, **kw) -> None:
        rss_mb = _status_kb(os.getpid(), "VmRSS") / 1024
        log.write(json.dumps({"t": time.time(), "kind": kind, "rss_mb": rss_mb, **kw}) + "\n")

    emit("start")
    from anemlld.convert import pipeline
    from shared.options import ConvertOptions

    opts = ConvertOptions(**json.loads(options_json))
    emit("imported")

    def progress(p) -> None:
        emit("progress", stage=p.stage, part=p.part, fraction=p.fraction, message=p.message)

    try:
        r = pipeline.convert(src, out, options=opts, progress=progress)
    except BaseException as e:  # report, then fail
        emit("error", error=f"{type(e).__name__}: {e}")
        raise
    ru = res.getrusage(res.RUSAGE_SELF)
    emit("result", seconds=r.seconds, stage_seconds=r.stage_seconds, reused=r.reused, compiled=r.compiled,
         note=r.compile_note, utime=ru.ru_utime, stime=ru.ru_stime, maxrss_kb=ru.ru_maxrss,
         hwm_kb=_status_kb(os.getpid(), "VmHWM"))
    return 0


def _tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _weights_bytes(pkg: Path) -> int:
    return sum(f.stat().st_size for f in pkg.rglob("weight.bin"))


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                pass
    return out


# --- the parent: measure ------------------------------------------------------

def run_child(src: Path, out: Path, options: dict, events: Path, interval: float, limit_gb: float,
              log_path: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(src), str(out), json.dumps(options),
           str(events)]
    samples = []  # (t, rss_kb incl. children, MemAvailable GB, loadavg1)
    hwm_kb = 0
    free0, disk_peak = shutil.disk_usage(out.parent).free, 0
    killed = None
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
        while proc.poll() is None:
            rss = sum(_status_kb(p, "VmRSS") for p in _descendants(proc.pid))
            hwm_kb = max(hwm_kb, _status_kb(proc.pid, "VmHWM"))
            samples.append((time.time(), rss, meminfo_gb("MemAvailable"), float(load_average().split()[0])))
            disk_peak = max(disk_peak, free0 - shutil.disk_usage(out.parent).free)
            if rss > limit_gb * GB / 1024 and killed is None:
                killed = f"RSS {rss / 1024 / 1024:.1f} GB above --rss-limit-gb {limit_gb}"
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(interval)
        rc = proc.wait()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"rc": rc, "samples": samples, "hwm_kb": hwm_kb, "ru_maxrss_kb": ru.ru_maxrss, "killed": killed,
            "disk_peak_gb": disk_peak / GB,
            "wall": time.time() - t0, "cpu": ru.ru_utime + ru.ru_stime}


def read_events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def report(run: dict, events: list[dict], out: Path, base: dict | None, t_model: float | None,
           child_log: Path, targets: tuple[float, float] = (600, 6.0), plan=None) -> None:
    samples = run["samples"]
    t_start = next((e["t"] for e in events if e["kind"] == "start"), samples[0][0] if samples else 0)
    prog = [e for e in events if e["kind"] == "progress"]
    result = next((e for e in events if e["kind"] == "result"), None)
    error = next((e for e in events if e["kind"] == "error"), None)
    t_end = samples[-1][0] if samples else time.time()

    def peak_between(a: float, b: float) -> tuple[float, float]:
        # the samples inside the step, and the last one before it (short steps may hold none)
        inside = [s for s in samples if a <= s[0] <= b] + [s for s in samples if s[0] < a][-1:]
        if not inside:
            return float("nan"), float("nan")
        return max(s[1] for s in inside) / 1024 / 1024, min(s[2] for s in inside)

    print("timeline (child process; t from child start; RSS incl. descendants, sampled):")
    rows = []
    imported = next((e for e in events if e["kind"] == "imported"), None)
    steps = ([("import torch/coremltools", "", t_start, imported["t"])] if imported else [])
    marks = [(e["stage"], e["part"] + (f" - {e['message']}" if e["message"] else ""), e["t"]) for e in prog]
    for i, (stage, part, t) in enumerate(marks):
        nxt = marks[i + 1][2] if i + 1 < len(marks) else t_end
        steps.append((stage, part, t, nxt))
    first = imported["t"] if imported else t_start
    if marks and marks[0][2] > first + 1:
        steps.insert(1 if imported else 0, ("plan (before first event)", "", first, marks[0][2]))
    for stage, part, a, b in steps:
        peak, avail = peak_between(a, b)
        rows.append([f"{a - t_start:7.1f}", f"{b - a:7.1f}", stage, part[:70], f"{peak:6.2f}", f"{avail:5.1f}"])
    print(table(rows, ["t s", "dur s", "stage", "part", "peak RSS GB", "min avail GB"]))
    print("  (a step lasts until the next event: an 'export' step includes saving that package)")
    print()

    if result:
        ss = result["stage_seconds"]
        total = result["seconds"]
        rows = [[k, f"{v:.1f}", f"{100 * v / total:.0f}%"] for k, v in sorted(ss.items(), key=lambda kv: -kv[1])]
        other = total - sum(ss.values())
        rows.append(["(saving packages, plan, other)", f"{other:.1f}", f"{100 * other / total:.0f}%"])
        rows.append(["TOTAL (Result.seconds)", f"{total:.1f}", "100%"])
        print("seconds per stage (Result.stage_seconds):")
        print(table(rows, ["stage", "seconds", "share"]))
        try:
            manifest = json.loads((out / "anemlld.json").read_text())
            print(f"  manifest anemlld.json stage_seconds: {manifest.get('stage_seconds')}")
        except (OSError, ValueError) as e:
            print(f"  manifest unreadable: {e}")
        print(f"  child CPU {result['utime'] + result['stime']:.0f} s (user {result['utime']:.0f}, "
              f"sys {result['stime']:.0f}) over {total:.0f} s wall = {(result['utime'] + result['stime']) / total:.2f}"
              f" cores busy on average")
        print()
        # per part: time between its first and last event
        per_part: dict[str, float] = {}
        for stage, part, a, b in steps:
            key = part.split(" (")[0].split(" - ")[0]
            if stage in ("load", "quantize", "export", "combine") and key:
                per_part[key] = per_part.get(key, 0.0) + (b - a)
        print("wall seconds per part (event to next event):")
        print(table([[k, f"{v:.1f}"] for k, v in per_part.items()], ["part", "seconds"]))
        print()

    print("memory:")
    peak_sampled = max((s[1] for s in samples), default=0) / 1024 / 1024
    print(f"  peak RSS sampled every {run['interval']:.1f} s (child + descendants): {peak_sampled:.2f} GB")
    print(f"  VmHWM of the child (kernel high-water mark, last read): {run['hwm_kb'] / 1024 / 1024:.2f} GB")
    if result and result.get("hwm_kb"):
        print(f"  VmHWM of the child read by itself at the end: {result['hwm_kb'] / 1024 / 1024:.2f} GB "
              "(the conversion's peak)")
    print(f"  getrusage(RUSAGE_CHILDREN).ru_maxrss after exit: {run['ru_maxrss_kb'] / 1024 / 1024:.2f} GB (Linux "
          "carries the parent's RSS at fork into the child's ru_maxrss across exec: an upper bound, not the peak)")
    if samples:
        top = max(samples, key=lambda s: s[1])
        where = [s for s in steps if s[2] <= top[0] <= s[3]]
        if where:
            print(f"  peak sampled at t={top[0] - t_start:.0f} s, during: {where[0][0]} {where[0][1]}")
        print(f"  lowest MemAvailable on the machine during the run: {min(s[2] for s in samples):.1f} GB; "
              f"load average 1 min: min {min(s[3] for s in samples):.2f}, max {max(s[3] for s in samples):.2f}, "
              f"mean {sum(s[3] for s in samples) / len(samples):.2f}")
    if run["killed"]:
        print(f"  KILLED: {run['killed']}")
    print()

    if error or run["rc"] != 0:
        print(f"CONVERSION FAILED (exit {run['rc']}): {error['error'] if error else 'see child log'}")
        print(f"child log ({child_log}), last lines:")
        print("\n".join(child_log.read_text().splitlines()[-30:]))
        print()

    if out.exists():
        print(f"output {out}:")
        rows = []
        for pkg in sorted(out.glob("*.mlpackage")):
            rows.append([pkg.name, f"{_tree_bytes(pkg) / MB:.1f}", f"{_weights_bytes(pkg) / MB:.1f}"])
        others = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        rows.append(["(meta.yaml, manifest, tokenizer, config)", f"{others / MB:.1f}", ""])
        rows.append(["TOTAL", f"{_tree_bytes(out) / MB:.1f}", ""])
        print(table(rows, ["part", "MB", "weight.bin MB"]))
        meta = out / "meta.yaml"
        if meta.exists():
            vocab = [line.strip() for line in meta.read_text().splitlines() if "vocab" in line]
            print(f"  meta.yaml: {', '.join(vocab)} (tokenizer copied from pico-llama has 4096 tokens)")
        print()
    if out.exists() and plan is not None:
        # every function of a part is built over one copy of its weights: its
        # weight.bin against those weights stored once (LUT indices at their
        # bits or fp16; the tables, norms and rope tables are the rest)
        print("each part's weight.bin against its weights stored once:")
        rows, worst = [], 0.0
        from anemlld.convert import estimate

        for part in estimate.parts(plan):
            pkg = out / f"{part.name}.mlpackage"
            if pkg.exists():
                ratio = _weights_bytes(pkg) / part.bytes
                worst = max(worst, ratio)
                rows.append([part.name, f"{part.weights / 1e6:.1f}", f"{part.bytes / MB:.1f}",
                             f"{_weights_bytes(pkg) / MB:.1f}", f"{ratio:.4f}"])
        print(table(rows, ["part", "M weights", "once MB", "weight.bin MB", "ratio"]))
        print(f"  target weight.bin / weights once <= 1.01: {'MET' if worst <= 1.01 else 'NOT MET'} "
              f"(worst {worst:.4f})")
        print()

    if base is not None:
        print("baseline: coremltools k-means on sampled groups of this model's weights (fp16), EXTRAPOLATED:")
        print(table(base["rows"], ["weight sampled", "shape", "bits", "g", "groups timed", "seconds",
                                   "s/100M"]))
        q = result["stage_seconds"].get("quantize", float("nan")) if result else float("nan")
        q_parts = {}
        for stage, part, a, b in steps:
            if stage == "quantize":
                q_parts[part] = q_parts.get(part, 0.0) + (b - a)
        q_ffn = sum(v for k, v in q_parts.items() if "FFN" in k)
        q_head = sum(v for k, v in q_parts.items() if "lm_head" in k)
        bf, bh = base["ffn_seconds"], base["head_seconds"]
        print(f"  FFN  ({base['ffn_weights'] / 1e6:.0f} M weights): coremltools {bf:.0f} s "
              f"(x2 = {2 * bf:.0f} s if infer and prefill are palettized separately, as ANEMLL does); "
              f"ours {q_ffn:.1f} s -> {bf / q_ffn if q_ffn else float('nan'):.1f}x")
        print(f"  head ({base['head_weights'] / 1e6:.0f} M weights): coremltools {bh:.0f} s; "
              f"ours {q_head:.1f} s -> {bh / q_head if q_head else float('nan'):.1f}x")
        print(f"  all k-means: coremltools {bf + bh:.0f} s vs ours (stage 'quantize') {q:.1f} s -> "
              f"{(bf + bh) / q if q else float('nan'):.1f}x")
        ref_rate = {4: 144.0, 6: 504.0}  # REFERENCE.md section 2: fp16 weights, groups of 8, s/100M
        bits_ffn, bits_head = base["bits"]
        ref = (base["ffn_weights"] * ref_rate.get(bits_ffn, float("nan")) if bits_ffn else 0.0) / 1e8 + \
              (base["head_weights"] * ref_rate.get(bits_head, float("nan")) if bits_head else 0.0) / 1e8
        print(f"  for comparison, REFERENCE.md's rates (144 / 504 s/100M at 4 / 6 bits, fp16 1024x2048 weight, g8) "
              f"give {ref:.0f} s for these weights: {ref / q if q else float('nan'):.1f}x ours")
        if result:
            est = result["seconds"] - q + bf + bh
            print(f"  the same conversion with coremltools' k-means instead of ours would take about "
                  f"{est:.0f} s ({est / 60:.1f} min) against {result['seconds']:.0f} s: "
                  f"{est / result['seconds']:.2f}x")
        print()

    print("targets:")
    limit_s, limit_gb = targets
    if result:
        total = result["seconds"]
        print(f"  end to end <= {limit_s} s: {total:.0f} s -> {'MET' if total <= limit_s else 'NOT MET'} "
              f"({total / limit_s:.2f} of the budget)")
    else:
        print(f"  end to end <= {limit_s} s: no result (conversion did not finish)")
    # the child's own high-water mark; without it (a failed run), the upper bound
    hwm = (result or {}).get("hwm_kb")
    peak = max(hwm / 1024 / 1024 if hwm else run["ru_maxrss_kb"] / 1024 / 1024, peak_sampled)
    print(f"  peak RSS <= {limit_gb} GB: {peak:.2f} GB -> {'MET' if peak <= limit_gb else 'NOT MET'} "
          f"({peak / limit_gb:.2f} of the budget)")
    if run.get("disk_peak_gb") is not None:
        print(f"  disk: the checkpoint {run['checkpoint_gb']:.2f} GB, plus at most {run['disk_peak_gb']:.2f} GB more "
              f"used on its file system during the conversion (free space sampled: other writers count too)")
    if t_model is not None:
        print(f"  (writing the random model took {t_model:.0f} s, not counted)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(*argv[1:5])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where the model and the output go (default: a new temp dir, "
                    "removed at the end unless --keep); an existing model there is reused")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--model", choices=sorted(MODELS), default="llama-3.2-1b", help="the shape (default llama-3.2-1b)")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="checkpoint dtype (default bf16)")
    ap.add_argument("--layers", type=int, help="decoder layers (default the model's: 16 Llama, 26 Gemma)")
    ap.add_argument("--vocab-size", type=int,
                    help="vocabulary (default the model's: 128256, 262144; smaller only for a quick smoke run)")
    ap.add_argument("--chunks", default="2")
    ap.add_argument("--context-length", type=int, help="default 512 (Llama), 1024 (Gemma: its window is 512)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lut-ffn", default="4")
    ap.add_argument("--lut-lm-head", default="6")
    ap.add_argument("--lut-embeddings", default="none")
    ap.add_argument("--baseline-groups", type=int, default=16,
                    help="groups per weight timed for the coremltools baseline (0 = skip; default 16)")
    ap.add_argument("--sample-seconds", type=float, default=0.5, help="RSS sampling interval (default 0.5)")
    ap.add_argument("--rss-limit-gb", type=float, default=20.0, help="kill the conversion above this RSS")
    ap.add_argument("--max-chunk-mb", type=int, help="the converter's part-size limit (default its own, 950; "
                    "the 8B shape's fp16 embeddings are 1,002 MB: raise it or use --lut-embeddings 8)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    title, cfg, _, context = MODELS[a.model]
    a.layers = a.layers or cfg["num_hidden_layers"]
    a.vocab_size = a.vocab_size or cfg["vocab_size"]
    a.context_length = a.context_length or context

    print_header(f"bench/convert_1b.py: {title}-shaped conversion, time and memory", argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="anemlld-bench-1b-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = "" if (a.layers, a.vocab_size) == (cfg["num_hidden_layers"], cfg["vocab_size"]) \
        else f"-{a.layers}L-v{a.vocab_size}"
    src = work / f"{title}-random-{a.dtype}{shape}"
    out = work / "out"
    t_model = None
    if model_is_ready(src, a.dtype, a.layers, a.vocab_size, a.model):
        print(f"model: reusing {src}")
    else:
        shutil.rmtree(src, ignore_errors=True)
        t_model = write_model(src, a.dtype, a.seed, a.layers, a.vocab_size, a.model)
        print(f"model: wrote {src} in {t_model:.0f} s")
    size = sum(f.stat().st_size for f in checkpoint_files(src))
    print(f"  {len(checkpoint_files(src))} safetensors file(s), {size / GB:.2f} GB ({a.dtype}); parent RSS now "
          f"{_status_kb(os.getpid(), 'VmRSS') / 1024 / 1024:.2f} GB (the parent is not the measured process)")

    from shared.options import ConvertOptions
    options = {"context_length": a.context_length, "batch_size": a.batch_size, "chunks": a.chunks,
               "lut_ffn": a.lut_ffn, "lut_lm_head": a.lut_lm_head, "lut_embeddings": a.lut_embeddings}
    if a.max_chunk_mb:
        options["max_chunk_mb"] = a.max_chunk_mb
    opts = ConvertOptions(**options)
    print(f"options: {opts.to_mapping()}")
    print()

    base = None
    if a.baseline_groups > 0 and (opts.lut_ffn or opts.lut_lm_head):
        from anemlld.convert.models import DEFAULT_LM_HEAD_SPLIT, MODEL_TYPES
        print(f"baseline: timing coremltools' k-means on {a.baseline_groups} groups per weight ...", flush=True)
        t = time.perf_counter()
        base = baseline(src, opts.lut_ffn, opts.lut_lm_head, opts.lut_group_size, a.baseline_groups, a.seed,
                        range(a.layers), DEFAULT_LM_HEAD_SPLIT[MODEL_TYPES[cfg["model_type"]]])
        print(f"  done in {time.perf_counter() - t:.0f} s (load avg {load_average()})")
        print()

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    events = work / "events.jsonl"
    events.unlink(missing_ok=True)
    child_log = work / "child.log"
    print(f"converting in a child process (events {events}, log {child_log}; load avg {load_average()}) ...",
          flush=True)
    run = run_child(src, out, options, events, a.sample_seconds, a.rss_limit_gb, child_log)
    run["interval"] = a.sample_seconds
    print(f"  child exited {run['rc']} after {run['wall']:.0f} s (load avg {load_average()})")
    print()
    run["checkpoint_gb"] = size / GB
    from anemlld.convert import pipeline
    plan = pipeline.plan(src, opts)
    plan.source.close()
    report(run, read_events(events), out, base, t_model, child_log, TARGETS.get(a.model, (600, 6.0)), plan)
    if a.workdir is None and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 0 if run["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
