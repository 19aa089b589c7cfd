"""The sidecar: found inside the model folder or beside it (never both), read
with exactly the documented keys, defaults when absent, and every unknown key
or bad value refused naming the key and the file."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from shared.errors import BadInput
from shared.options import ConvertOptions
from shared.sidecar import Sidecar, default_name, find_sidecar, load_sidecar

ISSUE_EXAMPLE = """\
name = "pico"              # served name; default: the folder's name
[convert]
architecture = "llama"     # override detection
context_length = 512
batch_size = 64
chunks = "auto"            # or an integer
max_chunk_mb = 950
lut_embeddings = "none"    # none | 4 | 6 | 8
lut_ffn = 4
lut_lm_head = 6
prefix = "llama"           # default from the architecture
[serve]
pin = false
keep_alive = "30m"         # a duration; -1 forever; 0 unload after each request
"""


@pytest.fixture
def model(tmp_path) -> Path:
    folder = tmp_path / "drop" / "pico-llama"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def inside(model: Path, text: str) -> Path:
    (model / "anemll.toml").write_text(text)
    return model / "anemll.toml"


def beside(model: Path, text: str) -> Path:
    path = model.parent / f"{model.name}.anemll.toml"
    path.write_text(text)
    return path


def refused(model: Path, text: str) -> BadInput:
    path = inside(model, text)
    with pytest.raises(BadInput) as info:
        load_sidecar(model)
    err = info.value
    assert str(path) in err.message, f"file not named: {err.message}"
    assert err.hint and err.stage == "sidecar"
    return err


def test_no_sidecar_means_the_documented_defaults(model):
    assert find_sidecar(model) is None
    assert load_sidecar(model) == Sidecar(name="pico-llama", convert=ConvertOptions(), pin=False,
                                          keep_alive_seconds=None, path=None)


def test_the_issue_example_reads_exactly(model):
    path = inside(model, ISSUE_EXAMPLE)
    s = load_sidecar(model)
    assert (s.name, s.pin, s.keep_alive_seconds, s.path) == ("pico", False, 1800.0, path)
    assert s.convert == ConvertOptions(architecture="llama", context_length=512, batch_size=64, chunks="auto",
                                       max_chunk_mb=950, lut_embeddings=None, lut_ffn=4, lut_lm_head=6,
                                       prefix="llama")


def test_sidecar_beside_the_folder_is_found(model):
    path = beside(model, 'name = "tiny"\n[serve]\npin = true\nkeep_alive = -1\n')
    assert find_sidecar(model) == path
    s = load_sidecar(model)
    assert (s.name, s.pin, s.keep_alive_seconds) == ("tiny", True, math.inf)


def test_partial_sidecar_keeps_the_other_defaults(model):
    inside(model, "[convert]\ncontext_length = 1024\n[serve]\nkeep_alive = 0\n")
    s = load_sidecar(model)
    assert s.name == "pico-llama" and s.keep_alive_seconds == 0.0 and not s.pin
    assert s.convert == ConvertOptions(context_length=1024)


def test_two_sidecars_are_refused_saying_which_to_remove(model):
    a, b = inside(model, ""), beside(model, "")
    with pytest.raises(BadInput) as info:
        find_sidecar(model)
    assert str(a) in info.value.message and str(b) in info.value.message
    assert "delete" in info.value.hint and str(b) in info.value.hint
    with pytest.raises(BadInput):
        load_sidecar(model)


def test_folder_name_becomes_a_servable_default_name(tmp_path):
    assert default_name(tmp_path / "Llama 3.2 1B (instruct)") == "Llama-3.2-1B-instruct"
    assert default_name(tmp_path / "Qwen2.5-0.5B") == "Qwen2.5-0.5B"
    assert default_name(tmp_path / "???") == "model"
    folder = tmp_path / "My Model"
    folder.mkdir()
    assert load_sidecar(folder).name == "My-Model"


@pytest.mark.parametrize("text,words", [
    ("nmae = 'x'\n", ["'nmae'", "did you mean 'name'"]),
    ("[serv]\npin = true\n", ["[serv]", "did you mean 'serve'"]),
    ("[convert]\ncontext_lenght = 512\n", ["'context_lenght'", "[convert]", "did you mean 'context_length'"]),
    ("[serve]\npinn = true\n", ["'pinn'", "[serve]", "did you mean 'pin'"]),
    ("[serve]\nkeep_alive = '30m'\nport = 1\n", ["'port'"]),
])
def test_unknown_keys_and_tables_are_refused_naming_them(model, text, words):
    err = refused(model, text)
    for w in words:
        assert w in str(err)


@pytest.mark.parametrize("text,key", [
    ("name = 'a b'\n", "name"), ("name = 5\n", "name"), ("name = ''\n", "name"), ("name = '-x'\n", "name"),
    ("convert = 5\n", "convert"), ("serve = 'x'\n", "serve"),
    ("[convert]\ncontext_length = 'long'\n", "context_length"),
    ("[convert]\ncontext_length = 0\n", "context_length"),
    ("[convert]\nlut_ffn = 5\n", "lut_ffn"), ("[convert]\nchunks = 'many'\n", "chunks"),
    ("[convert]\narchitecture = 'gpt2'\n", "architecture"), ("[convert]\nprefix = 'a/b'\n", "prefix"),
    ("[convert]\nbatch_size = 1024\n", "batch_size"),
    ("[convert]\nargmax_in_model = 'yes'\n", "argmax_in_model"),
    ("[serve]\npin = 'yes'\n", "pin"), ("[serve]\npin = 1\n", "pin"),
    ("[serve]\nkeep_alive = 'soon'\n", "keep_alive"), ("[serve]\nkeep_alive = -5\n", "keep_alive"),
])
def test_bad_values_are_refused_naming_the_key_and_file(model, text, key):
    assert key in refused(model, text).message


def test_the_argmax_head_is_asked_for_in_the_convert_table(model):
    inside(model, "[convert]\nargmax_in_model = true\n")
    assert load_sidecar(model).convert.argmax_in_model is True
    assert ConvertOptions().argmax_in_model is False


def test_bad_keep_alive_says_the_accepted_forms(model):
    err = refused(model, "[serve]\nkeep_alive = '30 minutes'\n")
    assert '"30m"' in err.hint and "-1" in err.hint


def test_invalid_toml_is_refused_naming_the_file(model):
    assert "not valid TOML" in refused(model, "name = \n").message
    (model / "anemll.toml").write_bytes(b"name = '\xff'\n")
    with pytest.raises(BadInput, match="anemll.toml"):
        load_sidecar(model)


def test_from_mapping_checks_tables_given_in_code():
    s = Sidecar.from_mapping({"convert": {"lut_ffn": "none"}}, default_name="m", where="the convert request")
    assert s.convert.lut_ffn is None and s.name == "m"
    with pytest.raises(BadInput, match="the convert request"):
        Sidecar.from_mapping({"convert": {"lut_ffn": 3}}, default_name="m", where="the convert request")
