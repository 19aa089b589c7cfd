"""Every way a conversion's input can be wrong ends in a BadInput that names
the problem and says what to do next, before any expensive work, leaving no
output folder and nothing half-made that looks finished."""
from __future__ import annotations

import json
import re
import struct
from collections import namedtuple
from pathlib import Path

import pytest

from anemlld import cli, layout
from anemlld.convert import lut, export, pipeline, program
from anemlld.convert.source import INDEX_FILE, HFSource
from shared.errors import BadInput
from shared.options import ConvertOptions

FAST = ConvertOptions(context_length=64, batch_size=32, lut_ffn=None, lut_lm_head=None)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
DELETE = object()


class HeavyWorkStarted(AssertionError):
    """Raised by the stand-ins for model building, export and tensor reads."""


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Any model build, export, quantization, compile or tensor read fails the
    test: bad input must be refused before the conversion starts working."""
    def refuse(what: str):
        def run(*a, **k):
            raise HeavyWorkStarted(f"{what} ran before the bad input was refused")
        return run

    # building on the meta device (shape checks) allocates nothing and is allowed
    real_build = pipeline.build

    def build_on_meta_only(*a, **k):
        import torch

        if torch.get_default_device().type != "meta":
            refuse("building a model")()
        return real_build(*a, **k)

    monkeypatch.setattr(pipeline, "build", build_on_meta_only)
    for name in ("export_embeddings", "export_chunk", "export_head", "combine", "compile_package"):
        monkeypatch.setattr(export, name, refuse(f"export.{name}"))
    monkeypatch.setattr(lut, "quantize_module", refuse("lut.quantize_module"))
    monkeypatch.setattr(program.DirectPart, "__init__", refuse("program.DirectPart"))
    monkeypatch.setattr(HFSource, "get", refuse("reading a tensor"))


@pytest.fixture
def out(tmp_path) -> Path:
    """Where a conversion would publish; its parent holds nothing else."""
    parent = tmp_path / "converted"
    parent.mkdir()
    return parent / "model-ane"


def nothing_looks_finished(out: Path) -> bool:
    """No output folder, and no manifest beside it that claims completion."""
    manifests = [json.loads(m.read_text()) for m in out.parent.rglob(layout.MANIFEST_FILE)]
    return not out.exists() and not any(m.get("complete") for m in manifests)


def refused(src: Path, out: Path, options: ConvertOptions = FAST) -> BadInput:
    """Convert, expecting a refusal that wrote nothing at all."""
    with pytest.raises(BadInput) as info:
        pipeline.convert(src, out, options)
    assert list(out.parent.iterdir()) == [], "a refused conversion wrote files"
    err = info.value
    assert err.hint, f"no hint for: {err.message}"
    return err


def edit_config(folder: Path, **changes) -> None:
    """Change config.json keys; a value of DELETE removes the key."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def rewrite_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = edit(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def split_in_two(folder: Path) -> None:
    """Re-save the single safetensors file as two shards plus an index, the
    layout of every large checkpoint."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    weight_map = {}
    for shard, part in zip(SHARDS, halves):
        save_file({n: tensors[n] for n in part}, folder / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors").unlink()
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# -- the model folder ------------------------------------------------------

def test_source_folder_that_does_not_exist_is_refused(tmp_path, out, no_heavy_work):
    err = refused(tmp_path / "no-such-model", out)
    assert "no-such-model" in err.message and "does not exist" in err.message


def test_missing_config_json_is_refused(tiny_copy, out, no_heavy_work):
    src = tiny_copy("llama")
    (src / "config.json").unlink()
    err = refused(src, out)
    assert "config.json" in err.message and "config.json" in err.hint


@pytest.mark.parametrize("damage, named", [
    pytest.param(lambda p: p.write_text('{"model_type": "llama",'), "cannot be read", id="invalid-json"),
    pytest.param(lambda p: p.write_text("[1, 2, 3]"), "not a JSON object", id="json-list"),
    pytest.param(lambda p: edit_config(p.parent, hidden_size=DELETE), "hidden_size", id="no-hidden-size"),
])
def test_unreadable_config_json_is_refused(tiny_copy, out, no_heavy_work, damage, named):
    src = tiny_copy("llama")
    damage(src / "config.json")
    err = refused(src, out)
    assert "config.json" in err.message and named in err.message


@pytest.mark.parametrize("value", ["big", None])
def test_config_with_a_non_integer_size_is_refused(tiny_copy, out, no_heavy_work, value):
    src = tiny_copy("llama")
    edit_config(src, hidden_size=value)
    err = refused(src, out)
    assert "hidden_size" in err.message


def test_missing_weight_shard_is_named(tiny_copy, out, no_heavy_work):
    src = tiny_copy("llama")
    split_in_two(src)
    (src / SHARDS[1]).unlink()
    err = refused(src, out)
    assert SHARDS[1] in err.message and INDEX_FILE in err.message
    assert SHARDS[0] not in err.message  # the one that is there is not blamed
    assert "copy the missing shard" in err.hint


@pytest.mark.parametrize("index", [
    pytest.param("{not json", id="invalid-json"),
    pytest.param(json.dumps({"metadata": {}}), id="no-weight-map"),
    pytest.param(json.dumps({"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}), id="path-outside"),
])
def test_unreadable_shard_index_is_refused(tiny_copy, out, no_heavy_work, index):
    src = tiny_copy("llama")
    split_in_two(src)
    (src / INDEX_FILE).write_text(index)
    err = refused(src, out)
    assert INDEX_FILE in err.message


def _truncated(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _header_overclaims_data(p: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))


@pytest.mark.parametrize("damage", [
    pytest.param(_truncated, id="truncated"),
    pytest.param(lambda p: p.write_bytes(b"\x00garbage" * 128), id="garbage"),
    pytest.param(lambda p: p.write_bytes(struct.pack("<Q", 24) + b"this is not json at all!" + bytes(64)),
                 id="garbage-header"),
    pytest.param(lambda p: p.write_bytes(struct.pack("<Q", 5000) + b"{}"), id="header-longer-than-file"),
    pytest.param(_header_overclaims_data, id="header-claims-more-data"),
    pytest.param(lambda p: p.write_bytes(b""), id="empty"),
])
def test_corrupt_safetensors_is_refused_before_reading_tensors(tiny_copy, out, no_heavy_work, damage):
    src = tiny_copy("llama")
    damage(src / "model.safetensors")
    err = refused(src, out)
    assert "model.safetensors" in err.message and "safetensors" in err.message
    assert "corrupt or truncated" in err.hint


def test_folder_without_any_weights_is_refused(tiny_copy, out, no_heavy_work):
    src = tiny_copy("llama")
    (src / "model.safetensors").unlink()
    err = refused(src, out)
    assert "no safetensors weights" in err.message and ".safetensors" in err.hint


def test_pytorch_bin_only_folder_is_told_to_use_safetensors(tiny_copy, out, no_heavy_work):
    src = tiny_copy("llama")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    err = refused(src, out)
    assert "no safetensors weights" in err.message
    assert ".bin" in err.hint and "safetensors" in err.hint


@pytest.mark.parametrize("drop, named", [
    ("model.layers.2.", "num_hidden_layers = 3 but the weights hold 2 decoder layers"),
    ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight is missing"),
])
def test_weights_missing_for_a_layer_config_announces_are_refused_up_front(tiny_copy, out, no_heavy_work,
                                                                             drop, named):
    src = tiny_copy("llama")  # three layers
    rewrite_weights(src, lambda t: {k: v for k, v in t.items() if not k.startswith(drop)})
    err = refused(src, out)
    assert named in err.message


def test_config_announcing_fewer_layers_than_the_weights_is_refused(tiny_copy, out, no_heavy_work):
    src = tiny_copy("llama")
    edit_config(src, num_hidden_layers=2)  # would silently drop layer 2
    err = refused(src, out)
    assert "num_hidden_layers = 2" in err.message and "3 decoder layers" in err.message


def test_unsupported_architecture_lists_the_supported_ones(tiny_copy, out, no_heavy_work):
    src = tiny_copy("llama")
    edit_config(src, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    err = refused(src, out)
    assert "gpt2" in err.message
    assert all(a in err.message for a in ("llama", "qwen2", "qwen3"))


def test_weight_shape_that_disagrees_with_config_is_found_before_any_work(tiny_copy, out, no_heavy_work):
    src = tiny_copy("llama")
    rewrite_weights(src, lambda t: {**t, "model.layers.1.self_attn.q_proj.weight":
                                    t["model.layers.1.self_attn.q_proj.weight"][:32].clone()})
    err = refused(src, out)
    assert "model.layers.1.self_attn.q_proj.weight" in err.message and "(32, 64)" in err.message
    assert "(64, 64)" in err.message


def test_failure_midway_leaves_nothing_that_looks_finished(tiny_copy, out, monkeypatch):
    """A stage that fails after some parts were made: those parts stay in the
    hidden work folder (for a resume), never in the output."""
    from anemlld.convert import export
    from shared.errors import AnemllError

    src = tiny_copy("llama")

    real = program.DirectPart.export

    def broken_head(self, function, *a, **k):
        if function is export.head_function:
            raise AnemllError("coremltools failed", "report it")
        return real(self, function, *a, **k)

    monkeypatch.setattr(program.DirectPart, "export", broken_head)
    opts = ConvertOptions(context_length=64, batch_size=32, chunks=3, lut_ffn=None, lut_lm_head=None)
    with pytest.raises(AnemllError) as info:
        pipeline.convert(src, out, opts)
    assert info.value.stage == "export"
    assert nothing_looks_finished(out)
    work = out.parent / f".{out.name}.partial"
    assert (work / "llama_FFN_PF_chunk_03of03.mlpackage").is_dir()  # something really was half-made
    assert json.loads((work / layout.MANIFEST_FILE).read_text())["complete"] is False


# -- options ---------------------------------------------------------------

def test_context_length_not_a_multiple_of_batch_size_is_refused():
    with pytest.raises(BadInput) as info:
        ConvertOptions.from_mapping({"context_length": 100, "batch_size": 64})
    err = info.value
    assert "context_length 100" in err.message and "batch_size 64" in err.message
    assert "128" in err.hint and "50" in err.hint  # a concrete way out either way


def test_batch_size_above_context_length_is_refused():
    with pytest.raises(BadInput) as info:
        ConvertOptions.from_mapping({"context_length": 64, "batch_size": 128})
    assert "larger than context_length 64" in info.value.message and info.value.hint


def test_more_chunks_than_layers_is_refused_at_planning(tiny_models, no_heavy_work):
    with pytest.raises(BadInput) as info:
        pipeline.plan(tiny_models["llama"], ConvertOptions.from_mapping({"chunks": 4}))
    err = info.value
    assert "chunks = 4" in err.message and "3 layers" in err.message
    assert "between 1 and 3" in err.hint


@pytest.mark.parametrize("key, value", [
    ("lut_ffn", 3), ("lut_embeddings", "five"), ("lut_lm_head", True), ("lut_ffn", 4.5), ("lut_ffn", "16"),
])
def test_lut_bits_outside_the_list_are_refused(key, value):
    with pytest.raises(BadInput) as info:
        ConvertOptions.from_mapping({key: value})
    err = info.value
    assert key in err.message and repr(value) in err.message
    assert "none, 4, 6 or 8" in err.hint and "\"4,8\"" in err.hint  # the sizes, and ANEMLL's bits,group form


def test_unknown_option_key_is_named_with_a_suggestion():
    with pytest.raises(BadInput) as info:
        ConvertOptions.from_mapping({"context-length": 1024}, where="anemll.toml [convert]")
    err = info.value
    assert "'context-length'" in err.message and "anemll.toml [convert]" in err.message
    assert "did you mean 'context_length'" in err.hint and "lut_lm_head" in err.hint


@pytest.mark.parametrize("key, value", [
    ("context_length", 0), ("batch_size", -64), ("max_chunk_mb", 0), ("chunks", 0), ("chunks", -2),
    ("context_length", True), ("batch_size", "abc"), ("context_length", 1.5), ("max_chunk_mb", None),
])
def test_non_positive_or_non_integer_numbers_are_refused(key, value):
    with pytest.raises(BadInput) as info:
        ConvertOptions.from_mapping({key: value})
    err = info.value
    assert f"{key} = {value!r}" in err.message and "positive integer" in err.message
    assert key in err.hint


def test_unsupported_architecture_option_is_refused():
    with pytest.raises(BadInput) as info:
        ConvertOptions.from_mapping({"architecture": "gpt2"})
    err = info.value
    assert "gpt2" in err.message and all(a in err.message for a in ("llama", "qwen2", "qwen3"))
    assert err.hint


@pytest.mark.parametrize("kw, named", [
    (dict(batch_size=0), "batch_size"),
    (dict(chunks=0), "chunks"),
    (dict(lut_ffn=3), "lut_ffn"),
    (dict(architecture="gpt2"), "gpt2"),
    (dict(context_length=100), "context_length 100"),
])
def test_options_built_in_code_get_the_same_checks(kw, named):
    """Not only the CLI and sidecar: a record built directly cannot carry a
    value that would crash the pipeline later (ZeroDivisionError, KeyError)."""
    with pytest.raises(BadInput) as info:
        ConvertOptions(**kw)
    assert named in info.value.message and info.value.hint


def test_option_spellings_from_the_cli_and_sidecar_are_accepted():
    opts = ConvertOptions.from_mapping({"context_length": "256", "batch_size": 32.0, "chunks": "AUTO",
                                        "lut_embeddings": "8", "lut_ffn": "none", "lut_lm_head": 6,
                                        "architecture": "Qwen3", "prefix": "my-model_2"})
    assert (opts.context_length, opts.batch_size, opts.chunks) == (256, 32, "auto")
    assert (opts.lut_embeddings, opts.lut_ffn, opts.lut_lm_head) == (8, None, 6)
    assert (opts.architecture, opts.prefix) == ("qwen3", "my-model_2")


# -- the output folder and the disk ----------------------------------------

@pytest.mark.parametrize("kind", ["folder-with-a-file", "file"])
def test_output_that_is_not_ours_is_refused_and_left_untouched(tiny_models, out, no_heavy_work, kind):
    if kind == "file":
        out.write_text("my notes\n")
        precious = out
    else:
        out.mkdir()
        precious = out / "notes.txt"
        precious.write_text("my notes\n")
    before = precious.stat().st_mtime_ns
    with pytest.raises(BadInput) as info:
        pipeline.convert(tiny_models["llama"], out, FAST)
    err = info.value
    assert str(out) in err.message and "--out" in err.hint
    assert precious.read_text() == "my notes\n" and precious.stat().st_mtime_ns == before
    assert sorted(p.name for p in out.parent.rglob("*")) == sorted({out.name, precious.name})


def test_not_enough_free_disk_is_refused_with_the_numbers(tiny_models, out, no_heavy_work, monkeypatch):
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return namedtuple("usage", "total used free")(10**9, 10**9 - 4096, 4096)

    monkeypatch.setattr(pipeline.shutil, "disk_usage", disk_usage)
    with pytest.raises(BadInput) as info:
        pipeline.convert(tiny_models["llama"], out, FAST)
    err = info.value
    m = re.search(r"about (\d+) MB needed, (\d+) MB free", err.message)
    assert m and int(m[1]) > int(m[2]) == 0, err.message
    assert str(out.parent) in err.message and "space" in err.hint
    assert asked and all(out.parent == p or out.parent.is_relative_to(p) for p in asked)
    assert nothing_looks_finished(out)


# -- the command line ------------------------------------------------------

def _one_error(capsys, rc: int) -> list[str]:
    captured = capsys.readouterr()
    assert rc == 1
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].strip().startswith("->"), captured.err
    return lines


def test_cli_reports_a_bad_option_in_one_line_and_a_hint(tiny_models, out, capsys, no_heavy_work):
    rc = cli.main(["convert", str(tiny_models["llama"]), "--out", str(out), "--lut-ffn", "3"])
    error, hint = _one_error(capsys, rc)
    assert "lut_ffn" in error and "'3'" in error and "none, 4, 6 or 8" in hint
    assert list(out.parent.iterdir()) == []


def test_cli_reports_a_missing_shard_in_one_line_and_a_hint(tiny_copy, out, capsys, no_heavy_work):
    src = tiny_copy("qwen2")
    split_in_two(src)
    (src / SHARDS[0]).unlink()
    rc = cli.main(["convert", str(src), "--out", str(out), "--context-length", "64", "--batch-size", "32"])
    error, hint = _one_error(capsys, rc)
    assert SHARDS[0] in error and "copy the missing shard" in hint
    assert list(out.parent.iterdir()) == []
