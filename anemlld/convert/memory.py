"""A conversion's memory: what the plan says it will need at its peak, and
what a process (with its descendants) holds now. No torch here: the daemon
measures its conversion children with it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from anemlld.convert.pipeline import Plan

MB = 1024 * 1024

# Measured with bench/convert_1b.py on the Llama-3.2-1B shape (README): a
# chunk of 8 decoder layers (487 M weights) peaked at 5.26 GiB in its export,
# the LM head (263 M weights) at 5.39 GiB in an earlier run, each with about
# 0.5 GiB of interpreter, torch and coremltools under it. That is 10.5 bytes
# per weight of the chunk being exported (fp16 weights, their fp32 copies in
# the traced graph and in the MIL program, the serialized blob) and 19 for
# the head (its 16 split projections and their logits add copies). Rounded
# up so that a slightly larger shape still fits what we asked for.
# Chunks are now exported directly (convert/program.py): bench/export_paths.py
# measured a 4-layer 1B-shaped chunk (243 M weights) at 1,323 MB, 3.3 bytes
# per weight over the base (the quantizer's working memory over the
# quantized chunk). The monolithic export still goes through the frontend.
BASE_BYTES = 512 * MB
BYTES_PER_CHUNK_WEIGHT = 4
BYTES_PER_FRONTEND_CHUNK_WEIGHT = 11
# The 1B run after that change peaked at 3.49 GB in the LM head's export:
# 11.4 bytes per head weight over the base; 13 leaves room for larger heads.
BYTES_PER_END_WEIGHT = 13  # embeddings or LM head: the head is the costly one
# The k-means works on slabs of groups, its temporaries (sort order, runs,
# prefix sums) bounded by the slab; a LUT of one table per tensor ("6,0") is
# one group, so one slab however large the weight. Measured (quantize_weight,
# random fp16 weights, 4 and 6 bits, one table each): 23.1-23.4 bytes per
# weight over the weight itself from 17 M to 67 M weights, linear (27.6 at
# 4 M, where fixed costs count); one table per 16 channels stayed at 14 bytes
# per weight at 34 M and no longer grows. Rounded up.
BYTES_PER_TENSOR_KMEANS_WEIGHT = 28


def per_tensor_kmeans(plan: "Plan") -> tuple[str, int, int] | None:
    """The most costly weight k-means'd with one table per tensor: (its
    option, its weights, bytes resident at that moment), None without any."""
    from anemlld.convert.models.base import split_sizes

    args, o = plan.args, plan.options
    ends = args.vocab_size * args.hidden_size
    layer = max(args.intermediate_size, args.num_attention_heads * args.head_dim) * args.hidden_size
    chunk = max(len(r) for r in plan.chunk_ranges) * args.layer_params
    whole = 2 * ends + args.num_hidden_layers * args.layer_params
    # each weight, and what else of its part is held (fp16) while it is clustered
    weights = {"lut_embeddings": (ends, whole if o.monolithic else ends),
               "lut_ffn": (layer, whole if o.monolithic else chunk),  # a direct chunk holds less: an upper bound
               "lut_lm_head": (max(split_sizes(args.vocab_size, plan.lm_head_split)) * args.hidden_size,
                               whole if o.monolithic else ends)}  # the head's splits are tensors of their own
    found = [(option, w, BASE_BYTES + BYTES_PER_TENSOR_KMEANS_WEIGHT * w + 2 * held)
             for option, (w, held) in weights.items() if getattr(o, option) and o.group_size(option) == 0]
    return max(found, key=lambda f: f[2]) if found else None


def peak_estimate(plan: "Plan") -> int:
    """Bytes of resident memory the conversion of ``plan`` is expected to
    peak at: the process's base plus the export of its largest part, or a
    per-tensor k-means if that costs more."""
    tensor = per_tensor_kmeans(plan)
    return max(_export_peak(plan), tensor[2] if tensor else 0)


def _export_peak(plan: "Plan") -> int:
    args = plan.args
    largest_chunk = max(len(r) for r in plan.chunk_ranges) * args.layer_params
    end = args.vocab_size * args.hidden_size
    # every chunk holds the whole model's KV state (fp16), traced in fp32
    state = 2 * args.num_hidden_layers * args.num_key_value_heads * plan.options.context_length \
        * args.head_dim * 4
    if plan.options.monolithic:  # every part in the one export
        return BASE_BYTES + BYTES_PER_FRONTEND_CHUNK_WEIGHT * largest_chunk + state + 2 * BYTES_PER_END_WEIGHT * end
    return BASE_BYTES + max(BYTES_PER_CHUNK_WEIGHT * largest_chunk + state, BYTES_PER_END_WEIGHT * end)


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
