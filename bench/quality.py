"""Quality of LUT quantization: perplexity of converted models against the
Hugging Face original, computed by running the converted packages.

For each model it converts no-LUT, LUT 8, LUT 6 and LUT 4 variants (FFN bits;
the head at 8, 8, 6 and 6; embeddings unquantized; one table per 16 output
channels), then LUT 4 with other group sizes in ANEMLL's spelling ("4,8":
groups of 8; "4,0": one table per tensor), and runs `anemlld verify`'s
measurement on the evaluation text: the converted packages through the
portable executor, the original through transformers in fp32, over the same
tokens and windows of the context length.

    .venv/bin/python bench/quality.py [--models DIR ...] [--text FILE] [--max-tokens N] [--variants LABEL ...]

Defaults: ../shared/models/pico-llama and pico-qwen3, ../shared/models/eval_dev.txt.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
VARIANTS = [("none", "none", "none"), ("LUT 8", 8, 8), ("LUT 6", 6, 6), ("LUT 4", 4, 6),
            ("LUT 4 g4", "4,4", 6), ("LUT 4 g8", "4,8", 6), ("LUT 4 g64", "4,64", 6), ("LUT 4 tensor", "4,0", 6)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=Path, default=[SHARED / "pico-llama", SHARED / "pico-qwen3"])
    ap.add_argument("--text", type=Path, default=SHARED / "eval_dev.txt")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--context-length", type=int, default=512)
    ap.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS], metavar="LABEL",
                    help="which rows to run, by label (default: all)")
    ns = ap.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass bars
    import coremltools
    import torch

    from anemlld.convert.pipeline import convert
    from anemlld.runtime.verify import verify
    from shared.options import ConvertOptions

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, torch {torch.__version__}, "
          f"coremltools {coremltools.__version__}; {ns.max_tokens} tokens of {ns.text.name}")
    text = ns.text.read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ns.models:
            for label, ffn, head in (v for v in VARIANTS if v[0] in ns.variants):
                out = Path(tmp) / f"{model.name}-{label.replace(' ', '')}"
                opts = ConvertOptions.from_mapping({"context_length": ns.context_length, "lut_ffn": ffn,
                                                    "lut_lm_head": head, "lut_embeddings": "none"})
                t = time.perf_counter()
                convert(model, out, opts)
                conv_s = time.perf_counter() - t
                r = verify(out, reference=model, text=text, max_tokens=ns.max_tokens, executor="portable")
                rows.append((model.name, label, f"{ffn}/{head}", r, conv_s))
                print(f"{model.name:12s} {label:12s} ppl {r.perplexity:8.3f} ref {r.reference_perplexity:8.3f} "
                      f"ratio {r.perplexity / r.reference_perplexity:.4f} agree {r.greedy_agreement * 100:6.2f}% "
                      f"KL {r.kl_divergence:.5f} max|dlogit| {r.max_abs_logit_diff:.3f} (convert {conv_s:.0f} s, verify {r.seconds:.0f} s)",
                      flush=True)
    print()
    print("| model | variant | FFN/head bits | perplexity | original (fp32) | ratio | next-token agreement | "
          "KL divergence | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label, bits, r, _ in rows:
        print(f"| {name} | {label} | {bits} | {r.perplexity:.3f} | {r.reference_perplexity:.3f} | "
              f"{r.perplexity / r.reference_perplexity:.4f} | {r.greedy_agreement * 100:.2f}% | "
              f"{r.kl_divergence:.5f} | {r.max_abs_logit_diff:.3f} |")


if __name__ == "__main__":
    main()
