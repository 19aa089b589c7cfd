"""LUT group sizes per part in ANEMLL's spelling ("4,8": 4 bits, one table
per 8 output channels; "6,0": one table per tensor): options, the tables in
the packages, meta.yaml, and the converted model against the torch model
quantized the same way."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from anemlld.convert import lut, pipeline
from anemlld.convert.source import HFSource
from shared.errors import BadInput
from shared.options import ConvertOptions
from tests.ane_reference import chained, run

SPEC = {"lut_embeddings": "8,4", "lut_ffn": "4,8", "lut_lm_head": "6,0"}


@pytest.fixture(scope="module")
def grouped(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("groups") / "tiny-groups"
    pipeline.convert(tiny_models["llama"], out, ConvertOptions.from_mapping(
        {"context_length": 64, "batch_size": 16, "chunks": 2, **SPEC}))
    return out


def test_group_sizes_are_read_in_anemlls_spelling_and_written_back_the_same():
    opts = ConvertOptions.from_mapping({"lut_ffn": "4,8", "lut_lm_head": "6,0", "lut_embeddings": 8})
    assert (opts.lut_ffn, opts.group_size("lut_ffn")) == (4, 8)
    assert (opts.lut_lm_head, opts.group_size("lut_lm_head")) == (6, 0)
    assert opts.group_size("lut_embeddings") == opts.lut_group_size == 16  # no group given: the default
    mapping = opts.to_mapping()
    assert (mapping["lut_ffn"], mapping["lut_lm_head"], mapping["lut_embeddings"]) == ("4,8", "6,0", "8")
    assert ConvertOptions.from_mapping({k: mapping[k] for k in ConvertOptions.KEYS}) == opts
    for bad in ("4,x", "5,8", "none,8", "4,-1", "4,8,2"):
        with pytest.raises(BadInput, match="lut_ffn") as info:
            ConvertOptions.from_mapping({"lut_ffn": bad})
        assert '"4,0"' in info.value.hint


def test_a_sidecar_takes_the_same_strings(tmp_path):
    from shared.sidecar import load_sidecar

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "anemll.toml").write_text('[convert]\nlut_ffn = "4,8"\nlut_lm_head = "6,0"\n')
    opts = load_sidecar(folder).convert
    assert (opts.group_size("lut_ffn"), opts.group_size("lut_lm_head")) == (8, 0)


def lut_shapes(package: Path) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(weight shape, table shape) of every constexpr_lut_to_dense in ``package``."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(package))
    prog = load(spec, specification_version=spec.specificationVersion,
                file_weights_dir=ct.models.MLModel(str(package), skip_model_load=True).weights_dir)
    fn = next(iter(prog.functions.values()))
    return [(tuple(op.outputs[0].shape), tuple(op.inputs["lut"].shape)) for op in fn.operations
            if op.op_type == "constexpr_lut_to_dense"]


def test_each_part_has_one_table_per_group_of_its_size_and_meta_yaml_says_so(grouped):
    params = yaml.safe_load((grouped / "meta.yaml").read_text())["model_info"]["parameters"]
    assert (params["lut_embeddings"], params["lut_ffn"], params["lut_lmhead"]) == (8, 4, 6)
    assert (params["lut_embeddings_per_channel"], params["lut_ffn_per_channel"],
            params["lut_lmhead_per_channel"]) == (4, 8, 0)
    parts = {p.name.split("_")[1]: p for p in grouped.glob("*.mlpackage")}
    (emb_weight, emb_lut), = lut_shapes(parts["embeddings"])
    assert emb_lut == (emb_weight[0] // 4, 1, 256, 1)
    for weight, table in lut_shapes(next(grouped.glob("*chunk_01of02.mlpackage"))):
        assert table == (weight[0] // 8, 1, 1, 1, 16, 1), (weight, table)
    head = lut_shapes(parts["lm"])
    assert len(head) == 8 and all(table == (1, 1, 1, 1, 64, 1) for _, table in head)


@torch.no_grad()
def test_the_grouped_model_runs_as_the_torch_model_quantized_with_the_same_groups(grouped, tiny_models):
    from anemlld.runtime.engine import Engine

    ends, parts, cache = chained("llama", HFSource.open(tiny_models["llama"]), chunks=2)
    lut.quantize_module(ends.model, 8, 4, nn.Embedding)
    for part in parts:
        lut.quantize_module(part, 4, 8, nn.Conv2d)
    lut.quantize_module(ends.lm_head, 6, 0, nn.Conv2d)
    prompt = [0, 17, 300, 52, 99, 1000, 7, 2048, 11, 5, 900, 33, 61, 402, 18, 7, 77, 2500, 3, 1200]
    engine = Engine(grouped, executor="portable")
    ours = engine.feed(engine.new_session(), prompt)
    want = run(ends, parts, prompt, 0).numpy()
    assert np.abs(ours - want).max() < 0.05  # fp16 parts against fp32, same tables
