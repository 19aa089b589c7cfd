"""What a conversion will cost before it starts: each part's size, the disk
it needs, its peak memory and its time on this machine, from per-weight
rates; and, while it runs, the time left from the rate measured so far.

Every part is exported directly (convert/program.py): its functions traced
and converted without weights, then each weight read, quantized and
stored once for all of them. The rates were measured with
bench/convert_1b.py on the development machine (Linux x86-64, 2 cores,
load average about 1; README's 1B and 8B tables, 2026-12-01 18:18-18:20),
pooled over the Llama-3.2-1B shape (46.7 s) and the Llama-3.1-8B shape
(175 s): k-means 116.9 s for 8,740 M weights, load 8.1 s for 9,529 M,
export of the chunks 53.2 s for 7,952 M and of the embeddings and heads
11.8 s for 1,575 M, each less a fixed cost per exported function and per
quantized part (measured on the trained pico model, 4 M weights), which
is what a tiny model's conversion mostly is. Another
machine scales them; ``ANEMLL_CONVERT_SPEED`` (a factor, 2 = twice as fast)
corrects the estimate for one that is known to be faster or slower.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anemlld.convert import memory
from shared.errors import BadInput

if TYPE_CHECKING:
    from anemlld.convert.pipeline import Plan

MB = 1024 * 1024
FIXED_SECONDS = {"export": 1.5, "quantize": 0.7, "load": 0.0}  # per exported function, per quantized part
SECONDS_PER_MILLION = {"quantize": (20.0 - 3 * 0.7 + 102.5 - 5 * 0.7) / (1236 + 7504),
                       "load": (2.1 + 6.0) / (1499 + 8030)}
# Export, per million weights of the part (all its functions at once): the
# decoder layers' and the embeddings' or LM head's.
EXPORT_PER_MILLION = {"layers": (16.6 - 4 * 1.5 + 54.6 - 8 * 1.5) / (973 + 6979),
                      "ends": (6.9 - 2 * 1.5 + 10.9 - 2 * 1.5) / (525 + 1050)}
SPEED_ENV = "ANEMLL_CONVERT_SPEED"
# The progress bar's weights per unit of work, relative to exporting a layer weight.
QUANTIZE_WEIGHT = SECONDS_PER_MILLION["quantize"] / EXPORT_PER_MILLION["layers"]


def bytes_per_weight(bits: int | None) -> float:
    return 2.0 if bits is None else bits / 8


@dataclass(frozen=True)
class Part:
    name: str
    weights: int
    bits: int | None
    functions: int  # traced and converted once each (chunks: infer and prefill)
    layer_weights: int = 0  # of ``weights``, those of decoder layers (the rest: embeddings, LM head)

    @property
    def bytes(self) -> int:
        return int(self.weights * bytes_per_weight(self.bits))


@dataclass(frozen=True)
class Estimate:
    parts: list[Part]
    chunk_layers: list[range]
    disk_bytes: int
    peak_bytes: int
    stage_seconds: dict[str, float]

    @property
    def output_bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def seconds(self) -> float:
        return sum(self.stage_seconds.values())


def parts(plan: "Plan") -> list[Part]:
    """The parts a plan makes, in the order they are built."""
    args, o = plan.args, plan.options
    ends = args.vocab_size * args.hidden_size
    argmax = 1 if o.argmax_in_model else 0  # an argmax function beside the logits
    if o.monolithic:  # one package; sized at the FFN's LUT (the bulk of it)
        layers = args.num_hidden_layers * args.layer_params
        return [Part(plan.parts[0], 2 * ends + layers, o.lut_ffn, 2 + argmax, layers)]
    chunks = [Part(name, len(r) * args.layer_params, o.lut_ffn, 2, len(r) * args.layer_params)
              for name, r in zip(plan.parts[1:-1], plan.chunk_ranges)]
    return [Part(plan.parts[0], ends, o.lut_embeddings, 1), *chunks,
            Part(plan.parts[-1], ends, o.lut_lm_head, 1 + argmax)]


def check_part_sizes(plan: "Plan") -> None:
    """No part larger than ``max_chunk_mb`` goes out unannounced (iOS maps
    at most about 1 GB per file): the chunks are sized to it by ``chunks =
    "auto"``; the embeddings and the LM head are one file each, so one over
    it is refused here, before any work, with the LUT that brings it under."""
    limit = plan.options.max_chunk_mb
    if plan.options.monolithic:  # checked as a whole by the plan
        return
    for part, key in ((parts(plan)[0], "lut_embeddings"), (parts(plan)[-1], "lut_lm_head")):
        size = part.bytes / MB
        if size <= limit:
            continue
        fits = [b for b in (8, 6, 4) if part.weights * b / 8 / MB <= limit and (part.bits is None or b < part.bits)]
        fix = (f"set {key} = {fits[0]} ({part.weights * fits[0] / 8 / MB:.0f} MB; --{key.replace('_', '-')} "
               f"{fits[0]} on the command line, {key} = {fits[0]} in the sidecar's [convert] table)"
               if fits else f"no LUT brings it under {limit} MB")
        raise BadInput(f"{part.name} would be {size:.0f} MB, above max_chunk_mb = {limit} (iOS maps at most "
                       f"about 1 GB per file)", f"{fix}, or raise max_chunk_mb if the model only runs on macOS",
                       stage="inspect")


def check_memory(plan: "Plan") -> None:
    """A conversion whose peak exceeds the machine's memory would only ever
    wait for memory (the daemon) or meet the out-of-memory killer: refused
    here, before any work. The usual cause is a LUT of one table per tensor
    ("6,0") on a large weight, whose k-means cannot work in slabs."""
    need, have = memory.peak_estimate(plan), memory.total()
    if need <= have:
        return
    tensor = memory.per_tensor_kmeans(plan)
    what = f"converting {plan.source.path.name} needs about {memory.gb(need)} at its peak, more than this " \
           f"machine's {memory.gb(have)}"
    if tensor and tensor.peak >= need:
        option, weights = tensor.option, tensor.weights
        bits = getattr(plan.options, option)
        fix = (f"give {option} a group size (\"{bits},16\", or plain {bits}: a table per 16 output channels, "
               f"which k-means in bounded slabs: about {memory.gb(tensor.grouped())}), or "
               if tensor.grouped() <= have else "")
        raise BadInput(f"{what}: {option} = \"{bits},0\" clusters one table over {weights / 1e6:.0f} M weights "
                       f"at once (about {memory.BYTES_PER_TENSOR_KMEANS_WEIGHT} bytes each)",
                       f"{fix}convert on a machine with more memory", stage="inspect")
    raise BadInput(what, "convert on a machine with more memory, or use smaller chunks (a lower max_chunk_mb)",
                   stage="inspect")


def disk_bytes(plan: "Plan") -> int:
    """The output, and two copies of its largest part while that is saved
    (coremltools' temporary package, and ours written beside its final name,
    then renamed), and that part's weights spilled until then
    (convert/spill.py: a byte per LUT index, two per fp16 weight)."""
    spilled = max(part.weights * (1 if part.bits else 2) for part in parts(plan))
    return plan.estimated_bytes + 2 * max(part.bytes for part in parts(plan)) + spilled


def speed() -> float:
    raw = os.environ.get(SPEED_ENV, "1")
    try:
        factor = float(raw)
    except ValueError:
        factor = math.nan
    if not math.isfinite(factor) or factor <= 0:
        raise BadInput(f"{SPEED_ENV} = {raw!r} is not a positive number",
                       f"set {SPEED_ENV} to how many times faster than the reference machine this one converts "
                       "(2 = twice as fast), or unset it", stage="inspect")
    return factor


def estimate(plan: "Plan") -> Estimate:
    ps = parts(plan)
    quantized = [p for p in ps if p.bits]
    seconds = {
        "load": sum(p.weights for p in ps) / 1e6 * SECONDS_PER_MILLION["load"],
        "quantize": len(quantized) * FIXED_SECONDS["quantize"]
        + sum(p.weights for p in quantized) / 1e6 * SECONDS_PER_MILLION["quantize"],
        "export": sum(p.functions * FIXED_SECONDS["export"] + p.layer_weights / 1e6 * EXPORT_PER_MILLION["layers"]
                      + (p.weights - p.layer_weights) / 1e6 * EXPORT_PER_MILLION["ends"] for p in ps),
    }
    factor = speed()
    seconds = {stage: s / factor for stage, s in seconds.items()}
    return Estimate(ps, plan.chunk_ranges, disk_bytes(plan), memory.peak_estimate(plan), seconds)


def describe(plan: "Plan", est: Estimate) -> list[str]:
    """``anemlld convert --estimate``: lines for a person."""
    args = plan.args
    lines = [f"{plan.architecture}: {args.num_hidden_layers} layers, hidden {args.hidden_size}, "
             f"vocabulary {args.vocab_size}; context {plan.options.context_length}, "
             f"batch {plan.options.batch_size}", "", "part                                           size"]
    for part, layers in zip(est.parts, [None, *est.chunk_layers, None]):
        what = f"  (layers {layers.start}-{layers.stop - 1})" if layers is not None else ""
        lut = f"LUT {part.bits}" if part.bits else "fp16"
        lines.append(f"{part.name:<44} {part.bytes / MB:7.0f} MB  {lut}{what}")
    lines += ["", f"output       {est.output_bytes / MB:8.0f} MB",
              f"disk needed  {est.disk_bytes / MB:8.0f} MB (the output, and two copies of its largest part and its spilled "
              "weights while it is saved)",
              f"peak memory  {memory.gb(est.peak_bytes)}",
              f"time         {format_seconds(est.seconds)} on the reference machine"
              + (f" / {speed():g}" if speed() != 1 else "") + ": "
              + ", ".join(f"{k} {format_seconds(v)}" for k, v in est.stage_seconds.items())]
    return lines


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


class TimeLeft:
    """Seconds left, from the rate of the work done so far in this run
    (reused parts count as done but not as measured); before any work is
    measured, from the plan's estimate."""

    def __init__(self, total_weight: float, prior_seconds: float):
        self.total, self.prior = total_weight, prior_seconds
        self.measured_weight = self.measured_seconds = 0.0

    def add(self, weight: float, seconds: float) -> None:
        self.measured_weight += weight
        self.measured_seconds += seconds

    def left(self, done_weight: float) -> float:
        remaining = max(0.0, self.total - done_weight)
        if self.measured_weight <= 0:
            return self.prior * remaining / self.total if self.total else 0.0
        return self.measured_seconds / self.measured_weight * remaining
