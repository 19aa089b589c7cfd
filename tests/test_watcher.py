"""The drop folder: each readiness rule on its own (no timing), settling
driven by an explicit clock, and the running watcher reporting a slowly
copied folder once, after the copy ends."""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import pytest

from anemlld import layout
from anemlld.watcher import DropWatcher, readiness, snapshot
from shared.settings import Settings

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def make_hf(folder: Path, shards=SHARDS, index: bool = True, present=None) -> Path:
    """A Hugging Face-shaped folder (contents are not real weights: readiness
    looks at which files are there, not inside them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    if index:
        weight_map = {f"t{i}": shard for i, shard in enumerate(shards)}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for shard in shards if present is None else present:
        (folder / shard).write_bytes(b"\0" * 64)
    return folder


def write_converted(folder: Path, prefix: str = "llama") -> Path:
    """A minimal converted-model folder: meta.yaml and the parts it names."""
    tmp = folder.parent / f".{folder.name}.partial"
    tmp.mkdir(parents=True)
    params = {"context_length": 64, "batch_size": 16, "num_chunks": 1,
              "embeddings": f"{prefix}_embeddings.mlpackage", "lm_head": f"{prefix}_lm_head.mlpackage",
              "ffn": f"{prefix}_FFN_PF.mlpackage"}
    layout.write_meta(tmp, "test", "0", "llama", params)
    for part in (f"{prefix}_embeddings", f"{prefix}_lm_head", f"{prefix}_FFN_PF_chunk_01of01"):
        (tmp / f"{part}.mlpackage").mkdir()
        (tmp / f"{part}.mlpackage" / "Manifest.json").write_text("{}")
    (tmp / layout.MANIFEST_FILE).write_text(json.dumps({
        "converter": "anemlld test", "fingerprint": "test", "complete": True,
        "options": {"context_length": 64, "batch_size": 16}}))
    tmp.rename(folder)
    return folder


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings.load(home=tmp_path / "home", env={}, ram_bytes=8 << 30)
    s = dataclasses.replace(s, settle_seconds=0.5, rescan_seconds=0.2)
    s.drop_dir.mkdir(parents=True)
    return s


# -- readiness, one rule at a time ---------------------------------------------

def test_complete_sharded_folder_is_ready(tmp_path):
    ok, reason = readiness(make_hf(tmp_path / "m"))
    assert ok, reason


def test_missing_config_json_is_not_ready(tmp_path):
    folder = make_hf(tmp_path / "m")
    (folder / "config.json").unlink()
    assert readiness(folder) == (False, "no config.json yet")


def test_index_listing_an_absent_shard_is_not_ready(tmp_path):
    folder = make_hf(tmp_path / "m", present=SHARDS[:1])
    ok, reason = readiness(folder)
    assert not ok and SHARDS[1] in reason
    (folder / SHARDS[1]).write_bytes(b"\0")
    assert readiness(folder)[0]


def test_half_written_index_is_not_ready(tmp_path):
    folder = make_hf(tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"t0": "model-0')
    assert readiness(folder) == (False, "model.safetensors.index.json cannot be read yet")


def test_without_index_one_safetensors_file_is_needed(tmp_path):
    folder = make_hf(tmp_path / "m", index=False, present=())
    assert readiness(folder) == (False, "no *.safetensors weights yet")
    (folder / "model.safetensors").write_bytes(b"\0")
    assert readiness(folder)[0]


@pytest.mark.parametrize("leftover", ["model-00002-of-00002.safetensors.incomplete", "config.json.lock",
                                      "tokenizer.json.part", "sub/weights.tmp"])
def test_files_still_being_written_make_it_not_ready(tmp_path, leftover):
    folder = make_hf(tmp_path / "m")
    (folder / leftover).parent.mkdir(parents=True, exist_ok=True)
    (folder / leftover).write_bytes(b"")
    ok, reason = readiness(folder)
    assert not ok and leftover in reason


def test_hugging_face_download_in_progress_is_not_ready_but_its_finished_metadata_is_fine(tmp_path):
    folder = make_hf(tmp_path / "m")
    download = folder / ".cache" / "huggingface" / "download"
    download.mkdir(parents=True)
    # what `hf download --local-dir` leaves while a file is still coming
    (download / "Xo8p1c.5f2d8e.incomplete").write_bytes(b"")
    (download / "partial-blob").write_bytes(b"")
    assert not readiness(folder)[0]
    (download / "Xo8p1c.5f2d8e.incomplete").unlink()
    ok, reason = readiness(folder)
    assert not ok and ".cache/huggingface/download" in reason
    # ...and what it leaves for good once every file is there
    (download / "partial-blob").unlink()
    (download / "config.json.metadata").write_text("abc\ndef\n1712656091.1\n")
    (folder / ".cache" / "huggingface" / ".gitignore").write_text("*")
    assert readiness(folder)[0]


def test_converted_model_is_ready_only_with_every_part(tmp_path):
    folder = write_converted(tmp_path / "pico-ane")
    ok, reason = readiness(folder)
    assert ok and "converted" in reason
    (folder / "llama_FFN_PF_chunk_01of01.mlpackage" / "Manifest.json").unlink()
    (folder / "llama_FFN_PF_chunk_01of01.mlpackage").rmdir()
    ok, reason = readiness(folder)
    assert not ok and "llama_FFN_PF" in reason


def test_snapshot_sees_size_mtime_and_the_sidecar_beside(tmp_path):
    folder = make_hf(tmp_path / "m")
    before = snapshot(folder)
    (folder / SHARDS[0]).write_bytes(b"\0" * 65)
    grown = snapshot(folder)
    assert grown != before
    (tmp_path / "m.anemll.toml").write_text('name = "x"\n')
    assert snapshot(folder) != grown and any(".anemll.toml" in rel for rel, _, _ in snapshot(folder))


# -- settling, with an explicit clock ------------------------------------------

def test_changing_sizes_are_not_settled_until_stable(settings):
    reported = []
    w = DropWatcher(settings, reported.append)
    folder = make_hf(settings.drop_dir / "m")
    assert w.scan(now=0.0) == []
    assert w.scan(now=0.4) == []          # unchanged, but not for 0.5 s yet
    (folder / SHARDS[1]).write_bytes(b"\0" * 128)  # the copy goes on
    assert w.scan(now=0.6) == []          # changed: the clock starts again
    assert w.scan(now=1.0) == []
    assert w.scan(now=1.1) == [folder]    # 0.5 s unchanged since 0.6
    assert w.scan(now=5.0) == []          # the same snapshot is reported once
    assert reported == [folder]


def test_incomplete_folder_waits_until_stalled_seconds_then_is_handed_over_once(settings):
    """Never while it is still being copied; once unchanged for stalled_seconds
    (600 s by default) it goes to a job, which fails it with the reason."""
    w = DropWatcher(settings, lambda f: None)
    folder = make_hf(settings.drop_dir / "m", present=SHARDS[:1])
    for t in (0.0, 10.0, 599.0):
        assert w.scan(now=t) == []
    assert w.scan(now=600.0) == [folder]
    assert w.scan(now=5000.0) == []


def test_changed_again_after_reporting_is_reported_again_once_settled(settings):
    reported = []
    w = DropWatcher(settings, reported.append)
    folder = make_hf(settings.drop_dir / "m")
    w.scan(now=0.0)
    assert w.scan(now=1.0) == [folder]
    (folder / SHARDS[0]).write_bytes(b"\1" * 64)  # a re-copy: same size, new mtime
    os.utime(folder / SHARDS[0], ns=(1, 1))
    assert w.scan(now=2.0) == []
    assert w.scan(now=3.0) == [folder]
    assert reported == [folder, folder]


def test_editing_the_sidecar_beside_counts_as_a_change_of_its_folder(settings):
    reported = []
    w = DropWatcher(settings, reported.append)
    folder = make_hf(settings.drop_dir / "m")
    sidecar = settings.drop_dir / "m.anemll.toml"
    sidecar.write_text('name = "one"\n')
    w.scan(now=0.0)
    assert w.scan(now=1.0) == [folder]
    sidecar.write_text('name = "two"\n[serve]\npin = true\n')
    assert w.scan(now=2.0) == []
    assert w.scan(now=3.0) == [folder]  # the folder is reported, never the sidecar itself


def test_hidden_entries_files_and_sidecars_are_ignored(settings):
    w = DropWatcher(settings, lambda f: None)
    make_hf(settings.drop_dir / ".hidden-model")
    make_hf(settings.drop_dir / "odd.anemll.toml")  # a folder named like a sidecar
    (settings.drop_dir / "notes.txt").write_text("x")
    (settings.drop_dir / "m.anemll.toml").write_text('name = "m"\n')
    real = make_hf(settings.drop_dir / "m")
    assert w.candidates() == [real]


def test_a_folder_that_leaves_and_comes_back_is_reported_again(settings):
    reported = []
    w = DropWatcher(settings, reported.append)
    folder = make_hf(settings.drop_dir / "m")
    w.scan(now=0.0)
    w.scan(now=1.0)
    away = folder.rename(settings.drop_dir.parent / "m")  # e.g. moved to the failed folder
    w.scan(now=2.0)
    away.rename(folder)  # and back by a retry
    w.scan(now=3.0)
    assert w.scan(now=4.0) == [folder]
    assert reported == [folder, folder]


def test_an_exception_in_on_ready_does_not_stop_the_scan(settings):
    calls = []

    def on_ready(folder):
        calls.append(folder.name)
        raise RuntimeError("boom")

    w = DropWatcher(settings, on_ready)
    make_hf(settings.drop_dir / "a")
    make_hf(settings.drop_dir / "b")
    w.scan(now=0.0)
    w.scan(now=1.0)
    assert calls == ["a", "b"]


# -- the running watcher -------------------------------------------------------

def _copy_slowly(dest: Path, seconds: float = 2.0) -> float:
    """Files appear one by one, the largest shard last and in pieces, each
    pause shorter than the settle time; returns when the copy ended."""
    steps = 8
    pause = seconds / steps
    dest.mkdir()
    (dest / "config.json").write_text('{"model_type": "llama"}')
    time.sleep(pause)
    weight_map = {"a": SHARDS[0], "b": SHARDS[1]}
    (dest / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    time.sleep(pause)
    (dest / "tokenizer.json").write_text("{}")
    time.sleep(pause)
    (dest / SHARDS[0]).write_bytes(b"\0" * 1000)
    time.sleep(pause)
    with open(dest / SHARDS[1], "wb") as f:
        for i in range(steps - 4):
            if i:
                time.sleep(pause)
            f.write(b"\0" * 1000)
            f.flush()
    return time.monotonic()


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_slow_copy_is_reported_once_after_the_copy_ends(settings):
    reported: list[tuple[Path, float]] = []
    w = DropWatcher(settings, lambda f: reported.append((f, time.monotonic())))
    w.start()
    try:
        ended = _copy_slowly(settings.drop_dir / "slow")
        assert _wait_for(lambda: reported, 3.0)
        time.sleep(1.0)  # a few more scans, events and rescans: nothing more comes
    finally:
        w.stop()
    assert [f.name for f, _ in reported] == ["slow"]
    at = reported[0][1]
    assert at >= ended + settings.settle_seconds - 0.05
    assert at <= ended + settings.settle_seconds + 1.0


def test_rescan_finds_a_folder_without_any_file_event(settings, monkeypatch):
    monkeypatch.setattr(DropWatcher, "_start_observer", lambda self: None)
    got = threading.Event()
    w = DropWatcher(settings, lambda f: got.set())
    w.start()
    try:
        make_hf(settings.drop_dir / "quiet")
        assert got.wait(3.0)
    finally:
        w.stop()


def test_stop_returns_promptly(settings):
    w = DropWatcher(dataclasses.replace(settings, rescan_seconds=60.0), lambda f: None)
    w.start()
    t = time.monotonic()
    w.stop(timeout=2.0)
    assert time.monotonic() - t < 1.0


def test_loading_a_converted_model_does_not_count_as_a_new_copy(settings):
    """coremltools rewrites each package's Manifest.json (same bytes) whenever
    it opens one; a served folder must not be reported (and registered) again."""
    from anemlld.watcher import snapshot

    folder = settings.drop_dir / "m"
    manifest = folder / "x_embeddings.mlpackage" / "Manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    before = snapshot(folder)
    os.utime(manifest, ns=(10**18, 10**18))
    assert snapshot(folder) == before
    (folder / "x_embeddings.mlpackage" / "other.bin").write_bytes(b"1")
    assert snapshot(folder) != before
