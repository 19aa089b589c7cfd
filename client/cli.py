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
    return run(ns, sys.stdin, sys.stdout, sys.stderr)


def run(ns: argparse.Namespace, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    # imported here, not above: `--help` must not pay for pyzmq and msgpack
    from client.connection import Connection, Interrupted, NotReachable
    from client.render import error_text
    from client.models import NoModel
    from shared.errors import AnemllError
    from shared.protocol import ProtocolError
    from shared.settings import Settings

    conn = None
    try:
        settings = Settings.load(home=ns.home)
        conn = Connection(settings)
        conn.open()
        return dispatch(ns, conn, settings, stdin, out, err)
    except NotReachable as e:
        err.write(f"{e}\n")
        return EXIT_UNAVAILABLE
    except ProtocolError as e:  # an error event, or a request we refused to send
        err.write(error_text(e.message, e.hint) + "\n")
        return EXIT_ERROR
    except NoModel as e:
        err.write(error_text(e.message, e.hint) + "\n")
        return EXIT_UNAVAILABLE
    except AnemllError as e:  # settings.toml and such
        err.write(error_text(e.message, e.hint) + "\n")
        return EXIT_UNAVAILABLE
    except (Interrupted, KeyboardInterrupt):
        err.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `anemll-chat --list | head -1`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    finally:
        if conn is not None:
            conn.close()


def dispatch(ns: argparse.Namespace, conn: Any, settings: Any, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    from client import render
    from client.chat import event_json

    json_out = None
    if ns.json:
        def json_out(event) -> None:
            out.write(event_json(event) + "\n")
            out.flush()

    style = render.Style.for_stream(out)
    if ns.list:
        return _list(conn, settings, out, style, json_out)
    if ns.ps:
        return _ps(conn, out, style, json_out)
    if ns.jobs:
        return _jobs(conn, ns.watch, out, json_out)
    if ns.convert or ns.retry:
        return _queue(conn, ns, out, json_out)
    return _chat(ns, conn, settings, stdin, out, err, json_out)


def _list(conn, settings, out, style, json_out) -> int:
    from client import render
    from shared.protocol import Models

    event = conn.call(Models(id=conn.next_id()))
    if json_out:
        json_out(event)
    elif event["models"]:
        out.write("\n".join(render.models_lines(event["models"], style)) + "\n")
    else:
        out.write(f"no models yet: drop a Hugging Face model folder into {settings.drop_dir}, "
                  "or run: anemll-chat --convert PATH\n")
    return EXIT_OK


def _ps(conn, out, style, json_out) -> int:
    from client import render
    from shared.protocol import Ps

    event = conn.call(Ps(id=conn.next_id()))
    if json_out:
        json_out(event)
    elif event["ps"]:
        out.write("\n".join(render.ps_lines(event["ps"], style)) + "\n")
    else:
        out.write("no models are loaded\n")
    return EXIT_OK


def _jobs(conn, watch: bool, out, json_out) -> int:
    from client.jobs import follow_jobs, show_jobs
    from shared.protocol import Jobs

    if watch:
        return follow_jobs(conn, out, json_out)
    if json_out:
        json_out(conn.call(Jobs(id=conn.next_id())))
        return EXIT_OK
    return show_jobs(conn, out)


def _queue(conn, ns, out, json_out) -> int:
    from client.jobs import follow_jobs
    from shared.protocol import Convert, ProtocolError, Retry

    if ns.convert:
        options = {}
        for item in ns.option:
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ProtocolError("bad_request", f"--option {item!r} is not KEY=VALUE",
                                    hint="for example: -o context_length=1024 -o lut_ffn=4")
            options[key.strip().replace("-", "_")] = value.strip()
        request = Convert(id=conn.next_id(), path=os.path.abspath(os.path.expanduser(ns.convert)),
                          name=ns.name, options=options or None)
    else:
        request = Retry(id=conn.next_id(), name=ns.retry)
    event = conn.call(request)
    if json_out:
        json_out(event)
    else:
        out.write(f"queued job {event.get('job', '?')}: {event.get('name', ns.retry or '')}\n")
        if not ns.watch:
            out.write("follow it with: anemll-chat --jobs --watch\n")
        out.flush()
    return follow_jobs(conn, out, json_out) if ns.watch else EXIT_OK


def _chat(ns, conn, settings, stdin, out, err, json_out) -> int:
    from client import render
    from client.chat import check_options, stream_answer
    from client.models import NoModel, remember_model, resolve_model
    from client.repl import Repl
    from shared.protocol import Generate

    options: dict[str, Any] = {k: v for k, v in (
        ("temperature", ns.temperature), ("top_k", ns.top_k), ("top_p", ns.top_p),
        ("repetition_penalty", ns.repetition_penalty), ("seed", ns.seed), ("max_tokens", ns.max_tokens),
        ("keep_alive", ns.keep_alive)) if v is not None}
    check_options(options)

    text = ns.prompt
    if text is None and not render.is_tty(stdin):
        text = stdin.read()
        if not text.strip():
            raise NoModel("nothing to ask: standard input was empty", 'give the question with -p "TEXT"')
    if text is None and json_out is not None:
        raise NoModel("--json needs a question", 'give it with -p "TEXT" or on standard input')

    record = resolve_model(conn, settings, ns.model, wait=not ns.no_wait, err=err, json_out=json_out)
    name = record["name"]
    if text is None:
        if record.get("state") != "loaded":
            _preload(conn, name, options, err)
        return Repl(conn, settings, name, options=options, system=ns.system, show_stats=ns.stats,
                    stdout=out, stderr=err).run()

    text = text.rstrip("\n")
    if ns.raw:
        fields: dict[str, Any] = {"prompt": (ns.system + "\n\n" if ns.system else "") + text}
    else:
        system = [{"role": "system", "content": ns.system}] if ns.system else []
        fields = {"messages": system + [{"role": "user", "content": text}]}
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


def _preload(conn, name: str, options: dict[str, Any], err) -> None:
    """Load the model before the first prompt, as `ollama run` does: the first
    answer is then quick, and a model that cannot load says so at once."""
    from client import render
    from shared.protocol import Load

    keep = {"keep_alive": options["keep_alive"]} if "keep_alive" in options else {}
    status = render.StatusLine(err)
    unicode = render.can_draw_unicode(err)
    try:
        for event in conn.stream(Load(id=conn.next_id(), model=name, **keep), cancellable=False):
            if event.event == "progress":
                fraction = event.get("fraction", 0.0)
                status.show(f"loading {name} {render.bar(fraction, 20, unicode)} {render.percent(fraction)}")
            elif event.final:
                event.raise_for_error()
                return
    finally:
        status.clear()


if __name__ == "__main__":
    sys.exit(main())
