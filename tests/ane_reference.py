"""The ANE-shaped torch model chained the way the converter splits it: the
reference the converted packages are checked against."""
from __future__ import annotations

import torch

from anemlld.convert.models import ARCHITECTURES, build
from anemlld.convert.models.base import causal_mask
from anemlld.convert.pipeline import split_layers
from anemlld.convert.source import HFSource

CTX = 64


def chained(arch: str, src: HFSource, chunks: int, ctx: int = CTX):
    """Embeddings, ``chunks`` chunk models sharing one KV cache, LM head: the
    parts the converter exports, in fp32."""
    args = ARCHITECTURES[arch].model_args(src.config)
    ends = build(arch, args, layers=range(0), context_length=ctx).float().eval()
    ends.load_weights(src.get)
    parts = []
    for r in split_layers(args.num_hidden_layers, chunks):
        m = build(arch, args, layers=r, embeddings=False, lm_head=False, context_length=ctx).float().eval()
        m.load_weights(src.get)
        parts.append(m)
    shared = parts[0].model.kv_cache_0
    for m in parts[1:]:
        m.model.kv_cache_0 = shared
    return ends, parts, shared


def run(ends, parts, ids: list[int], start: int) -> torch.Tensor:
    """Feed ``ids`` at positions start.. through the chain; logits of the last."""
    pos = torch.arange(start, start + len(ids), dtype=torch.int32)
    h = ends.embed(torch.tensor([ids], dtype=torch.int32))
    for m in parts:
        window = m.args.sliding_window
        local = causal_mask(pos, m.context_length, window=window) if window else None
        h = m.layers_forward(h, pos, causal_mask(pos, m.context_length), pos[:1], local)
    return torch.cat(ends.head(h[:, -1:]), dim=-1)[0, 0]




@torch.no_grad()
def greedy(ends, parts, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and, for each step, the gap between the top two logits."""
    logits = run(ends, parts, prompt, 0)
    tokens, gaps, pos = [], [], len(prompt)
    for _ in range(steps):
        top2 = torch.topk(logits, 2).values
        gaps.append(float(top2[0] - top2[1]))
        tokens.append(int(logits.argmax()))
        logits = run(ends, parts, tokens[-1:], pos)
        pos += 1
    return tokens, gaps
