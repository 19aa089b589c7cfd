"""`anemlld`: the daemon's command line. Heavy libraries are imported only by
the subcommand that needs them, so `anemlld --help` starts fast."""
from __future__ import annotations

import argparse
import logging
import os
import sys

# Before torch loads: OpenMP threads that spin while waiting make every op
# crawl when another process shares the 2 cores (measured: our k-means on a
# small weight 416 ms per call with spinning threads, 20-25 ms passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from shared.errors import AnemllError
from shared.options import ARCHITECTURES


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="convert a Hugging Face model folder into ANE parts",
                       description="Convert a Hugging Face model folder (config.json, safetensors, tokenizer) "
                                   "into Core ML parts laid out for the Apple Neural Engine runtimes.")
    c.add_argument("src", help="the Hugging Face model folder")
    c.add_argument("--out", help="output folder (created; replaced only if anemlld made it); required unless "
                                 "--estimate")
    c.add_argument("--context-length", type=int, help="tokens of context (default 512)")
    c.add_argument("--batch-size", type=int, help="prefill batch (default 64; must divide context length)")
    c.add_argument("--chunks", help="FFN chunks: a number, or auto (default) to stay under --max-chunk-mb")
    c.add_argument("--max-chunk-mb", type=int, help="largest chunk file for --chunks auto (default 950)")
    c.add_argument("--lut-embeddings", help="none, 4, 6 or 8 (default none); BITS,GROUP for a group size: 4,8 is "
                                            "one table per 8 output channels, 4,0 one per tensor (default 16)")
    c.add_argument("--lut-ffn", help="none, 4, 6 or 8, or BITS,GROUP (default 4)")
    c.add_argument("--lut-lm-head", help="none, 4, 6 or 8, or BITS,GROUP (default 6)")
    c.add_argument("--prefix", help="file name prefix (default from the architecture: gemma3, llama, mistral, phi3, qwen)")
    c.add_argument("--architecture", help=f"override detection: {', '.join(ARCHITECTURES)}")
    c.add_argument("--argmax-in-model", action="store_true", default=None,
                   help="give the LM head (or the monolithic model) an argmax function beside its logits: "
                        "greedy decoding reads one token id instead of the whole vocabulary")
    c.add_argument("--monolithic", action="store_true", default=None,
                   help="one package with the embeddings, every layer and the LM head (one prediction per token); "
                        "refused when it would exceed --max-chunk-mb")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.add_argument("--estimate", action="store_true",
                   help="print the plan (parts, sizes, disk, peak memory, time on this machine) and exit "
                        "without converting")


def _convert(ns: argparse.Namespace) -> int:
    from anemlld.convert import estimate
    from anemlld.convert.pipeline import Progress, convert, plan
    from shared.options import ConvertOptions

    keys = ConvertOptions.KEYS
    values = {k: getattr(ns, k) for k in keys if getattr(ns, k) is not None}
    options = ConvertOptions.from_mapping(values, where="the command line")
    if ns.estimate:
        p = plan(ns.src, options)
        p.source.close()
        print("\n".join(estimate.describe(p, estimate.estimate(p))))
        return 0
    if not ns.out:
        raise AnemllError("anemlld convert needs --out", "give the output folder with --out DIR, or use --estimate "
                          "to see the plan without converting", code="bad_request")
    last = [-1.0]

    def show(ev: Progress) -> None:
        if ns.quiet:
            return
        if ev.stage == "done" or ev.fraction - last[0] >= 0.0:
            last[0] = ev.fraction
            part = f" {ev.part}" if ev.part else ""
            msg = f": {ev.message}" if ev.message else ""
            left = f" (about {estimate.format_seconds(ev.eta_seconds)} left)" if ev.eta_seconds else ""
            print(f"[{ev.fraction * 100:5.1f}%] {ev.stage}{part}{msg}{left}", flush=True)

    result = convert(ns.src, ns.out, options, progress=show)
    if not result.compiled:
        print(f"compile skipped: {result.compile_note}")
    print(f"{'up to date' if result.reused else 'converted'}: {result.out_dir}")
    return 0


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="generate text with a converted model (no daemon)",
                       description="Load a converted model folder and answer one prompt, streaming the text.")
    r.add_argument("model", help="converted model folder (meta.yaml)")
    r.add_argument("prompt", nargs="?", help="the question (default: read standard input)")
    r.add_argument("--raw", action="store_true", help="send the prompt as plain text, not through the chat template")
    r.add_argument("--system", help="system message for the chat template")
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--repetition-penalty", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument("--executor", default="auto", help="auto (default), coreml or portable")
    r.add_argument("--stats", action="store_true", help="print token counts and speeds after the answer")


def _run(ns: argparse.Namespace) -> int:
    from anemlld.runtime.engine import Done, Engine
    from anemlld.runtime.sampling import SamplingParams

    prompt = ns.prompt if ns.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        print("error: empty prompt\n  -> pass a question, or pipe text into anemlld run", file=sys.stderr)
        return 1
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_k=ns.top_k,
                            top_p=ns.top_p, repetition_penalty=ns.repetition_penalty, seed=ns.seed,
                            stop=tuple(ns.stop))
    engine = Engine(ns.model, executor=ns.executor)
    if ns.raw:
        kw = {"prompt": prompt}
    else:
        messages = ([{"role": "system", "content": ns.system}] if ns.system else []) + [
            {"role": "user", "content": prompt}]
        kw = {"messages": messages}
    for event in engine.generate(params=params, **kw):
        if isinstance(event, Done):
            print(flush=True)
            if ns.stats:
                s = event.stats
                prefill_rate = s.prefill_tokens / (s.prefill_ms / 1000) if s.prefill_ms else 0.0
                print(f"[{engine.executor.name}] prompt {s.prompt_tokens} tokens, prefill {prefill_rate:.1f} tok/s; "
                      f"{s.completion_tokens} tokens at {s.tokens_per_s:.1f} tok/s; load {engine.load_ms:.0f} ms; "
                      f"stop: {s.done_reason}", file=sys.stderr)
        else:
            print(event.text, end="", flush=True)
    return 0


def _add_verify(sub) -> None:
    v = sub.add_parser("verify", help="compare a converted model with its Hugging Face original",
                       description="Run the converted model over a text and report perplexity, logit "
                                   "differences, next-token agreement and KL divergence against "
                                   "transformers.")
    v.add_argument("model", help="converted model folder")
    v.add_argument("--reference", help="the Hugging Face folder (default: the one recorded at conversion)")
    v.add_argument("--text", help="UTF-8 text to evaluate on (default: a built-in sample)")
    v.add_argument("--max-tokens", type=int, default=2048, help="evaluate at most this many tokens")
    v.add_argument("--executor", default="auto", help="auto (default), coreml or portable")
    v.add_argument("--json", action="store_true", help="print one JSON object")


def _verify(ns: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from anemlld.runtime.verify import verify

    text = None
    if ns.text:
        try:
            text = Path(ns.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AnemllError(f"cannot read {ns.text}: {e}", "pass a UTF-8 text file with --text") from None
    report = verify(ns.model, ns.reference, text, ns.max_tokens, ns.executor)
    if ns.json:
        print(json.dumps(report.as_dict()))
    else:
        r = report
        print(f"{r.model} against {r.reference} ({r.executor} executor, {r.tokens} tokens, {r.windows} windows)")
        print(f"  perplexity            {r.perplexity:.3f}  (reference {r.reference_perplexity:.3f}, "
              f"ratio {r.perplexity / r.reference_perplexity:.4f})")
        print(f"  max |logit diff|      {r.max_abs_logit_diff:.4f}  (mean {r.mean_abs_logit_diff:.4f})")
        print(f"  next-token agreement  {r.greedy_agreement * 100:.2f}%")
        print(f"  KL divergence         {r.kl_divergence:.6f} nats per token (from the reference)")
    return 0


def _add_launchd(sub) -> None:
    i = sub.add_parser("install", help="install the per-user LaunchAgent (macOS) and start it")
    i.add_argument("--print", action="store_true", help="print the plist instead of installing it")
    sub.add_parser("uninstall", help="stop and remove the LaunchAgent (macOS)")
    sub.add_parser("status", help="whether the LaunchAgent is installed and running (macOS)")


def _launchd(ns: argparse.Namespace) -> int:
    from anemlld import launchd
    from shared.settings import Settings

    settings = Settings.load(home=ns.home)
    if ns.command == "install":
        if ns.print:
            sys.stdout.write(launchd.render(settings).decode())
            return 0
        path = launchd.install(settings)
        print(f"installed {path}; anemlld now runs in the background and at every login")
    elif ns.command == "uninstall":
        print("removed the LaunchAgent" if launchd.uninstall() else "the LaunchAgent was not installed")
    else:
        print(launchd.status())
    return 0


def _daemon(ns: argparse.Namespace) -> int:
    from anemlld.daemon import run

    return run(home=ns.home)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anemlld", description="Large language models on the Apple Neural Engine. With no command, "
                                    "runs the daemon in the foreground (as launchd wants).")
    parser.add_argument("--home", help="keep everything (drop folder, models, state, logs, socket) under DIR "
                                       "(default: $ANEMLL_HOME, else the platform folders)", metavar="DIR")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    _add_convert(sub)
    _add_run(sub)
    _add_verify(sub)
    _add_launchd(sub)
    ns = parser.parse_args(argv)
    if ns.command is not None:
        logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    commands = {"convert": _convert, "run": _run, "verify": _verify, "install": _launchd,
                "uninstall": _launchd, "status": _launchd, None: _daemon}
    try:
        return commands[ns.command](ns)
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
