"""`anemll-chat`: the command line. Parses the arguments, connects, and hands
over to the chat (repl), a one-shot answer, or a management command.

Exit codes: 0 done; 1 the daemon answered with an error (or the model failed);
2 nothing could be asked (daemon not running, protocol mismatch, bad usage, no
model to pick, still converting with --no-wait); 130 stopped with Ctrl-C.

Only argparse and the standard library are imported before the arguments are
parsed, so `--help` is instant; pyzmq and msgpack come after.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from client import __version__

DESCRIPTION = """\
Chat with the models anemlld serves on this Mac's Neural Engine.

  anemll-chat                   chat with the only ready model, or the last one used
  anemll-chat MODEL             chat with MODEL
  anemll-chat MODEL -p TEXT     answer one question and exit (or pipe the question on stdin)
  anemll-chat --list | --ps | --jobs [--watch]
  anemll-chat --convert PATH [--name NAME] [-o KEY=VALUE ...] | --retry NAME"""

EPILOG = """\
In the chat, /help lists the commands; Ctrl-C stops an answer, Ctrl-D or /bye quits.
--home DIR (or ANEMLL_HOME) must match the daemon's, so that both find the same socket.
Exit codes: 0 ok, 1 an error from the daemon, 2 the daemon cannot be asked (not running,
another protocol version) or no model could be picked, 130 Ctrl-C."""

EXIT_OK, EXIT_ERROR, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anemll-chat", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL", help="the model to talk to (see --list)")
    p.add_argument("-p", "--prompt", metavar="TEXT", help="answer TEXT and exit (default: read stdin when it "
                   "is not a terminal)")
    p.add_argument("--json", action="store_true", help="print the daemon's events as JSON lines, for scripts")
    p.add_argument("--stats", action="store_true", help="print the statistics line after each answer "
                   "(to stderr for a one-shot answer)")
    p.add_argument("--no-wait", action="store_true", help="if the model is still converting, say how far it is "
                   "and exit instead of waiting")
    p.add_argument("--raw", action="store_true", help="send the text as it is, without the chat template")
    p.add_argument("--system", metavar="TEXT", help="the system prompt")
    p.add_argument("--format", metavar="FILE.json", help="one answer as JSON following the JSON schema in FILE "
                   "(decoding is constrained to it); 'json' for any JSON object")

    s = p.add_argument_group("sampling (default: the daemon's, greedy with max 256 tokens)")
    s.add_argument("--temperature", type=float, metavar="T", help="0 is greedy")
    s.add_argument("--top-k", type=int, metavar="K", help="0 is off")
    s.add_argument("--top-p", type=float, metavar="P", help="in (0, 1]; 1 is off")
    s.add_argument("--repetition-penalty", type=float, metavar="R", help="1 is off")
    s.add_argument("--seed", type=int, metavar="N", help="same seed, same answer")
    s.add_argument("--max-tokens", type=int, metavar="N", help="tokens to generate at most")
    s.add_argument("--keep-alive", metavar="DURATION", help='how long the model stays loaded: "30m", "2h", '
                   "-1 forever, 0 unload after")

    m = p.add_argument_group("management")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--list", action="store_true", help="the models, with state and size")
    g.add_argument("--ps", action="store_true", help="the models in memory, and when they expire")
    g.add_argument("--jobs", action="store_true", help="the conversion jobs, with progress")
    g.add_argument("--convert", metavar="PATH", help="convert the Hugging Face model folder PATH")
    g.add_argument("--retry", metavar="NAME", help="convert the failed model NAME again")
    m.add_argument("--watch", action="store_true", help="with --jobs, --convert or --retry: follow the jobs "
                   "live until they finish")
    m.add_argument("--name", help="with --convert: the model's name (default: the sidecar's, or the folder's)")
    m.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="with --convert: a [convert] option, such as context_length=1024 or lut_ffn=4")

    p.add_argument("--home", metavar="DIR", help="the daemon's home folder (default: $ANEMLL_HOME, else the "
                   "platform's folders)")
    p.add_argument("--version", action="version", version=f"anemll-chat {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    managing = ns.list or ns.ps or ns.jobs or ns.convert or ns.retry
    if managing and (ns.model or ns.prompt is not None):
        parser.error("management options (--list, --ps, --jobs, --convert, --retry) take no MODEL or -p")
    if ns.watch and not (ns.jobs or ns.convert or ns.retry):
        parser.error("--watch goes with --jobs, --convert or --retry")
    if (ns.name or ns.option) and not ns.convert:
        parser.error("--name and --option go with --convert")
    if not managing and ns.prompt is None and sys.stdin is not None and not _is_tty(sys.stdin):
        ns.prompt = sys.stdin.read()  # the question comes on a pipe: answer it once
        if not ns.prompt.strip():
            parser.error("nothing to ask: standard input was empty; give the question with -p TEXT")
    if ns.json and not managing and ns.prompt is None:
        parser.error("--json needs a question: give it with -p TEXT or on standard input")
    if ns.format is not None:
        if managing or ns.prompt is None:
            parser.error("--format is for one answer: give the question with -p TEXT or on standard input")
        ns.format = _schema(ns.format, parser)
    for stream in (sys.stdout, sys.stderr):  # a token the terminal cannot show must not end the answer
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass
    return run(ns, sys.stdout, sys.stderr)


def _schema(path: str, parser: argparse.ArgumentParser) -> Any:
    """--format's JSON schema, read from ``path`` ("json": any JSON object)."""
    import json

    if path == "json":
        return "json"
    try:
        schema = json.loads(open(path, encoding="utf-8").read())
    except OSError as e:
        parser.error(f"--format: cannot read {path}: {e.strerror}")
    except ValueError as e:
        parser.error(f"--format: {path} is not JSON ({e}); it must hold a JSON schema")
    if not isinstance(schema, dict):
        parser.error(f"--format: {path} must hold a JSON schema (an object), not a {type(schema).__name__}")
    return schema


def _is_tty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # closed
        return False


def run(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    # imported here, not above: `--help` must not pay for pyzmq and msgpack
    from client.connection import Connection, Interrupted, NotReachable
    from client.render import error_text
    from shared.errors import AnemllError
    from shared.protocol import ProtocolError
    from shared.settings import Settings

    conn = None
    try:
        settings = Settings.load(home=ns.home)
        conn = Connection(settings)
        conn.open()
        return dispatch(ns, conn, settings, out, err)
    except NotReachable as e:
        err.write(f"{e}\n")
        return EXIT_UNAVAILABLE
    except ProtocolError as e:  # an error event, or a request we refused to send
        err.write(error_text(e.message, e.hint) + "\n")
        return EXIT_ERROR
    except AnemllError as e:  # no model to pick, a bad settings.toml ...
        err.write(error_text(e.message, e.hint) + "\n")
        return EXIT_UNAVAILABLE
    except (Interrupted, KeyboardInterrupt):
        err.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `anemll-chat --list | head -1`: quiet, also at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if conn is not None:
            conn.close()


def dispatch(ns: argparse.Namespace, conn: Any, settings: Any, out: TextIO, err: TextIO) -> int:
    from client import manage
    from client.chat import event_json

    def print_json(event) -> None:
        out.write(event_json(event) + "\n")
        out.flush()

    json_out = print_json if ns.json else None

    if ns.list:
        return manage.list_models(conn, settings, out, json_out)
    if ns.ps:
        return manage.list_resident(conn, out, json_out)
    if ns.jobs:
        return manage.list_jobs(conn, ns.watch, out, json_out)
    if ns.convert:
        return manage.convert(conn, ns.convert, ns.name, ns.option, ns.watch, out, json_out)
    if ns.retry:
        return manage.retry(conn, ns.retry, ns.watch, out, json_out)
    return _chat(ns, conn, settings, out, err, json_out)


def _chat(ns, conn, settings, out, err, json_out) -> int:
    """The chat when there is no question (a terminal), else one answer."""
    from client import render
    from client.chat import check_options, stream_answer
    from client.models import remember_model, resolve_model
    from client.repl import Repl, preload
    from shared.protocol import Generate

    options: dict[str, Any] = {k: v for k, v in (
        ("temperature", ns.temperature), ("top_k", ns.top_k), ("top_p", ns.top_p),
        ("repetition_penalty", ns.repetition_penalty), ("seed", ns.seed), ("max_tokens", ns.max_tokens),
        ("keep_alive", ns.keep_alive)) if v is not None}
    check_options(options)

    text = ns.prompt
    record = resolve_model(conn, settings, ns.model, wait=not ns.no_wait, err=err, json_out=json_out)
    name = record["name"]
    if text is None:
        if record.get("state") != "loaded":
            preload(conn, name, options.get("keep_alive"), err)
        return Repl(conn, settings, name, options=options, system=ns.system, show_stats=ns.stats,
                    stdout=out, stderr=err).run()

    text = text.rstrip("\n")
    if ns.raw:
        fields: dict[str, Any] = {"prompt": (ns.system + "\n\n" if ns.system else "") + text}
    else:
        system = [{"role": "system", "content": ns.system}] if ns.system else []
        fields = {"messages": system + [{"role": "user", "content": text}]}
    if ns.format is not None:
        known = conn.hello.get("capabilities") if conn.hello is not None else None
        if known is not None and "generate.format" not in known:
            from shared.errors import AnemllError

            raise AnemllError("this anemlld does not know --format (structured output)",
                              "update anemlld and restart it", code="bad_request")
        fields["format"] = ns.format
    request = Generate(id=conn.next_id(), model=name, **fields, **options)
    answer = stream_answer(conn, request, out, err, json_out)
    if json_out is None:
        if answer.text and not answer.text.endswith("\n"):
            out.write("\n")
        out.flush()
        if ns.stats and answer.reason != "cancelled":
            err.write(render.stats_line(answer.done) + "\n")
    if answer.reason == "cancelled":
        return EXIT_INTERRUPTED
    remember_model(settings, name)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
