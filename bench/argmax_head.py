"""What the LM head's ``argmax`` function saves per greedy token, against its
``logits`` function in the same package and the same run.

Exports one split LM head with both functions (as ``--argmax-in-model``
does) at a chosen shape, loads it with the portable executor's runtime and
times, per token, what the engine does on each path:

- logits: the head's ``logits1..K`` -> concatenated float32 vector -> the
  sampler's greedy pick (``Sampler`` at temperature 0);
- argmax: the head's ``argmax_idx``/``argmax_val`` -> the best split's winner
  mapped to a token id.

Reports the bytes that leave the model per token (the outputs' sizes) and
host time per token (median of ``--repeats``), and the ratio argmax/logits.
On the Neural Engine the bytes are what crosses from the ANE to the host;
here the portable executor runs the convolutions on the CPU too, so the
host-time ratio includes the (equal) matrix product in both.

    .venv/bin/python bench/argmax_head.py [--shape 1b|pico] [--repeats N]

``1b`` is Llama-3.2-1B's head (hidden 2048, vocab 128256, 8 splits; about a
minute to export and 1.5 GB of memory), ``pico`` the demo model's (256, 4096).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import print_header, quiet_coremltools, table  # noqa: F401 (sets up sys.path)

SHAPES = {"1b": (2048, 128256, 8), "pico": (256, 4096, 8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--repeats", type=int, default=200)
    ns = ap.parse_args()
    print_header("argmax head vs logits head, per greedy token")

    import numpy as np
    import torch

    from anemlld.convert import export
    from anemlld.convert.models import build
    from anemlld.convert.models.base import ModelArgs
    from anemlld.runtime.portable import PortableModel
    from anemlld.runtime.sampling import Sampler, SamplingParams

    hidden, vocab, split = SHAPES[ns.shape]
    args = ModelArgs(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1, num_attention_heads=8,
                     num_key_value_heads=8, head_dim=hidden // 8, vocab_size=vocab, rms_norm_eps=1e-5,
                     rope_theta=1e4, rope_scaling=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # as the portable executor runs
    lm = build("llama", args, layers=range(0), embeddings=False, lm_head=True, lm_head_split=split,
               context_length=16)
    with torch.no_grad():
        for conv in lm.lm_head.splits:
            conv.weight.normal_(0, 0.02)
    shapes = export.Shapes(hidden, 16, 1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        t = time.perf_counter()
        for fn, argmax in ((export.LOGITS, False), (export.ARGMAX, True)):
            paths[fn] = Path(tmp) / f"{fn}.mlpackage"
            export.export_head(lm, shapes, None, argmax).save(str(paths[fn]))
        head_path = Path(tmp) / "head.mlpackage"
        export.combine(paths, head_path, {}, "bench")
        print(f"shape {ns.shape}: hidden {hidden}, vocab {vocab}, {split} splits; exported and combined in "
              f"{time.perf_counter() - t:.1f} s")
        head = PortableModel(head_path)
        offsets = np.cumsum([0] + [c.out_channels for c in lm.lm_head.splits][:-1])
        names = [f"logits{i + 1}" for i in range(split)]
        greedy = Sampler(SamplingParams())
        rng = np.random.default_rng(0)
        inputs = [{"hidden_states": rng.standard_normal((1, 1, hidden)).astype(np.float16)} for _ in range(8)]

        def by_logits(x) -> tuple[int, int]:
            out = head.predict_tensors(x, function=export.LOGITS)
            logits = torch.cat([out[k].reshape(-1) for k in names]).float().cpu().numpy()
            return greedy(logits, []), sum(out[k].numel() * out[k].element_size() for k in names)

        def by_argmax(x) -> tuple[int, int]:
            out = head.predict_tensors(x, function=export.ARGMAX)
            idx, val = out["argmax_idx"].cpu().numpy(), out["argmax_val"].float().cpu().numpy()
            best = int(np.argmax(val))
            nbytes = sum(t.numel() * t.element_size() for t in (out["argmax_idx"], out["argmax_val"]))
            return int(idx[best]) + int(offsets[best]), nbytes

        for x in inputs:  # the same token both ways; also the warm-up
            assert by_logits(x)[0] == by_argmax(x)[0]
        times: dict[str, list[float]] = {"logits": [], "argmax": []}
        sizes = {}
        for r in range(ns.repeats):  # interleaved, so load changes hit both alike
            for name, fn in (("logits", by_logits), ("argmax", by_argmax)):
                t = time.perf_counter()
                _, sizes[name] = fn(inputs[r % len(inputs)])
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    rows = [[k, f"{sizes[k]:,}", f"{med[k]:.3f}", f"{sizes[k] / sizes['logits']:.5f}x",
             f"{med[k] / med['logits']:.3f}x"] for k in ("logits", "argmax")]
    print(table(rows, ["path", "bytes out/token", "host ms/token (median)", "bytes vs logits",
                       "time vs logits"]))
    print(f"\nhost time saved per token: {med['logits'] - med['argmax']:.3f} ms ({ns.repeats} tokens each way)")


if __name__ == "__main__":
    main()
