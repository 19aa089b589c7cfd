"""`anemlld`: the daemon's command line. Heavy libraries are imported only by
the subcommand that needs them, so `anemlld --help` starts fast."""
from __future__ import annotations

import argparse
import logging
import sys

from shared.errors import AnemllError


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="convert a Hugging Face model folder into ANE parts",
                       description="Convert a Hugging Face model folder (config.json, safetensors, tokenizer) "
                                   "into Core ML parts laid out for the Apple Neural Engine runtimes.")
    c.add_argument("src", help="the Hugging Face model folder")
    c.add_argument("--out", required=True, help="output folder (created; replaced only if anemlld made it)")
    c.add_argument("--context-length", type=int, help="tokens of context (default 512)")
    c.add_argument("--batch-size", type=int, help="prefill batch (default 64; must divide context length)")
    c.add_argument("--chunks", help="FFN chunks: a number, or auto (default) to stay under --max-chunk-mb")
    c.add_argument("--max-chunk-mb", type=int, help="largest chunk file for --chunks auto (default 950)")
    c.add_argument("--lut-embeddings", help="none, 4, 6 or 8 (default none)")
    c.add_argument("--lut-ffn", help="none, 4, 6 or 8 (default 4)")
    c.add_argument("--lut-lm-head", help="none, 4, 6 or 8 (default 6)")
    c.add_argument("--prefix", help="file name prefix (default from the architecture: llama, qwen)")
    c.add_argument("--architecture", help="override detection: llama, qwen2, qwen3")
    c.add_argument("--quiet", action="store_true", help="no progress lines")


def _convert(ns: argparse.Namespace) -> int:
    from anemlld.convert.pipeline import Progress, convert
    from shared.options import ConvertOptions

    keys = ConvertOptions.KEYS
    values = {k: getattr(ns, k) for k in keys if getattr(ns, k) is not None}
    options = ConvertOptions.from_mapping(values, where="the command line")
    last = [-1.0]

    def show(ev: Progress) -> None:
        if ns.quiet:
            return
        if ev.stage == "done" or ev.fraction - last[0] >= 0.0:
            last[0] = ev.fraction
            part = f" {ev.part}" if ev.part else ""
            msg = f": {ev.message}" if ev.message else ""
            print(f"[{ev.fraction * 100:5.1f}%] {ev.stage}{part}{msg}", flush=True)

    result = convert(ns.src, ns.out, options, progress=show)
    if not result.compiled:
        print(f"compile skipped: {result.compile_note}")
    print(f"{'up to date' if result.reused else 'converted'}: {result.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anemlld", description="Large language models on the Apple Neural Engine.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    _add_convert(sub)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        return {"convert": _convert}[ns.command](ns)
    except AnemllError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # permissions, a full disk mid-write: no traceback for those
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
