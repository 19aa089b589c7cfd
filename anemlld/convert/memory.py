"""A conversion's memory: what the plan says it will need at its peak, and
what a process (with its descendants) holds now. No torch here: the daemon
measures its conversion children with it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from anemlld.convert.pipeline import Plan

MB = 1024 * 1024

# Every part is exported directly (convert/program.py) and each weight, once
# quantized, waits on disk until its package is written (convert/spill.py):
# what a part holds at its peak is the process's base, the quantizer's
# working memory (two slabs of groups in flight) and the weight being read
# (the checkpoint's tensor, its fp16 copy, its indices), whatever the part's
# size. The embeddings and the LM head read their whole checkpoint tensor
# once (the head's splits are its rows). Measured with bench/convert_1b.py
# on the Llama-3.2-1B shape (README, load average 3.6): a chunk of 8 layers
# (486 M weights) peaked at 1.36 GiB, the LM head (263 M weights, LUT 6) at
# 1.80 GiB sampled, 1.87 GiB high-water mark; the embeddings (fp16) at 1.38 GiB.
BASE_BYTES = 512 * MB
QUANTIZER_BYTES = 900 * MB
BYTES_PER_WEIGHT_READ = 6   # the largest single weight of a chunk
BYTES_PER_END_WEIGHT = 6    # embeddings or LM head: (1.87 GiB - base) / 263 M = 5.6
# The k-means works on slabs of groups of at most 8 M values, two at a time
# (lut.SLAB_VALUES, QUANTIZE_THREADS), keeping each slab's outputs (table,
# uint8 indices, fp16 values: 3 bytes per weight, and their concatenation).
# Measured with quantize_weight on random fp16 weights, 6 bits, over the
# weight itself: groups of 16 x 256 channels (embeddings-shaped, 17-67 M
# weights) 808-1,211 MB, about 70 bytes per value of the two slabs plus 6
# per weight; groups of 16 x 4096, 13 per slab value. A LUT of one table per
# tensor ("6,0") is one group, so one slab however large the weight: 23.0-23.4
# bytes per weight from 17 M to 525 M weights (Llama-3.1-8B's embeddings,
# 128256 x 4096: 12.09 GB, 97 s) at 4, 6 and 8 bits, linear (27.6 at 4 M,
# where fixed costs count); 28 leaves room for the rest of a conversion: a
# 67 M-weight embeddings conversion at "6,0" peaked at 2.36 GB, estimated
# 2.38 GB below (2.12 with 24); at "6", 2.01-2.10 GB,
# estimated 2.04 GB (at 134 M weights the grouped k-means held 881 MB: the
# slab term is an upper bound).
BYTES_PER_SLAB_VALUE, SLAB_VALUES, KMEANS_OUTPUT_BYTES = 70, 2 * 8_000_000, 6
# A direct part quantizes a weight a block of whole groups at a time
# (program._quantized_blocks), each block's indices spilled before the next:
# the outputs held are a block's. Llama-3.1-8B's embeddings at LUT 8 (525 M
# weights): peak 2.68 GB measured, estimated 2.88 GB below.
QUANTIZE_BLOCK_VALUES = 32 * 1024 * 1024
BYTES_PER_TENSOR_KMEANS_WEIGHT = 28


@dataclass(frozen=True)
class Kmeans:
    option: str     # lut_embeddings, lut_ffn, lut_lm_head
    weights: int    # of the largest tensor that option quantizes
    per_tensor: bool
    peak: int       # bytes resident while it is clustered

    def grouped(self) -> int:
        """The peak of the same k-means with a table per group of channels."""
        return _kmeans_peak(self.weights, False)


def kmeans_peaks(plan: "Plan") -> list[Kmeans]:
    """The k-means of each LUT's largest tensor and the memory it peaks at."""
    args, o = plan.args, plan.options
    ends = args.vocab_size * args.hidden_size
    layer = max(args.intermediate_size, args.num_attention_heads * args.head_dim) * args.hidden_size
    # each option's largest tensor: the direct route holds nothing else of its part while it is clustered
    # (the weights done wait on disk, convert/spill.py), so a part's size does not count here
    weights = {"lut_embeddings": ends, "lut_ffn": layer,
               "lut_lm_head": -(-args.vocab_size // plan.lm_head_split) * args.hidden_size}  # the largest split
    found = []
    for option, w in weights.items():
        if not getattr(o, option):
            continue
        tensor = o.group_size(option) == 0
        found.append(Kmeans(option, w, tensor, _kmeans_peak(w, tensor)))
    return found


def _kmeans_peak(weights: int, per_tensor: bool) -> int:
    """The process's base, the k-means' work and the tensor itself in fp16."""
    return BASE_BYTES + _kmeans_work(weights, per_tensor) + 2 * weights


def _kmeans_work(weights: int, per_tensor: bool) -> int:
    if per_tensor:
        return BYTES_PER_TENSOR_KMEANS_WEIGHT * weights
    return BYTES_PER_SLAB_VALUE * min(weights, SLAB_VALUES) + KMEANS_OUTPUT_BYTES * min(weights,
                                                                                     QUANTIZE_BLOCK_VALUES)


def per_tensor_kmeans(plan: "Plan") -> Kmeans | None:
    """The most costly k-means of a LUT with one table per tensor, if any."""
    return max((k for k in kmeans_peaks(plan) if k.per_tensor), key=lambda k: k.peak, default=None)


def peak_estimate(plan: "Plan") -> int:
    """Bytes of resident memory the conversion of ``plan`` is expected to
    peak at: the process's base plus its costliest part (a monolithic
    model's too: its parts' weights are read one at a time all the same),
    or a k-means if that costs more."""
    return max([_export_peak(plan), *(k.peak for k in kmeans_peaks(plan))])


def _export_peak(plan: "Plan") -> int:
    args = plan.args
    largest_weight = args.hidden_size * max(args.intermediate_size, args.num_attention_heads * args.head_dim)
    end = args.vocab_size * args.hidden_size
    # every chunk holds the whole model's KV state (fp16), traced in fp32
    state = 2 * args.num_hidden_layers * args.num_key_value_heads * plan.options.context_length \
        * args.head_dim * 4
    return BASE_BYTES + max(QUANTIZER_BYTES + BYTES_PER_WEIGHT_READ * largest_weight + state,
                            BYTES_PER_END_WEIGHT * end)


def available() -> int:
    """Bytes the system can give a new process without swapping."""
    return psutil.virtual_memory().available


def total() -> int:
    """Bytes of memory this machine has."""
    return psutil.virtual_memory().total


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (xcrun's compiler, say);
    0 once it is gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"
