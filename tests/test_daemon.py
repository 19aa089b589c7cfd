"""The whole daemon through real sockets and real files: a model dropped into
the drop folder becomes a served model with no other action."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import psutil
import pytest

from shared import protocol
from tests.conftest import DEMO_MODEL
from tests.daemon_harness import Client, DaemonProcess, wait_for_state

SIDECAR = """name = "pico"
[convert]
context_length = 128
batch_size = 32
lut_ffn = 4
lut_lm_head = 6
[serve]
keep_alive = "5m"
"""


def slow_copy(src: Path, dest: Path, pause: float = 0.4) -> None:
    """Files appear one by one, the weights last, as a slow copy would."""
    dest.mkdir(parents=True)
    files = sorted(src.iterdir(), key=lambda f: f.suffix == ".safetensors")
    for f in files:
        shutil.copy2(f, dest / f.name)
        time.sleep(pause)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("home"), "stalled_seconds = 3\n").start()
    yield d
    assert d.stop() == 0, d.stderr()[-3000:]


def test_dropped_folder_is_converted_once_and_answers_with_streamed_tokens(daemon):
    drop = daemon.settings.drop_dir
    (drop / "pico-llama.anemll.toml").write_text(SIDECAR)  # sidecar beside the folder
    slow_copy(DEMO_MODEL, drop / "pico-llama")
    with Client(daemon.settings) as c:
        entry = wait_for_state(c, "pico", ("ready", "loaded"))
        assert entry["options"]["lut_ffn"] in (4, "4") and entry["size_bytes"] > 0
        jobs = c.request(protocol.Jobs).data["jobs"]
        assert [j["name"] for j in jobs] == ["pico"] and jobs[0]["state"] == "done"  # converted once
        assert (daemon.settings.models_dir / "pico" / "meta.yaml").is_file()
        events = c.stream(protocol.Generate, model="pico",
                          messages=({"role": "user", "content": "What does the tar command do?"},))
        tokens = [e for e in events if e.event == "token"]
        done = events[-1]
        assert done.event == "done" and done.data["done_reason"] in ("stop", "length")
        assert sum(len(t.data["token_ids"]) for t in tokens) == done.data["completion_tokens"] > 0
        assert "tar" in "".join(t.data["text"] for t in tokens).lower()
        assert done.data["load_ms"] > 0 and done.data["tokens_per_s"] > 0
        ps = c.request(protocol.Ps).data["ps"]
        assert [p["name"] for p in ps] == ["pico"]
    # nothing partial was ever visible in the models folder
    assert sorted(p.name for p in daemon.settings.models_dir.iterdir() if not p.name.startswith(".")) == ["pico"]


def test_bad_inputs_end_in_the_failed_folder_while_the_daemon_serves(daemon, tiny_models):
    drop = daemon.settings.drop_dir
    bad = drop / "badsidecar"
    shutil.copytree(tiny_models["llama"], bad)
    (bad / "anemll.toml").write_text('[convert]\nlut_ffn = 5\n')
    missing = drop / "missingshard"
    shutil.copytree(tiny_models["llama"], missing)
    (missing / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    broken = daemon.home / "outside" / "broken"
    shutil.copytree(tiny_models["qwen2"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)  # corrupt weights
    with Client(daemon.settings) as c:
        entry = wait_for_state(c, "badsidecar", ("failed",), timeout=60)
        assert "lut_ffn" in entry["error"]["message"]
        failed = daemon.settings.failed_dir / "badsidecar"
        error = json.loads((failed / "error.json").read_text())
        assert "lut_ffn" in error["message"] and "--retry" in error["hint"]
        assert not bad.exists()  # moved, never re-queued by itself

        entry = wait_for_state(c, "missingshard", ("failed",), timeout=60)  # after stalled_seconds
        assert "model-00002-of-00002.safetensors" in entry["error"]["message"]
        assert (daemon.settings.failed_dir / "missingshard" / "error.json").is_file()

        c.request(protocol.Convert, path=str(broken), name="broken")
        entry = wait_for_state(c, "broken", ("failed",), timeout=60)
        assert "safetensors" in entry["error"]["message"]
        assert c.request(protocol.Hello).event == "hello"  # still serving


def test_hello_answers_within_half_a_second_while_a_child_process_converts(daemon, tiny_models):
    src = daemon.settings.drop_dir / "busy"
    shutil.copytree(tiny_models["llama"], src)
    (src / "anemll.toml").write_text('[convert]\ncontext_length = 64\nbatch_size = 16\nchunks = 3\n')
    me = psutil.Process(daemon.proc.pid)
    waits, pids, rss = [], set(), []
    with Client(daemon.settings) as c:
        deadline = time.monotonic() + 180
        job = None
        while time.monotonic() < deadline:
            job = next((j for j in c.request(protocol.Jobs).data["jobs"] if j["name"] == "busy"), None)
            if job and job["state"] in ("done", "failed"):
                break
            if job and job["state"] == "running" and job["stage"] in ("load", "export", "quantize", "combine"):
                t = time.perf_counter()
                assert c.request(protocol.Hello, timeout=5).event == "hello"
                waits.append(time.perf_counter() - t)
                pids.add(job["pid"])
                rss.append(me.memory_info().rss)
            time.sleep(0.05)
    assert job is not None and job["state"] == "done", daemon.stderr()[-3000:]
    assert len(waits) >= 20 and max(waits) < 0.5, waits
    assert len(pids) == 1 and None not in pids and daemon.proc.pid not in pids
    assert max(rss) < 200 << 20  # torch and coremltools stay in the child


def test_kill_9_during_conversion_resumes_after_restart(tmp_path, tiny_models):
    home = tmp_path / "home"
    d = DaemonProcess(home).start()
    src = d.settings.drop_dir / "tiny"
    shutil.copytree(tiny_models["llama"], src)
    (src / "anemll.toml").write_text('[convert]\ncontext_length = 64\nbatch_size = 16\nchunks = 3\n')
    with Client(d.settings) as c:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = c.request(protocol.Jobs).data["jobs"]
            if jobs and jobs[0]["state"] == "running" and jobs[0]["stage"] in ("export", "quantize", "combine"):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"conversion never started: {d.stderr()[-2000:]}")
    child = psutil.Process(jobs[0]["pid"])
    d.kill9()
    child.wait(5)  # the conversion child ends with the daemon, however it went
    visible = [p.name for p in d.settings.models_dir.iterdir() if not p.name.startswith(".")]
    assert visible == []  # the partial model is hidden
    d2 = DaemonProcess(home).start()
    try:
        with Client(d2.settings) as c:
            wait_for_state(c, "tiny", ("ready", "loaded"), timeout=180)
            jobs = c.request(protocol.Jobs).data["jobs"]
            assert len(jobs) == 1 and jobs[0]["state"] == "done"
        manifest = json.loads((d2.settings.models_dir / "tiny" / "anemlld.json").read_text())
        from anemlld.convert import pipeline
        from shared.sidecar import load_sidecar

        assert manifest["fingerprint"] == pipeline.plan(src, load_sidecar(src).convert).fingerprint
    finally:
        assert d2.stop() == 0
