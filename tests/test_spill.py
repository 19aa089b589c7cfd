"""Weights spilled to disk until serialization (anemlld/convert/spill.py):
the package coremltools writes is the same, byte for byte, as from the
arrays themselves, and the program holds no copy of them."""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest

from anemlld.convert import export, lut
from anemlld.convert.spill import Spill


def _program(indices, table, dense):
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 32), dtype=types.fp16)],
                opset_version=export._ct().target.iOS18)
    def prog(x):
        w = mb.constexpr_lut_to_dense(indices=indices, lut=table, name="w_lut")
        for k in ("indices", "lut"):
            w.op.inputs[k].op.weight_id = f"w_{k}"
        d = mb.const(val=dense, name="d")
        d.op.weight_id = "d"
        y = mb.matmul(x=x, y=w, transpose_y=True)  # (1, 48)
        return mb.matmul(x=y, y=d)  # (1, 16)
    return prog


def _save(prog, path, spill=None):
    ct = export._ct()
    from coremltools.converters.mil.converter import mil_convert
    from coremltools import _SPECIFICATION_VERSION_IOS_18

    prog.skip_all_passes = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spill is None:
            m = mil_convert(prog, convert_to="mlprogram", convert_from="milinternal",
                            specification_version=_SPECIFICATION_VERSION_IOS_18,
                            compute_units=ct.ComputeUnit.CPU_ONLY, skip_model_load=True)
        else:
            with spill.serialized():
                m = mil_convert(prog, convert_to="mlprogram", convert_from="milinternal",
                                specification_version=_SPECIFICATION_VERSION_IOS_18,
                                compute_units=ct.ComputeUnit.CPU_ONLY, skip_model_load=True)
    m.save(str(path))
    return m


def _digest(pkg):
    return {p.relative_to(pkg).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pkg.rglob("*")) if p.is_file() and p.name != "Manifest.json"}


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 16, size=(48, 32)).astype(lut.index_dtype(4))
    table = rng.standard_normal((3, 1, 16, 1)).astype(np.float16)  # groups of 16 rows
    dense = rng.standard_normal((48, 16)).astype(np.float16)
    return indices, table, dense


def test_a_spilled_package_is_byte_for_byte_the_one_written_from_the_arrays(arrays, tmp_path):
    indices, table, dense = arrays
    _save(_program(indices, table, dense), tmp_path / "direct.mlpackage")
    with Spill(tmp_path) as spill:
        held = (spill.put("w_indices", indices), table, spill.put("d", dense))
        assert all(a.base is not None and a.strides == (0,) * a.ndim for a in (held[0], held[2]))
        _save(_program(*held), tmp_path / "spilled.mlpackage", spill)
    assert _digest(tmp_path / "spilled.mlpackage") == _digest(tmp_path / "direct.mlpackage")
    assert not spill.path.exists()


def test_the_placeholder_keeps_the_sub_byte_dtype_coremltools_writes_in_four_bits(arrays, tmp_path):
    from coremltools.converters.mil.mil import types

    indices, table, dense = arrays
    with Spill(tmp_path) as spill:
        held = spill.put("w_indices", indices)
        assert types.numpy_type_to_builtin_type(held.dtype) == types.uint4
        assert np.array_equal(spill.get("w_indices"), indices)
        assert spill.get("w_indices").dtype.metadata == indices.dtype.metadata


def test_without_the_context_the_placeholder_would_be_written_so_the_patch_is_what_matters(arrays, tmp_path):
    indices, table, dense = arrays
    _save(_program(indices, table, dense), tmp_path / "direct.mlpackage")
    with Spill(tmp_path) as spill:
        held = (spill.put("w_indices", indices), table, spill.put("d", dense))
        _save(_program(*held), tmp_path / "unpatched.mlpackage")  # no spill.serialized()
    assert _digest(tmp_path / "unpatched.mlpackage") != _digest(tmp_path / "direct.mlpackage")


def test_a_key_is_spilled_once_and_a_truncated_file_is_an_error(arrays, tmp_path):
    indices, _, _ = arrays
    with Spill(tmp_path) as spill:
        spill.put("w_indices", indices)
        with pytest.raises(KeyError, match="already spilled"):
            spill.put("w_indices", indices)
        spill._file.truncate(10)
        with pytest.raises(OSError, match="truncated"):
            spill.get("w_indices")


def test_a_weight_quantized_in_blocks_of_rows_is_the_weight_quantized_whole(tmp_path, monkeypatch):
    import torch

    from anemlld.convert import program

    weight = (torch.randn(96, 40) * 0.02).to(torch.bfloat16).to(torch.float16)
    whole = lut.quantize_weight(weight, 4, 16)
    monkeypatch.setattr(program, "BLOCK_VALUES", 40 * 20)  # blocks of 16 rows: whole groups
    tables = []
    with Spill(tmp_path) as spill:
        spill.put_pieces("w", weight.shape, np.dtype(lut.index_dtype(4)),
                         program._quantized_blocks(weight, 4, 16, tables))
        assert len(tables) == 6
        assert np.array_equal(spill.get("w"), whole.indices.numpy())
    assert torch.equal(torch.cat(tables), whole.lut)


def test_pieces_that_do_not_make_the_array_are_an_error(tmp_path):
    with Spill(tmp_path) as spill:
        with pytest.raises(ValueError, match="pieces of 2 rows for an array of 3"):
            spill.put_pieces("w", (3, 4), np.dtype(np.uint8), [np.zeros((2, 4), np.uint8)])
        with pytest.raises(ValueError, match="a piece of"):
            spill.put_pieces("v", (3, 4), np.dtype(np.uint8), [np.zeros((3, 5), np.uint8)])
