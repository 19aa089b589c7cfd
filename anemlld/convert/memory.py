"""A conversion's memory: what the plan says it will need at its peak, and
what a process (with its descendants) holds now. No torch here: the daemon
measures its conversion children with it."""
from __future__ import annotations

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


def peak_estimate(plan: "Plan") -> int:
    """Bytes of resident memory the conversion of ``plan`` is expected to
    peak at: the process's base plus its costliest part (a monolithic
    model's too: its parts' weights are read one at a time all the same)."""
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
