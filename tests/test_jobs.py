"""Conversion jobs: the journal, one worker in submission order, the failed
folder with error.json and retry, restarts (including a kill -9 in the middle
of a real conversion) that finish every job without converting anything twice."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from anemlld import layout
from anemlld.jobs import Jobs
from anemlld.registry import Registry
from anemlld.watcher import DropWatcher
from shared.errors import AnemllError
from shared.options import ConvertOptions
from shared.settings import Settings
from tests.conftest import REPO, make_tiny_model
from tests.test_watcher import write_converted

SMALL = """\
[convert]
context_length = 64
batch_size = 16
lut_ffn = "none"
lut_lm_head = "none"
"""
SMALL_OPTIONS = ConvertOptions(context_length=64, batch_size=16, lut_ffn=None, lut_lm_head=None)


@pytest.fixture(scope="module")
def one_layer_llama(tmp_path_factory) -> Path:
    """The tiny llama with one decoder layer: a real conversion takes ~10 s
    here instead of ~16 s with the session fixture's three."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("hf") / "tiny-llama", num_hidden_layers=1)


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings.load(home=tmp_path / "home", env={}, ram_bytes=8 << 30)
    s = dataclasses.replace(s, settle_seconds=0.3, rescan_seconds=0.2)
    s.make_dirs()
    return s


@pytest.fixture
def dropped(settings, one_layer_llama):
    def drop(name: str = "tiny", sidecar: str | None = SMALL, beside: bool = False) -> Path:
        folder = settings.drop_dir / name
        shutil.copytree(one_layer_llama, folder)
        if sidecar is not None:
            path = settings.drop_dir / f"{name}.anemll.toml" if beside else folder / "anemll.toml"
            path.write_text(sidecar)
        return folder
    return drop


class FakeConvert:
    """Stands in for pipeline.convert where the converter is not the point:
    checks the input the way the converter does first (a broken folder fails
    with the converter's own error), reports stages, publishes atomically."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.calls: list[tuple[Path, Path, ConvertOptions]] = []
        self.delay, self.gate = delay, gate
        self.active = 0
        self.overlapped = False

    def __call__(self, src, out, options, progress=None):
        from anemlld.convert.source import HFSource

        self.calls.append((Path(src), Path(out), options))
        self.active += 1
        self.overlapped |= self.active > 1
        try:
            HFSource.open(src).close()
            for i, stage in enumerate(("export", "quantize", "combine")):
                progress(SimpleNamespace(stage=stage, part="llama_FFN_PF_chunk_01of01", fraction=i / 3, message=""))
                if self.gate is not None:
                    self.gate.wait()
                time.sleep(self.delay)
            shutil.rmtree(out, ignore_errors=True)
            write_converted(Path(out))
            progress(SimpleNamespace(stage="done", part="", fraction=1.0, message="converted"))
        finally:
            self.active -= 1


def journal(settings: Settings) -> list[dict]:
    db = sqlite3.connect(f"file:{settings.journal_path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY id")]
    finally:
        db.close()


def break_index(folder: Path) -> None:
    """The weights renamed as shard 1 of 2, with an index that also lists an absent shard 2."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))


def fix_index(folder: Path) -> None:
    from anemlld.convert.source import safetensors_header

    shard = "model-00001-of-00002.safetensors"
    names = safetensors_header(folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))


@pytest.fixture
def make_jobs(settings):
    made: list[Jobs] = []

    def make(convert=None, registry: Registry | None = None, **kw) -> Jobs:
        jobs = Jobs(settings, registry or Registry(), convert=convert, **kw)
        made.append(jobs)
        return jobs
    yield make
    for jobs in made:
        jobs.stop(timeout=1.0)


# -- the life of a job ------------------------------------------------------------

def test_dropped_model_is_converted_once_and_announced_ready(settings, dropped, make_jobs):
    fake = FakeConvert(delay=0.05)
    events: list[dict] = []
    registry = Registry()
    states: list[str] = []
    registry.subscribe(lambda entry: states.append(entry.state))
    jobs = make_jobs(fake, registry, on_progress=events.append)
    subscribed: list[dict] = []
    jobs.subscribe(subscribed.append)
    jobs.subscribe(lambda record: 1 / 0)  # a failing listener harms nobody
    jobs.start()
    folder = dropped("tiny")
    first = jobs.submit(folder)
    assert first is not None
    assert jobs.submit(folder) is None  # same input while queued or running
    assert jobs.wait_idle(10)
    assert jobs.submit(folder) is None  # same input once done
    assert [c[:2] for c in fake.calls] == [(folder, settings.models_dir / "tiny")]
    assert fake.calls[0][2] == SMALL_OPTIONS  # the sidecar's [convert]

    entry = registry.get("tiny")
    assert entry.state == "ready" and entry.path == str(settings.models_dir / "tiny") and entry.size_bytes > 0
    assert entry.options["context_length"] == 64 and entry.options["lut_ffn"] == "none"
    assert "lut_group_size" not in entry.options
    assert states == ["queued", "converting", "ready"]

    [job] = jobs.list()
    assert set(job) == {"job", "name", "source", "state", "stage", "part", "fraction", "eta_seconds", "pid",
                        "created_at", "updated_at", "error"}
    assert job["eta_seconds"] is None  # only a running job has time left
    assert job["pid"] is None  # no conversion child: this one ran in-process, and it is over
    assert (job["job"], job["name"], job["state"], job["fraction"], job["error"]) == (first, "tiny", "done", 1.0, None)
    assert job["source"] == str(folder) and job["created_at"] <= job["updated_at"]
    assert [e["stage"] for e in events] == ["", "export", "quantize", "combine", "done", "done"]
    assert [e["state"] for e in events][-1] == "done" and events[-1]["message"] == "done"
    assert all(e["job"] == first and e["name"] == "tiny" for e in events)
    assert subscribed == events

    # A restart registers the converted model from the journal and converts nothing.
    jobs.stop()
    jobs.close()
    registry2 = Registry()
    again = make_jobs(FakeConvert(), registry2)
    again.start()
    assert again.submit(folder) is None
    assert again.wait_idle(5)
    assert registry2.get("tiny").state == "ready" and again._convert.calls == []


def test_a_changed_input_is_converted_again(settings, dropped, make_jobs):
    fake = FakeConvert()
    jobs = make_jobs(fake)
    jobs.start()
    folder = dropped("tiny")
    jobs.submit(folder)
    assert jobs.wait_idle(5)
    (folder / "anemll.toml").write_text(SMALL.replace("context_length = 64", "context_length = 128"))
    assert jobs.submit(folder) is not None
    assert jobs.wait_idle(5)
    assert [c[2].context_length for c in fake.calls] == [64, 128]


# -- failures, the failed folder, retry ---------------------------------------------

def test_bad_sidecar_fails_into_the_failed_folder_and_is_never_requeued(settings, dropped, make_jobs):
    fake = FakeConvert()
    registry = Registry()
    jobs = make_jobs(fake, registry)
    jobs.start()
    folder = dropped("tiny", sidecar="[convert]\ncontext_lenght = 64\n", beside=True)
    job_id = jobs.submit(folder)
    assert jobs.wait_idle(5)

    failed = settings.failed_dir / "tiny"
    assert not folder.exists() and not (settings.drop_dir / "tiny.anemll.toml").exists()
    assert failed.is_dir() and (settings.failed_dir / "tiny.anemll.toml").is_file()
    error = json.loads((failed / "error.json").read_text())
    assert error["stage"] == "sidecar" and error["code"] == "bad_input" and "context_lenght" in error["message"]
    assert "context_length" in error["hint"] and "anemll-chat --retry tiny" in error["hint"]
    assert error["job"] == job_id and error["input"] == str(failed) and error["retry"] == "anemll-chat --retry tiny"
    entry = registry.get("tiny")
    assert entry.state == "failed" and entry.error["stage"] == "sidecar" and entry.source == str(failed)
    [job] = jobs.list()
    assert job["state"] == "failed" and job["error"]["message"] == error["message"] and job["source"] == str(failed)

    # The same input showing up again (say a crash before the move) is not queued by itself.
    shutil.move(failed, folder)
    shutil.move(settings.failed_dir / "tiny.anemll.toml", settings.drop_dir / "tiny.anemll.toml")
    assert jobs.submit(folder) is None
    assert fake.calls == [] and len(jobs.list()) == 1
    # nor after a restart; and since its owner moved it (error.json is in it), it stays put
    jobs.stop()
    jobs.close()
    again = make_jobs(fake, Registry())
    again.start()
    assert again.submit(folder) is None and folder.is_dir() and (folder / "error.json").is_file()
    assert fake.calls == [] and len(again.list()) == 1


def test_bad_input_fails_with_error_json_then_retry_after_fixing_converts(settings, dropped, make_jobs):
    fake = FakeConvert()
    registry = Registry()
    jobs = make_jobs(fake, registry)
    jobs.start()
    folder = dropped("tiny")
    break_index(folder)
    jobs.submit(folder)
    assert jobs.wait_idle(10)

    failed = settings.failed_dir / "tiny"
    assert not folder.exists() and failed.is_dir()
    error = json.loads((failed / "error.json").read_text())
    assert error["stage"] == "inspect" and "model-00002-of-00002.safetensors" in error["message"]
    assert f"The input is now in {failed}" in error["hint"] and "anemll-chat --retry tiny" in error["hint"]
    assert registry.get("tiny").state == "failed"
    time.sleep(0.3)
    assert len(fake.calls) == 1 and len(jobs.list()) == 1  # nothing re-queued it

    with pytest.raises(AnemllError) as e:
        jobs.retry("nope")
    assert e.value.code == "not_found"

    fix_index(failed)  # fixed where it lies, as error.json says
    job = jobs.retry("tiny")
    assert job["state"] == "queued" and job["source"] == str(folder)
    assert jobs.wait_idle(10)
    assert folder.is_dir() and not failed.exists() and not (folder / "error.json").exists()
    assert registry.get("tiny").state == "ready" and (settings.models_dir / "tiny" / "meta.yaml").is_file()
    assert [j["state"] for j in jobs.list()] == ["failed", "done"]
    with pytest.raises(AnemllError) as e:
        jobs.retry("tiny")
    assert e.value.code == "bad_request"


def test_retry_of_a_bad_sidecar_reads_the_fixed_sidecar(settings, dropped, make_jobs):
    fake = FakeConvert()
    registry = Registry()
    jobs = make_jobs(fake, registry)
    jobs.start()
    dropped("tiny", sidecar='name = "bad name!"\n')
    jobs.submit(settings.drop_dir / "tiny")
    assert registry.get("tiny").state == "failed"
    (settings.failed_dir / "tiny" / "anemll.toml").write_text('name = "pico"\n' + SMALL)
    job = jobs.retry("tiny")
    assert jobs.wait_idle(10)
    assert job["name"] == "pico" and registry.get("pico").state == "ready" and registry.get("tiny") is None
    assert fake.calls[0][2] == SMALL_OPTIONS


def test_convert_op_leaves_an_outside_folder_in_place_when_it_fails(settings, tmp_path, one_layer_llama, make_jobs):
    jobs = make_jobs(FakeConvert())
    jobs.start()
    outside = tmp_path / "downloads" / "qwen"
    shutil.copytree(one_layer_llama, outside)
    (outside / "config.json").unlink()
    job = jobs.convert_path(outside, name="qwen", options={"context_length": 64, "batch_size": 16})
    assert job["name"] == "qwen"
    assert jobs.wait_idle(10)
    assert outside.is_dir() and (outside / "model.safetensors").is_file()
    error = json.loads((settings.failed_dir / "qwen.error.json").read_text())
    assert error["stage"] == "inspect" and "config.json" in error["message"]
    with pytest.raises(AnemllError) as e:
        jobs.convert_path(tmp_path / "nowhere")
    assert e.value.code == "not_found"
    with pytest.raises(AnemllError) as e:
        jobs.convert_path(outside, options={"batch_size": 100, "context_length": 64})
    assert e.value.code == "bad_request"


# -- order, converted folders, restarts -------------------------------------------

def test_one_conversion_at_a_time_in_submission_order(settings, dropped, make_jobs):
    fake = FakeConvert(delay=0.05)
    jobs = make_jobs(fake)
    folders = [dropped(name) for name in ("c", "a", "b")]
    ids = [jobs.submit(f) for f in folders]
    jobs.start()
    assert jobs.wait_idle(10)
    assert [c[0].name for c in fake.calls] == ["c", "a", "b"] and not fake.overlapped
    assert [j["job"] for j in jobs.list()] == sorted(ids) == ids
    assert [c[1] for c in fake.calls] == [settings.models_dir / n for n in ("c", "a", "b")]


def test_converted_folder_is_registered_where_it_is_without_converting(settings, make_jobs):
    fake = FakeConvert()
    registry = Registry()
    jobs = make_jobs(fake, registry)
    jobs.start()
    folder = write_converted(settings.drop_dir / "pico-ane")
    (settings.drop_dir / "pico-ane.anemll.toml").write_text('name = "pico"\n[serve]\npin = true\nkeep_alive = -1\n')
    assert jobs.submit(folder) is not None
    assert jobs.submit(folder) is None
    entry = registry.get("pico")
    assert entry.state == "ready" and entry.path == str(folder) and entry.pin and entry.keep_alive == float("inf")
    assert entry.options == {"context_length": 64, "batch_size": 16}
    assert fake.calls == [] and [j["state"] for j in jobs.list()] == ["done"]


def test_restart_resumes_a_job_the_journal_says_was_running(settings, dropped, make_jobs):
    before = make_jobs(FakeConvert())  # never started: the job stays queued
    folder = dropped("tiny")
    job_id = before.submit(folder)
    before.close()
    db = sqlite3.connect(settings.journal_path)
    db.execute("UPDATE jobs SET state = 'running', stage = 'export', fraction = 0.4 WHERE id = ?", (job_id,))
    db.commit()
    db.close()

    fake = FakeConvert()
    registry = Registry()
    after = make_jobs(fake, registry)
    after.start()
    assert after.wait_idle(10)
    assert [c[0] for c in fake.calls] == [folder]
    assert [(j["job"], j["state"]) for j in after.list()] == [(job_id, "done")]
    assert registry.get("tiny").state == "ready"


def test_restart_finishes_a_move_to_the_failed_folder_a_crash_interrupted(settings, dropped, make_jobs):
    jobs = make_jobs(FakeConvert())
    folder = dropped("tiny", sidecar="[convert]\nlut_ffn = 5\n")
    jobs.submit(folder)
    jobs.close()
    # as if killed after the journal said failed, before the move
    shutil.move(settings.failed_dir / "tiny", folder)
    (folder / "error.json").unlink()

    registry = Registry()
    again = make_jobs(FakeConvert(), registry)
    again.start()
    assert not folder.exists() and (settings.failed_dir / "tiny" / "error.json").is_file()
    assert registry.get("tiny").state == "failed"


def test_stop_does_not_wait_for_a_long_stage_and_the_job_resumes_next_start(settings, dropped, make_jobs):
    gate = threading.Event()
    jobs = make_jobs(FakeConvert(gate=gate))
    jobs.start()
    job_id = jobs.submit(dropped("tiny"))
    deadline = time.monotonic() + 5
    while jobs.get(job_id).stage != "export" and time.monotonic() < deadline:
        time.sleep(0.02)
    t = time.monotonic()
    assert jobs.stop(timeout=0.3) is False
    assert time.monotonic() - t < 1.0
    gate.set()  # the stage ends; the next stage boundary stops the worker
    time.sleep(0.2)
    assert jobs.get(job_id).state == "running" and not (settings.models_dir / "tiny").exists()

    fake = FakeConvert()
    again = make_jobs(fake)
    again.start()
    assert again.wait_idle(10) and again.get(job_id).state == "done" and len(fake.calls) == 1


def test_watcher_and_jobs_together_convert_a_slow_copy_once(settings, one_layer_llama, make_jobs):
    fake = FakeConvert()
    jobs = make_jobs(fake)
    jobs.start()
    watcher = DropWatcher(settings, jobs.submit)
    watcher.start()
    try:
        dest = settings.drop_dir / "slow"
        dest.mkdir()
        for f in sorted(one_layer_llama.iterdir(), key=lambda p: p.suffix == ".safetensors"):  # weights last
            shutil.copy2(f, dest / f.name)
            time.sleep(0.1)
        deadline = time.monotonic() + 5
        while not jobs.list() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert jobs.wait_idle(5)
        (dest / ".DS_Store").write_bytes(b"finder")  # the folder changes, the input does not
        time.sleep(1.0)
    finally:
        watcher.stop()
    assert len(fake.calls) == 1 and [j["state"] for j in jobs.list()] == ["done"]


# -- kill -9 in the middle of a real conversion -------------------------------------

CHILD = """
import json, logging, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from anemlld.jobs import Jobs
from anemlld.registry import Registry
from shared.settings import Settings
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
home = Path(sys.argv[2])
registry = Registry()
events = open(home / "events.jsonl", "a")
jobs = Jobs(Settings.load(home=home, env={}), registry,
            on_progress=lambda record: (events.write(json.dumps(record) + "\\n"), events.flush()))
jobs.start()
if len(sys.argv) > 3:
    jobs.submit(Path(sys.argv[3]))
jobs.wait_idle()
jobs.stop()
(home / "registry.json").write_text(json.dumps([e.to_wire() for e in registry.all()]))
"""


def _child(home: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "ANEMLL_HOME"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), str(home), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _watch(proc: subprocess.Popen, settings: Settings, until, timeout: float) -> None:
    """Poll until ``until()`` or the process ends, checking all along that the
    models folder shows nothing but complete models."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in settings.models_dir.iterdir():
            if not entry.name.startswith("."):
                manifest = json.loads((entry / layout.MANIFEST_FILE).read_text())
                assert manifest["complete"] is True and (entry / layout.META_FILE).is_file(), entry
        if until() or proc.poll() is not None:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out after {timeout}s")


def _job_rows(settings: Settings) -> list[dict]:
    try:
        return journal(settings)
    except sqlite3.Error:
        return []


def test_kill_9_mid_conversion_then_restart_finishes_the_same_model(tmp_path, one_layer_llama):
    from anemlld.convert import pipeline

    home = tmp_path / "home"
    settings = Settings.load(home=home, env={}, ram_bytes=8 << 30)
    settings.make_dirs()
    src = settings.drop_dir / "tiny"
    shutil.copytree(one_layer_llama, src)
    (src / "anemll.toml").write_text(SMALL)
    partial = settings.models_dir / ".tiny.partial"
    finished_part = partial / "llama_embeddings.mlpackage"
    log = tmp_path / "children.log"

    first = _child(home, log, str(src))

    def mid_way() -> bool:
        rows = _job_rows(settings)
        return bool(rows) and rows[0]["state"] == "running" and finished_part.is_dir() \
            and rows[0]["part"].startswith("llama_FFN")

    _watch(first, settings, mid_way, timeout=90)
    assert first.poll() is None, log.read_text()
    kept = (finished_part / "Manifest.json").stat()
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    assert [r["state"] for r in journal(settings)] == ["running"]
    assert [p.name for p in settings.models_dir.iterdir()] == [".tiny.partial"]

    second = _child(home, log)
    _watch(second, settings, lambda: False, timeout=90)
    assert second.wait(10) == 0, log.read_text()

    [row] = journal(settings)
    out = settings.models_dir / "tiny"
    assert row["state"] == "done" and row["output"] == str(out) and row["fraction"] == 1.0
    assert sorted(p.name for p in settings.models_dir.iterdir()) == ["tiny"]
    # the part finished before the kill was kept, not rebuilt
    assert (out / "llama_embeddings.mlpackage" / "Manifest.json").stat().st_ino == kept.st_ino
    # what an uninterrupted conversion of this input with these options writes
    plan = pipeline.plan(src, SMALL_OPTIONS)
    manifest = json.loads((out / layout.MANIFEST_FILE).read_text())
    assert manifest["fingerprint"] == plan.fingerprint and manifest["complete"] is True
    assert {f"{p}.mlpackage" for p in plan.parts} <= {p.name for p in out.iterdir()}
    assert "Traceback" not in log.read_text()
    # the restarted daemon announced it and reported its progress
    [entry] = json.loads((home / "registry.json").read_text())
    assert entry["state"] == "ready" and entry["size_bytes"] > 0 and entry["options"]["context_length"] == 64
    events = [json.loads(line) for line in (home / "events.jsonl").read_text().splitlines()]
    stages = [e["stage"] for e in events]
    assert "export" in stages and stages[-1] == "done" and events[-1]["state"] == "done"
