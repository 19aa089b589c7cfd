"""Our output read the way ANEMLL's runners read it, and ANEMLL's meta.yaml
spellings read by us: package metadata that such a runner int()s, a
tokenizer found from another working directory, the 0.3.5 keys that make its
runner use our prefill, the FFN named with or without its chunk suffix, and
meta.yaml files we cannot read refused with a message instead of a traceback."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from anemlld import layout
from anemlld.convert import pipeline
from shared.errors import BadInput
from shared.options import ConvertOptions

META_INTS = ("com.anemll.context_length", "com.anemll.num_chunks", "com.anemll.batch_size",
             "com.anemll.lut_bits", "com.anemll.chunk_no")


@pytest.fixture(scope="module")
def ours(tiny_models, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("interop") / "tiny-ane"
    opts = ConvertOptions.from_mapping({"context_length": 64, "batch_size": 16, "chunks": 2,
                                        "lut_embeddings": "none", "lut_ffn": 4, "lut_lm_head": "none"})
    pipeline.convert(tiny_models["llama"], dest, opts)
    return dest


def test_every_metadata_value_an_anemll_runner_int_s_parses_and_no_lut_means_no_key(ours):
    import coremltools as ct

    packages = sorted(ours.glob("*.mlpackage"))
    assert len(packages) == 4
    for package in packages:
        meta = dict(ct.utils.load_spec(str(package)).description.metadata.userDefined)
        for key in META_INTS:
            if key in meta:
                int(meta[key])  # what ANEMLL's chat.py does on opening a package
        has_lut = "_lut" in package.name
        assert ("com.anemll.lut_bits" in meta) == has_lut, package.name


def test_meta_yaml_has_the_keys_anemll_0_3_5_reads_and_no_tokenizer_path(ours):
    params = yaml.safe_load((ours / "meta.yaml").read_text())["model_info"]["parameters"]
    assert "tokenizer_path" not in params
    assert params["model_type"] == "chunked" and params["prefill_dynamic_slice"] is True
    assert params["update_mask_prefill"] is False and params["argmax_in_model"] is False
    assert params["num_logits"] == params["split_lm_head"] == len(params["lm_head_chunk_sizes"])
    assert params["lut_ffn_per_channel"] == 16 and "lut_lmhead_per_channel" not in params


def test_the_tokenizer_is_found_from_another_working_directory(ours, tmp_path):
    from transformers import AutoTokenizer

    params = yaml.safe_load((ours / "meta.yaml").read_text())["model_info"]["parameters"]
    here = os.getcwd()
    os.chdir(tmp_path)
    try:  # ANEMLL's runner: tokenizer_path if meta.yaml has one (relative to its cwd), else the model folder
        tok = AutoTokenizer.from_pretrained(params.get("tokenizer_path", str(ours)), local_files_only=True)
    finally:
        os.chdir(here)
    assert tok("hello")["input_ids"]


def rewrite(folder: Path, dest: Path, info: dict | None = None, **changes) -> Path:
    """A copy of ``folder`` with meta.yaml's parameters changed (``info``:
    keys of model_info itself; None removes a key)."""
    import shutil

    shutil.copytree(folder, dest)
    doc = yaml.safe_load((dest / "meta.yaml").read_text())
    for where, edits in ((doc["model_info"], info or {}), (doc["model_info"]["parameters"], changes)):
        where.update(edits)
        for key in [k for k, v in edits.items() if v is None]:
            del where[key]
    (dest / "meta.yaml").write_text(yaml.safe_dump(doc))
    return dest


def test_the_ffn_named_with_its_chunk_suffix_as_anemll_0_3_5_writes_it_resolves_the_same_chunks(ours, tmp_path):
    params = yaml.safe_load((ours / "meta.yaml").read_text())["model_info"]["parameters"]
    suffixed = params["ffn"].replace(".mlpackage", "_chunk_01of02.mlpackage")
    other = rewrite(ours, tmp_path / "v035", ffn=suffixed)
    assert [c.name for c in layout.read_meta(other).chunks()] == [c.name for c in layout.read_meta(ours).chunks()]


@pytest.mark.parametrize("info, changes, needle", [
    ({"model_type": "monolithic"}, {"model_type": None}, "lacks model_info.parameters.monolithic_model"),
    ({"model_type": "chunked"}, {"model_type": "monolithic"},
     "model_type 'chunked' in model_info and 'monolithic' in its parameters"),
    ({}, {"argmax_in_model": True, "lm_head_chunk_sizes": "many"}, "lm_head_chunk_sizes"),
    ({"model_type": "hybrid"}, {"model_type": None}, "model_type 'hybrid'"),
    ({}, {"num_chunks": "two"}, "num_chunks = 'two' is not a whole number"),
    ({}, {"argmax_in_model": "maybe"}, "argmax_in_model = 'maybe' is neither true nor false"),
    ({}, {"split_lm_head": None, "num_logits": "sixteen"}, "num_logits = 'sixteen' is not a whole number"),
    ({}, {"num_chunks": 0}, "num_chunks = 0 must be at least 1"),
    ({}, {"argmax_in_model": True, "lm_head_chunk_sizes": [2048, 2048], "vocab_size": None}, "a whole number per split"),
])
def test_meta_yaml_we_cannot_read_is_refused_with_a_message(ours, tmp_path, info, changes, needle):
    other = rewrite(ours, tmp_path / "other", info, **changes)
    with pytest.raises(BadInput, match=needle) as info:
        layout.read_meta(other)
    assert info.value.hint


class _Token:
    def __init__(self, content: str, special: bool = True):
        self.content, self.special = content, special


class _Tokenizer:
    def __init__(self, template: str, tokens: list[str]):
        self.chat_template = template
        self.added_tokens_decoder = {i: _Token(t) for i, t in enumerate(tokens)}


@pytest.mark.parametrize("template, tokens, ends", [
    ("{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
     "'<|eot_id|>' }}", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], {"<|eot_id|>"}),
    ("{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
     ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], {"<|im_end|>"}),
    ("{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
     "{{ message['content'] | trim }}<end_of_turn>\\n", ["<start_of_turn>", "<end_of_turn>"], {"<end_of_turn>"}),
    ("{{'<|user|>' + '\\n' + message['content'] + '<|end|>' + '\\n'}}", ["<|user|>", "<|end|>"], {"<|end|>"}),
    ("{{ message['content'] }}", ["<|x|>"], set()),
])
def test_end_of_turn_tokens_are_read_from_the_chat_templates_own_text(template, tokens, ends):
    from anemlld.runtime.engine import end_of_turn_ids

    found = end_of_turn_ids(_Tokenizer(template, tokens))
    assert {tokens[i] for i in found} == ends


def test_a_folder_without_generation_config_still_stops_at_the_end_of_turn(ours, tmp_path):
    import json

    from anemlld.runtime.engine import eos_ids, load_tokenizer

    folder = rewrite(ours, tmp_path / "v034")
    (folder / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = 1  # <|end_of_text|>, as a base model's config says
    (folder / "config.json").write_text(json.dumps(config))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["eos_token"] = "<|end_of_text|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    assert eos_ids(folder, load_tokenizer(folder)) == {1, 4}  # 4 is <|eot_id|>, from the template


RUNNER_SENDS = {  # what ANEMLL 0.3.5's tests/chat.py passes to each function of our folders
    "embeddings": {"input_ids"},
    "infer": {"hidden_states", "position_ids", "causal_mask", "current_pos"},
    "prefill": {"hidden_states", "position_ids", "causal_mask", "current_pos"},  # update_mask_prefill: false
    "lm_head": {"hidden_states"},
    "monolithic": {"input_ids", "position_ids", "causal_mask", "current_pos"},
}


def files_anemll_0_3_5_opens(folder: Path) -> dict[str, list[Path]]:
    """The packages ANEMLL 0.3.5's runner opens for ``folder``, found as it
    finds them: model_type from model_info (not its parameters), the names
    from the parameters without extension, .mlmodelc tried before
    .mlpackage, an ffn without chunk suffix completed from model_prefix and
    lut_ffn, every chunk globbed from the first one's name."""
    import glob
    import re

    doc = yaml.safe_load((folder / "meta.yaml").read_text())
    params = doc["model_info"]["parameters"]

    def strip(name: str) -> str:
        return name.replace(".mlmodelc", "").replace(".mlpackage", "")

    def resolve(stem: str) -> Path:
        found = [folder / (stem + ext) for ext in (".mlmodelc", ".mlpackage") if (folder / (stem + ext)).exists()]
        assert found, f"the runner finds no {stem} in {folder.name}"
        return found[0]

    if doc["model_info"].get("model_type", "chunked") == "monolithic":
        return {"monolithic": [resolve(strip(params["monolithic_model"]))]}
    ffn = strip(params["ffn"])
    if "_chunk_" not in ffn:
        lut = f"_lut{params['lut_ffn']}" if params["lut_ffn"] != "none" else ""
        ffn = f"{params['model_prefix']}_FFN_PF{lut}_chunk_01of{int(params['num_chunks']):02d}"
    first = resolve(ffn)
    chunks = [Path(p) for p in sorted(glob.glob(re.sub(r"_chunk_\d+of\d+", "_chunk_*", str(first))))]
    assert len(chunks) == int(params["num_chunks"])
    return {"embeddings": [resolve(strip(params["embeddings"]))], "ffn": chunks,
            "lm_head": [resolve(strip(params["lm_head"]))]}


@pytest.mark.parametrize("which", ["ours", "tiny_argmax", "tiny_monolithic"])
def test_our_folders_declare_exactly_what_anemll_0_3_5s_runner_opens_and_sends(which, request):
    """coremltools' MLModel refuses an input its function does not declare
    (the runner's predict would raise KeyError) and Core ML one it lacks."""
    import coremltools as ct

    folder = request.getfixturevalue(which)
    params = yaml.safe_load((folder / "meta.yaml").read_text())["model_info"]["parameters"]
    opened = files_anemll_0_3_5_opens(folder)
    functions = {"embeddings": [None], "ffn": ["infer", "prefill"], "lm_head": [None],
                 "monolithic": ["infer", "prefill"]}
    states = set()
    for kind, paths in opened.items():
        for path in paths:
            for fn in functions[kind]:
                model = ct.models.MLModel(str(path), skip_model_load=True, function_name=fn)
                sends = RUNNER_SENDS["monolithic" if kind == "monolithic" else fn or kind]
                assert model._model_input_names_set == sends, (path.name, fn)
                for key in META_INTS:
                    if key in model.user_defined_metadata:
                        int(model.user_defined_metadata[key])
                desc = (model._get_function_description(model.function_name) if model._is_multifunction()
                        else model.get_spec().description)  # the function it opened (the default one, without fn)
                states |= {s.name for s in desc.state}
                if kind in ("lm_head", "monolithic"):  # the default function's logits, as many as it concatenates
                    outputs = {o.name for o in desc.output}
                    assert outputs == {f"logits{i + 1}" for i in range(int(params["split_lm_head"]))}, path.name
    assert any("kv_cache_0" in s for s in states)  # its cache detection: one unified state for every chunk


def test_split_sizes_that_do_not_match_the_head_are_taken_from_the_vocabulary_as_anemlls_runner_does(ours, tmp_path):
    other = rewrite(ours, tmp_path / "v035", argmax_in_model=True, lm_head_chunk_sizes=[4096])
    lay = layout.read_meta(other)
    assert lay.split_lm_head == 8 and lay.lm_head_chunk_sizes == [512] * 8  # 4096 = vocab_size, in 8 splits


def test_model_type_is_where_anemlls_runner_and_swift_cli_read_it(ours, tiny_monolithic):
    """In model_info, for monolithic models only, as ANEMLL 0.3.5 writes it;
    ours keeps it among the parameters too."""
    mono = yaml.safe_load((tiny_monolithic / "meta.yaml").read_text())["model_info"]
    chunked = yaml.safe_load((ours / "meta.yaml").read_text())["model_info"]
    assert mono["model_type"] == mono["parameters"]["model_type"] == "monolithic"
    assert "model_type" not in chunked and chunked["parameters"]["model_type"] == "chunked"
