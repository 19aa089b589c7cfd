"""A conversion's memory: what the plan says it will need at its peak, and
what a process (with its descendants) holds now. No torch here: the daemon
measures its conversion children with it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from anemlld.convert.pipeline import Plan

MB = 1024 * 1024

# Every part is exported directly (convert/program.py): what a part holds at
# its peak is its quantized weights (the output being written), the weight
# being read (the checkpoint's tensor and its fp16 copy) and the quantizer's
# temporaries. bench/export_paths.py measured a 4-layer 1B-shaped chunk (243 M
# weights) at 1,323 MB, 3.3 bytes per weight over the base. END_NOTE
BASE_BYTES = 512 * MB
BYTES_PER_CHUNK_WEIGHT = 4
BYTES_PER_END_WEIGHT = 13  # embeddings or LM head


def peak_estimate(plan: "Plan") -> int:
    """Bytes of resident memory the conversion of ``plan`` is expected to
    peak at: the process's base plus the export of its largest part."""
    args = plan.args
    largest_chunk = max(len(r) for r in plan.chunk_ranges) * args.layer_params
    end = args.vocab_size * args.hidden_size
    # every chunk holds the whole model's KV state (fp16), traced in fp32
    state = 2 * args.num_hidden_layers * args.num_key_value_heads * plan.options.context_length \
        * args.head_dim * 4
    if plan.options.monolithic:  # every part in the one export: both ends' weights beside the layers'
        return BASE_BYTES + BYTES_PER_CHUNK_WEIGHT * largest_chunk + state + 2 * BYTES_PER_END_WEIGHT * end
    return BASE_BYTES + max(BYTES_PER_CHUNK_WEIGHT * largest_chunk + state, BYTES_PER_END_WEIGHT * end)


def available() -> int:
    """Bytes the system can give a new process without swapping."""
    return psutil.virtual_memory().available


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
