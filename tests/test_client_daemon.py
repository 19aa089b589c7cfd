"""anemll-chat against a real daemon on a temp home: one-shot, --json,
--list/--ps/--jobs, a two-turn chat and Ctrl-C under a pseudo-terminal.
The model is a tiny random Llama (it rarely ends an answer by itself, which
makes a long answer to cancel)."""
from __future__ import annotations

import json

import pytest

from anemlld.convert import pipeline
from shared.options import ConvertOptions
from tests.daemon_harness import Client, DaemonProcess, wait_for_state
from tests.test_client import chat, terminal


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("chat") / "home"
    d = DaemonProcess(home).start()
    opts = ConvertOptions.from_mapping({"context_length": 128, "batch_size": 32, "lut_ffn": "none",
                                        "lut_lm_head": "none"})
    pipeline.convert(tiny_models["llama"], d.settings.drop_dir / "tiny", opts)  # converted: served as it is
    with Client(d.settings) as c:
        wait_for_state(c, "tiny", ("ready",), timeout=60)
    yield d
    assert d.stop() == 0


def test_one_shot_answer_and_its_json_events(served):
    out = chat(served.home, "tiny", "-p", "What does tar do?", "--max-tokens", "12", "--stats")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "12 generated" in out.stderr
    out = chat(served.home, "tiny", "-p", "What does tar do?", "--max-tokens", "5", "--json")
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["event"] for e in events][-1] == "done"
    # tokens faster than the stream interval share events; every id comes once
    assert sum(len(e["token_ids"]) for e in events if e["event"] == "token") == 5
    assert events[-1]["done_reason"] == "length" and events[-1]["completion_tokens"] == 5


def test_format_gives_json_that_validates_through_the_socket_and_the_worker(served, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"tool": {"enum": ["tar", "ls"]},
                                               "flags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                                         "maxItems": 3}},
              "required": ["tool", "flags"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    out = chat(served.home, "tiny", "--format", str(tmp_path / "schema.json"), "-p", "What does tar do?",
               "--max-tokens", "60")
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), schema)


def test_list_ps_and_jobs_show_the_daemons_state(served):
    chat(served.home, "tiny", "-p", "hi", "--max-tokens", "2")  # loaded now
    listing = chat(served.home, "--list")
    assert listing.returncode == 0 and "tiny" in listing.stdout and "loaded" in listing.stdout
    ps = chat(served.home, "--ps")
    assert ps.returncode == 0 and "tiny" in ps.stdout and "128" in ps.stdout
    jobs = chat(served.home, "--jobs")
    assert jobs.returncode == 0 and "tiny" in jobs.stdout and "done" in jobs.stdout


def test_two_turn_chat_reuses_the_session_and_ctrl_c_cancels_a_long_answer(served):
    t = terminal(served.home, "tiny")
    t.expect(r"tiny: /help for commands")
    t.send("/stats\r")
    t.expect(r"statistics on\n")
    t.send("/set max_tokens 6\r")
    t.expect(r"max_tokens = 6\n")
    t.send("first question\r")
    # earlier requests' states may already hold the template's first tokens (the prefix cache)
    first = t.expect(r"(\d+) prompt tokens(?: \(\d+ cached\))?, 6 generated")
    t.send("second question\r")
    second = t.expect(r"(\d+) prompt tokens \((\d+) cached\), 6 generated")
    assert int(second.group(2)) >= int(first.group(1))  # the whole first turn came from the session
    t.send("/set max_tokens 100000\r")
    t.expect(r"max_tokens = 100000\n")
    t.send("tell me everything\r")
    t.expect(r"tell me everything\n")  # the terminal's echo of what was typed
    t.expect(r"(?s).{40}")  # then the answer streams

    t.send("\x03")
    t.expect(r"\(cancelled\)\n")
    t.send("/bye\r")
    assert t.wait() == 0


def test_daemon_down_is_one_line_and_exit_2(tmp_path):
    out = chat(tmp_path / "nobody", "--list")
    assert out.returncode == 2
    assert "anemlld is not running" in out.stderr and "Traceback" not in out.stderr
