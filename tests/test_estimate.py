"""What a conversion will cost, said before it starts (``anemlld convert
--estimate``, the part-size guard) and while it runs (time left in every
progress report, the journal and the ``jobs`` records)."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from anemlld import cli
from anemlld.convert import estimate, pipeline
from anemlld.jobs import Jobs
from anemlld.registry import Registry
from client import render
from shared.errors import BadInput
from shared.options import ConvertOptions
from shared.settings import Settings
from tests.conftest import make_tiny_model

OPTIONS = dict(context_length=64, batch_size=16, chunks=1, lut_embeddings="none", lut_ffn=4, lut_lm_head=6)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """Embeddings of 4096 x 256 fp16 weights: 2 MB, one part over a 1 MB limit."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("hf") / "wide", hidden_size=256, intermediate_size=256,
                           num_hidden_layers=1)


def test_estimate_names_every_part_with_its_size(wide_llama):
    p = pipeline.plan(wide_llama, ConvertOptions.from_mapping(OPTIONS))
    p.source.close()
    est = estimate.estimate(p)
    assert [part.name for part in est.parts] == p.parts
    emb, chunk, head = est.parts
    assert emb.bytes == 4096 * 256 * 2 and head.bytes == 4096 * 256 * 6 // 8
    assert chunk.bytes == p.args.layer_params * 4 // 8 and chunk.functions == 2
    assert est.output_bytes == p.estimated_bytes
    assert est.disk_bytes > est.output_bytes and est.peak_bytes > 0
    assert set(est.stage_seconds) == {"load", "quantize", "export"}  # chunks are exported directly: no combine
    assert est.seconds == pytest.approx(sum(est.stage_seconds.values())) and est.seconds > 0


def test_each_part_is_priced_once_for_all_its_functions_and_never_combined(wide_llama):
    def plan(**options):
        p = pipeline.plan(wide_llama, ConvertOptions.from_mapping({**OPTIONS, **options}))
        p.source.close()
        return p

    logits, both = estimate.estimate(plan()), estimate.estimate(plan(argmax_in_model=True))
    assert [part.functions for part in both.parts] == [1, 2, 2]  # the head: logits and argmax
    # the argmax function adds its tracing, not a second copy of the head's weights
    assert both.stage_seconds["export"] - logits.stage_seconds["export"] == pytest.approx(
        estimate.FIXED_SECONDS["export"])
    mono = plan(monolithic=True, argmax_in_model=True, chunks="auto")
    (part,) = estimate.estimate(mono).parts
    assert part.functions == 3 and part.layer_weights == mono.args.layer_params
    assert estimate.disk_bytes(mono) == mono.estimated_bytes + 2 * part.bytes + part.weights  # spilled indices
    assert "combine" not in estimate.estimate(mono).stage_seconds


def test_speed_factor_scales_the_time_and_a_bad_one_is_refused(wide_llama, monkeypatch):
    p = pipeline.plan(wide_llama, ConvertOptions.from_mapping(OPTIONS))
    p.source.close()
    base = estimate.estimate(p).seconds
    monkeypatch.setenv(estimate.SPEED_ENV, "2")
    assert estimate.estimate(p).seconds == pytest.approx(base / 2)
    monkeypatch.setenv(estimate.SPEED_ENV, "fast")
    with pytest.raises(BadInput, match="ANEMLL_CONVERT_SPEED"):
        estimate.estimate(p)


def test_a_part_over_the_size_limit_is_refused_at_planning_with_the_lut_that_fits(wide_llama):
    over = ConvertOptions.from_mapping({**OPTIONS, "max_chunk_mb": 1})
    with pytest.raises(BadInput) as e:
        pipeline.plan(wide_llama, over)
    assert "llama_embeddings would be 2 MB, above max_chunk_mb = 1" in e.value.message
    assert "lut_embeddings = 8" in e.value.hint and "--lut-embeddings 8" in e.value.hint and e.value.stage == "inspect"
    fits = pipeline.plan(wide_llama, ConvertOptions.from_mapping({**OPTIONS, "max_chunk_mb": 1, "lut_embeddings": 8}))
    fits.source.close()


@pytest.fixture(scope="module")
def big_embeddings(tmp_path_factory) -> Path:
    """A Llama of 262144 x 256 embeddings (67 M weights) whose safetensors is
    a sparse file: planning reads only its header, so it takes no disk or time."""
    import json
    import struct

    import torch
    import transformers

    dest = tmp_path_factory.mktemp("hf") / "big-embeddings"
    dest.mkdir()
    cfg = transformers.LlamaConfig(vocab_size=262144, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    cfg.save_pretrained(dest)
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in transformers.AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    path = dest / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    os.truncate(path, 8 + len(blob) + offset)
    return dest


def test_a_per_tensor_lut_whose_kmeans_the_machine_lacks_is_refused_at_planning_naming_the_group_size_that_fits(
        big_embeddings, tmp_path, monkeypatch):
    from anemlld.convert import memory

    options = {**OPTIONS, "lut_ffn": "none", "lut_lm_head": "none"}
    none, grouped, per_tensor = (pipeline.plan(big_embeddings, ConvertOptions.from_mapping(
        {**options, "lut_embeddings": lut})) for lut in ("none", 6, "6,0"))
    for p in (none, grouped, per_tensor):
        p.source.close()
    found = memory.per_tensor_kmeans(per_tensor)
    assert (found.option, found.weights) == ("lut_embeddings", 262144 * 256) and memory.per_tensor_kmeans(grouped) is None
    # one table over 67 M weights at once, 28 bytes each; groups work in slabs of 16 M values and keep 6 per weight
    need, fits = estimate.estimate(per_tensor).peak_bytes, estimate.estimate(grouped).peak_bytes
    assert need > fits > estimate.estimate(none).peak_bytes
    monkeypatch.setattr(memory, "total", lambda: need - 1)  # a machine with more than the grouped peak, less than this
    pipeline.plan(big_embeddings, ConvertOptions.from_mapping({**options, "lut_embeddings": 6})).source.close()
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=r'lut_embeddings = "6,0" clusters one table over 67 M weights at once') as e:
        pipeline.convert(big_embeddings, out, ConvertOptions.from_mapping({**options, "lut_embeddings": "6,0"}))
    assert '"6,16", or plain 6' in e.value.hint and e.value.stage == "inspect"
    assert not out.exists() and not list(tmp_path.iterdir())  # refused before any work
    monkeypatch.setattr(memory, "total", lambda: fits - 1)  # too little even for groups: no group size offered
    with pytest.raises(BadInput) as e:
        pipeline.plan(big_embeddings, ConvertOptions.from_mapping({**options, "lut_embeddings": "6,0"}))
    assert "group size" not in e.value.hint and "more memory" in e.value.hint


def test_cli_estimate_prints_the_plan_and_writes_nothing(wide_llama, tmp_path, capsys):
    assert cli.main(["convert", str(wide_llama), "--estimate", "--context-length", "64", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    for name in ("llama_embeddings", "llama_FFN_PF_lut4_chunk_01of01", "llama_lm_head_lut6"):
        assert name in out
    assert "disk needed" in out and "peak memory" in out and "time" in out
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["convert", str(wide_llama)]) != 0  # no --out and no --estimate
    assert "--out" in capsys.readouterr().err


def test_progress_reports_time_left_until_none_is_left(tiny_models, tmp_path):
    import time

    events: list[tuple[float, pipeline.Progress]] = []
    start = time.monotonic()
    pipeline.convert(tiny_models["qwen3"], tmp_path / "out", ConvertOptions.from_mapping({**OPTIONS, "chunks": 2}),
                     progress=lambda e: events.append((time.monotonic() - start, e)))
    working = [e for _, e in events if e.stage != "done"]
    assert all(isinstance(e.eta_seconds, float) and e.eta_seconds >= 0 for e in working)
    assert working[0].eta_seconds > 0  # before any measured work: the plan's estimate
    assert working[-1].stage == "publish" and working[-1].eta_seconds == 0.0
    # From the rate measured so far: past half the work, the time left is
    # of the order of the time taken (a factor of 4 either way: the stages'
    # costs per weight differ, and the machine's load varies).
    took, half = next((t, e) for t, e in events if e.fraction >= 0.5)
    assert took / 4 < half.eta_seconds * half.fraction / (1 - half.fraction) < took * 4


def test_an_old_journal_gains_the_time_left_column(tmp_path):
    settings = Settings.load(home=tmp_path / "home", env={}, ram_bytes=8 << 30)
    settings.make_dirs()
    db = sqlite3.connect(settings.journal_path)
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, kind TEXT NOT NULL,"
               " source TEXT NOT NULL, origin TEXT NOT NULL, failed_path TEXT, fingerprint TEXT NOT NULL,"
               " options TEXT NOT NULL DEFAULT '{}', serve TEXT NOT NULL DEFAULT '{}',"
               " overrides TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL, stage TEXT NOT NULL DEFAULT '',"
               " part TEXT NOT NULL DEFAULT '', fraction REAL NOT NULL DEFAULT 0, error TEXT, output TEXT,"
               " created_at REAL NOT NULL, updated_at REAL NOT NULL)")
    db.execute("INSERT INTO jobs (name, kind, source, origin, fingerprint, state, created_at, updated_at)"
               " VALUES ('old', 'convert', '/x', '/x', 'f', 'failed', 1, 2)")
    db.commit()
    db.close()
    jobs = Jobs(settings, Registry())
    try:
        [job] = jobs.list()
        assert job["name"] == "old" and job["eta_seconds"] is None
    finally:
        jobs.close()


def test_the_client_shows_time_left_for_running_jobs_only():
    running = {"job": 1, "name": "m", "state": "running", "stage": "export", "fraction": 0.5, "eta_seconds": 190,
               "created_at": 0.0}
    assert render.time_left(running) == "about 3m10s left"
    assert "about 3m10s left" in render.job_line(running, now=60.0)
    assert render.time_left({**running, "state": "done"}) == ""
    assert render.time_left({**running, "eta_seconds": None}) == ""
