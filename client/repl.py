"""The interactive chat: a prompt with line editing and history (stdlib
readline where there is one), answers streamed as they come, the conversation
kept in a daemon session, and the slash commands."""
from __future__ import annotations

import secrets
import sys
from collections.abc import Callable
from typing import Any, TextIO

from client import render
from client.chat import SAMPLING, Answer, parse_setting, show_options, stream_answer
from client.connection import Connection, Interrupted
from client.models import chat_state_dir, remember_model, resolve_model
from shared.errors import AnemllError
from shared.protocol import Generate, Load, Models, Pin, ProtocolError, Ps, Request, Unload
from shared.settings import Settings

PROMPT = ">>> "
MORE = "... "
MULTILINE = '"""'
HISTORY_FILE = "history"
HISTORY_LENGTH = 1000

HELP = f"""\
Type a message and press Enter; the answer streams as it comes.
Ctrl-C stops an answer, Ctrl-D or /bye quits. Start and end with {MULTILINE} to write several lines.

  /models                 the daemon's models, with state and size
  /ps                     the models in memory, and until when
  /load [MODEL] [KEEP]    load MODEL (default: this one) and chat with it; KEEP such as 2h or -1
  /unload [MODEL]         free MODEL's memory (default: this one)
  /pin [MODEL] [off]      keep MODEL loaded until the daemon restarts; `off` unpins
  /set [KEY VALUE]        sampling: {', '.join(SAMPLING)}; /set KEY alone resets it
  /system [TEXT]          set the system prompt; /system alone removes it
  /clear                  forget the conversation (a new session)
  /stats                  show or hide the statistics line after each answer
  /help                   this list
  /bye                    quit"""


class Repl:
    def __init__(self, conn: Connection, settings: Settings, model: str, *, options: dict[str, Any],
                 system: str | None = None, show_stats: bool = False,
                 stdout: TextIO | None = None, stderr: TextIO | None = None,
                 read: Callable[[str], str] = input):
        self.conn = conn
        self.settings = settings
        self.model = model
        self.options = dict(options)
        self.system = system
        self.show_stats = show_stats
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.read = read
        self.style = render.Style.for_stream(self.out)
        self.history: list[dict[str, str]] = []
        self.session = new_session()
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "help": self.cmd_help, "?": self.cmd_help, "bye": self.cmd_bye, "exit": self.cmd_bye,
            "quit": self.cmd_bye, "models": self.cmd_models, "ps": self.cmd_ps, "load": self.cmd_load,
            "unload": self.cmd_unload, "pin": self.cmd_pin, "set": self.cmd_set, "system": self.cmd_system,
            "clear": self.cmd_clear, "stats": self.cmd_stats,
        }

    # -- the loop ---------------------------------------------------------------

    def run(self) -> int:
        history = setup_readline(self.settings)
        self.say(f"{self.model}: /help for commands, Ctrl-D or /bye to quit")
        try:
            while True:
                try:
                    line = self.read_message()
                except KeyboardInterrupt:
                    self.out.write("\n")
                    self.say("(Ctrl-D or /bye to quit)")
                    continue
                except EOFError:
                    self.out.write("\n")
                    return 0
                if line is None or not line.strip():
                    continue
                if line.startswith("/"):
                    name, _, rest = line[1:].strip().partition(" ")
                    command = self.commands.get(name.lower())
                    if command is None:
                        self.say(f"unknown command /{name}; /help lists them")
                    elif command(rest.strip()) is False:
                        return 0
                    continue
                self.ask(line)
        finally:
            save_history(history)

    def read_message(self) -> str | None:
        line = self.read(PROMPT)
        if not line.lstrip().startswith(MULTILINE):
            return line
        lines = [line.lstrip()[len(MULTILINE):]]
        while not lines[-1].rstrip().endswith(MULTILINE):
            lines.append(self.read(MORE))
        lines[-1] = lines[-1].rstrip()[:-len(MULTILINE)]
        return "\n".join(lines).strip("\n")

    def ask(self, text: str) -> Answer | None:
        """One turn: the whole conversation goes to the daemon with the session id,
        which reuses the cached prefix. A cancelled answer stays in the conversation
        as far as it got."""
        messages = self.messages() + [{"role": "user", "content": text}]
        request = Generate(id=self.conn.next_id(), model=self.model, messages=messages, session=self.session,
                           **self.options)
        try:
            answer = stream_answer(self.conn, request, self.out, self.err)
        except ProtocolError as e:
            self.error(e)
            self.out.write("\n")
            return None
        except (Interrupted, KeyboardInterrupt):  # no confirmation of the cancel, or Ctrl-C twice
            self.conn.forget(request.id)
            self.out.write("\n")
            self.say("(cancelled)")
            return None
        self.end_answer(answer)
        if answer.text or answer.reason != "cancelled":
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.text}]
        if answer.reason != "cancelled":
            remember_model(self.settings, self.model)
        return answer

    def end_answer(self, answer: Answer) -> None:
        if answer.text and not answer.text.endswith("\n"):
            self.out.write("\n")
        if answer.reason == "cancelled":
            self.say("(cancelled)")
        elif answer.reason == "length":
            self.say(f"(stopped at max_tokens = {answer.done.get('completion_tokens', '?')}; "
                     "/set max_tokens N for longer answers)")
        if self.show_stats and answer.reason != "cancelled":
            self.say(render.stats_line(answer.done))
        self.out.write("\n")
        self.out.flush()

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    # -- output -------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.out.write(self.style.dim(text) + "\n")
        self.out.flush()

    def error(self, e: AnemllError) -> None:
        self.out.write(self.style.red(render.error_text(e.message, e.hint)) + "\n")
        self.out.flush()

    def call(self, cls: type[Request], **fields: Any) -> Any:
        """A management request from a slash command: its final event, or None
        after printing why not (an error, a bad name, Ctrl-C)."""
        status = render.StatusLine(self.err)
        try:
            request = cls(id=self.conn.next_id(), **fields)
            for event in self.conn.stream(request, cancellable=False):
                if event.event == "progress":
                    status.show(f"{event.get('stage', '')} {event.get('model', '')} "
                                f"{render.percent(event.get('fraction'))}")
                elif event.final:
                    event.raise_for_error()
                    return event
        except ProtocolError as e:
            self.error(e)
        except Interrupted:
            self.say("(stopped waiting; the daemon carries on)")
        finally:
            status.clear()
        return None

    # -- slash commands: return False to quit ----------------------------------------

    def cmd_help(self, rest: str) -> None:
        self.out.write(HELP + "\n")

    def cmd_bye(self, rest: str) -> bool:
        return False

    def cmd_models(self, rest: str) -> None:
        event = self.call(Models)
        if event is not None:
            models = event["models"]
            lines = render.models_lines(models, self.style) if models else ["no models yet"]
            self.out.write("\n".join(lines) + "\n")

    def cmd_ps(self, rest: str) -> None:
        event = self.call(Ps)
        if event is not None:
            lines = render.ps_lines(event["ps"], self.style) if event["ps"] else ["no models are loaded"]
            self.out.write("\n".join(lines) + "\n")

    def cmd_load(self, rest: str) -> None:
        words = rest.split()
        name = words[0] if words else self.model
        try:
            keep = {"keep_alive": parse_setting("keep_alive", words[1])} if len(words) > 1 else {}
            if name != self.model:
                resolve_model(self.conn, self.settings, name, wait=True, err=self.err)
        except AnemllError as e:
            self.error(e)
            return
        except Interrupted:
            self.say("(stopped waiting)")
            return
        if self.call(Load, model=name, **keep) is None:
            return
        if name != self.model:
            # a session belongs to one model; the conversation goes along
            self.model, self.session = name, new_session()
            remember_model(self.settings, name)
            self.say(f"loaded {name}; now chatting with it")
        else:
            self.say(f"loaded {name}")

    def cmd_unload(self, rest: str) -> None:
        name = rest.split()[0] if rest.split() else self.model
        if self.call(Unload, model=name) is not None:
            self.say(f"unloaded {name}")

    def cmd_pin(self, rest: str) -> None:
        words = rest.split()
        pin = not (words and words[-1].lower() in ("off", "false", "no"))
        if not pin:
            words = words[:-1]
        name = words[0] if words else self.model
        if self.call(Pin, model=name, pin=pin) is not None:
            self.say(f"pinned {name}: it stays loaded until the daemon restarts" if pin else f"unpinned {name}")

    def cmd_set(self, rest: str) -> None:
        key, _, value = rest.partition(" ")
        key = key.strip().replace("-", "_")
        if not key:
            self.say(show_options(self.options))
            return
        if not value.strip():
            if key not in SAMPLING:
                self.say(f"no setting {key!r}; settings: {', '.join(SAMPLING)}")
                return
            self.options.pop(key, None)
            self.say(f"{key}: back to the daemon's default")
            return
        try:
            self.options[key] = parse_setting(key, value.strip())
        except ProtocolError as e:
            self.error(e)
            return
        self.say(f"{key} = {value.strip()}")

    def cmd_system(self, rest: str) -> None:
        self.system = rest or None
        self.say("system prompt set" if rest else "system prompt removed")

    def cmd_clear(self, rest: str) -> None:
        self.history.clear()
        self.session = new_session()
        self.say("conversation cleared")

    def cmd_stats(self, rest: str) -> None:
        self.show_stats = not self.show_stats
        self.say(f"statistics {'on' if self.show_stats else 'off'}")


def preload(conn: Connection, name: str, keep_alive: Any, err: TextIO) -> None:
    """Load the model before the first prompt, as `ollama run` does: the first
    answer is then quick, and a model that cannot load says so at once."""
    keep = {"keep_alive": keep_alive} if keep_alive is not None else {}
    status = render.StatusLine(err)
    unicode = render.can_draw_unicode(err)
    try:
        for event in conn.stream(Load(id=conn.next_id(), model=name, **keep), cancellable=False):
            if event.event == "progress":
                fraction = event.get("fraction", 0.0)
                status.show(f"loading {name} {render.bar(fraction, 20, unicode)} {render.percent(fraction)}")
            elif event.final:
                event.raise_for_error()
    finally:
        status.clear()


def new_session() -> str:
    return secrets.token_hex(8)


def setup_readline(settings: Settings) -> Any:
    """Line editing and a history kept between runs, where readline exists."""
    try:
        import readline
    except ImportError:
        return None
    path = chat_state_dir(settings) / HISTORY_FILE
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LENGTH)
    return (readline, path)


def save_history(history: Any) -> None:
    if history is None:
        return
    readline, path = history
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass
