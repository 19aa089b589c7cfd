"""The ANE-shaped torch model chained the way the converter splits it: the
reference the converted packages are checked against."""
from __future__ import annotations

import torch

from anemlld.convert.models import ARCHITECTURES, build
from anemlld.runtime.attention import Steps
from anemlld.convert.pipeline import split_layers
from anemlld.convert.source import HFSource

CTX = 64


def chained(arch: str, src: HFSource, chunks: int, ctx: int = CTX, ring: int | None = None):
    """Embeddings, ``chunks`` chunk models sharing their KV caches, LM head:
    the parts the converter exports, in fp32, with the engine's step inputs
    (sliding-window layers in a ring of ``ring`` slots, by default ``ctx``)."""
    args = ARCHITECTURES[arch].model_args(src.config)
    ends = build(arch, args, layers=range(0), context_length=ctx).float().eval()
    ends.load_weights(src.get)
    parts = []
    for r in split_layers(args.num_hidden_layers, chunks):
        m = build(arch, args, layers=r, embeddings=False, lm_head=False, context_length=ctx,
                  ring=ring).float().eval()
        m.load_weights(src.get)
        parts.append(m)
    shared = parts[0].caches()
    for m in parts[1:]:
        for name, kv in shared.items():
            setattr(m.model, name, kv)
    first = parts[0]
    first.steps = Steps(ctx, first.args.sliding_window, first.ring if first.args.sliding_window else None,
                        None in first.args.layer_windows)
    first.ring_slots = first.steps.new_ring()
    return ends, parts, next(iter(shared.values()))


def run(ends, parts, ids: list[int], start: int) -> torch.Tensor:
    """Feed ``ids`` at positions start.. through the chain; logits of the last."""
    step = {k: torch.from_numpy(v.astype("float32" if k.endswith("mask") else "int32"))
            for k, v in parts[0].steps.step(start, len(ids), parts[0].ring_slots).items()}
    h = ends.embed(torch.tensor([ids], dtype=torch.int32))
    for m in parts:
        h = m.layers_forward(h, **step)
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
