"""Conversions in a child process of their own (anemlld/convert/process.py,
driven by anemlld/jobs.py): a child killed mid-way is started again from its
last finished part and the output is the one an uninterrupted run writes;
three deaths fail the job with the signal, the stage and the peak memory; a
job waits while the system lacks the memory its plan estimates, and starts
when it frees; stopping ends the child at once and the job resumes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from anemlld import layout
from anemlld.convert.process import DIE_ENV
from anemlld.jobs import WAITING_FOR_MEMORY, Jobs
from anemlld.registry import Registry
from tests.test_convert import op_types, spec_of
from tests.test_jobs import SMALL_OPTIONS, dropped, journal, one_layer_llama, settings  # noqa: F401 (fixtures)

FFN = "llama_FFN_PF_chunk_01of01"


@pytest.fixture(scope="module")
def reference(one_layer_llama, tmp_path_factory) -> Path:
    """What an uninterrupted conversion of the input writes, converted in this process."""
    from anemlld.convert import pipeline

    root = tmp_path_factory.mktemp("ref")
    src = root / "drop" / "tiny"  # the name the jobs' input has: meta.yaml says it
    shutil.copytree(one_layer_llama, src)
    return pipeline.convert(src, root / "tiny", SMALL_OPTIONS).out_dir


def same_conversion(a: Path, b: Path) -> bool:
    """The two converted folders hold the same model: every file byte for
    byte (weights included) but our manifest (it holds times), each package's
    Manifest.json (coremltools names its items with random UUIDs) and its
    program, which must have the same ops in the same order and the same
    metadata (tracing names ops op_N from a counter that depends on what the
    process traced before: a resumed conversion numbers them differently)."""
    def files(folder: Path) -> dict[str, Path]:
        return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()
                and p.name not in (layout.MANIFEST_FILE, "Manifest.json")}

    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for rel, path in fa.items():
        if path.name == "model.mlmodel":
            sa, sb = spec_of(path.parent.parent.parent), spec_of(fb[rel].parent.parent.parent)
            assert sa.description.metadata == sb.description.metadata, rel
            assert list(sa.mlProgram.functions) == list(sb.mlProgram.functions), rel
            for fn in sa.mlProgram.functions:
                assert op_types(sa, fn) == op_types(sb, fn), (rel, fn)
        else:
            assert path.read_bytes() == fb[rel].read_bytes(), rel
    return True


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def jobs_made():
    made: list[Jobs] = []
    yield made
    for jobs in made:
        jobs.stop(timeout=5.0)
        jobs.close()


def test_child_killed_mid_way_is_restarted_from_its_last_part_and_writes_the_uninterrupted_output(
        settings, dropped, reference, monkeypatch, jobs_made):
    monkeypatch.setenv(DIE_ENV, f"export:{FFN}:1")  # the first child dies at the FFN's export
    events: list[dict] = []
    kept: list[int] = []
    embeddings = settings.models_dir / ".tiny.partial" / "llama_embeddings.mlpackage" / "Manifest.json"

    def listen(record: dict) -> None:
        events.append(record)
        if record["stage"] == "load" and record["part"] == FFN and not kept:
            kept.append(embeddings.stat().st_ino)  # finished before the death

    jobs = Jobs(settings, Registry(), on_progress=listen)
    jobs_made.append(jobs)
    jobs.start()
    job_id = jobs.submit(dropped("tiny"))
    assert jobs.wait_idle(120)

    job = jobs.get(job_id)
    assert job.state == "done" and job.error is None and job.pid is None
    pids = list(dict.fromkeys(e["pid"] for e in events if e["pid"] is not None))
    assert len(pids) == 2 and os.getpid() not in pids and not any(psutil.pid_exists(p) for p in pids)
    out = settings.models_dir / "tiny"
    # first: reading a package's spec rewrites its Manifest.json
    assert (out / "llama_embeddings.mlpackage" / "Manifest.json").stat().st_ino == kept[0]  # not rebuilt
    assert same_conversion(out, reference)
    manifest = json.loads((out / layout.MANIFEST_FILE).read_text())
    assert manifest["fingerprint"] == json.loads((reference / layout.MANIFEST_FILE).read_text())["fingerprint"]
    # each stage's peak memory, measured from outside the child
    peaks = manifest["stage_peak_rss_bytes"]
    assert {"load", "export"} <= set(peaks) and 100 << 20 < peaks["export"] <= manifest["peak_rss_bytes"]


def test_three_deaths_in_a_row_fail_the_job_with_the_signal_stage_and_peak_memory(
        settings, dropped, monkeypatch, jobs_made):
    monkeypatch.setenv(DIE_ENV, "export:llama_embeddings:3")
    registry = Registry()
    jobs = Jobs(settings, registry)
    jobs_made.append(jobs)
    jobs.start()
    job_id = jobs.submit(dropped("tiny"))
    assert jobs.wait_idle(120)

    error = json.loads((settings.failed_dir / "tiny" / "error.json").read_text())
    assert error["code"] == "conversion_died" and error["stage"] == "export" and error["signal"] == signal.SIGKILL
    assert "killed by signal 9 (SIGKILL) during export" in error["message"] and "3 times" in error["message"]
    assert 100 << 20 < error["peak_memory_bytes"] < 4 << 30
    assert "ran out of memory" in error["hint"] and "more chunks" in error["hint"]
    assert "anemll-chat --retry tiny" in error["hint"]
    job = jobs.get(job_id)
    assert job.state == "failed" and job.pid is None and job.error["signal"] == signal.SIGKILL
    assert registry.get("tiny").state == "failed"
    assert not (settings.models_dir / "tiny").exists()


def test_job_waits_for_memory_then_starts_and_stop_ends_the_child_so_the_next_start_finishes(
        settings, dropped, reference, jobs_made):
    free = {"bytes": 0}
    events: list[dict] = []
    jobs = Jobs(settings, Registry(), on_progress=events.append, available_memory=lambda: free["bytes"])
    jobs.memory_poll_seconds = 0.1
    jobs_made.append(jobs)
    jobs.start()
    job_id = jobs.submit(dropped("tiny"))

    waiting = wait_until(lambda: next((j for j in jobs.list() if j["stage"] == WAITING_FOR_MEMORY), None), 60,
                         "the job to wait for memory")
    assert waiting["state"] == "running" and psutil.pid_exists(waiting["pid"]) and waiting["pid"] != os.getpid()
    assert "needs " in waiting["part"] and " available" in waiting["part"]
    assert any("it starts when memory frees" in e["message"] for e in events)
    time.sleep(0.5)
    partial = settings.models_dir / ".tiny.partial"
    assert jobs.get(job_id).stage == WAITING_FOR_MEMORY and not partial.exists()  # nothing heavy started

    free["bytes"] = 1 << 50
    wait_until(lambda: jobs.get(job_id).part.startswith(FFN), 60, "the conversion to reach the FFN")
    pid = jobs.get(job_id).pid
    t = time.monotonic()
    assert jobs.stop(timeout=5.0) is True
    assert time.monotonic() - t < 3.0 and not psutil.pid_exists(pid)
    assert [r["state"] for r in journal(settings)] == ["running"] and partial.is_dir()

    again = Jobs(settings, Registry())
    jobs_made.append(again)
    again.start()
    assert again.wait_idle(120) and again.get(job_id).state == "done"
    assert same_conversion(settings.models_dir / "tiny", reference)
