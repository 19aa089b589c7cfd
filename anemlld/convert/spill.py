"""Weights kept on disk from the moment they are made until their package
is written.

A directly built part (``program.py``) holds every weight it has quantized
until coremltools serializes the program: for an 8B model's chunk of eight
layers that is 1.75 GB of LUT indices (one byte per weight) held next to
the quantizer's work, so the peak grew with the chunk. Instead, each array
goes to a scratch file as soon as it exists, and the program holds a
placeholder of the same shape and dtype that takes no memory (one element
broadcast). When coremltools writes the program's blobs, the placeholder's
data is read back from the file, one weight at a time, so the peak is one
weight and the machinery, whatever the chunk's size.

The placeholders are matched by the ``weight_id`` of the const that holds
them (the id a weight carries in every function of its package), and by
shape and dtype; anything else is written by coremltools as before.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np


PREFIX = "anemlld-weights-"  # how a scratch file's name starts


class Spill:
    """A scratch file of arrays, each known by a key."""

    def __init__(self, directory: str | Path | None = None):
        fd, name = tempfile.mkstemp(prefix=PREFIX, suffix=".spill", dir=directory)
        self.path = Path(name)
        self._file = os.fdopen(fd, "w+b")
        self._where: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}

    def put(self, key: str, value: np.ndarray) -> np.ndarray:
        """Write ``value`` under ``key``; returns its placeholder: the same
        shape and dtype (sub-byte dtypes' metadata included), no memory."""
        return self.put_pieces(key, value.shape, value.dtype, [value])

    def put_pieces(self, key: str, shape: tuple[int, ...], dtype: np.dtype, pieces) -> np.ndarray:
        """Write the array of ``shape`` made of ``pieces`` (consecutive along
        axis 0, each made only when the one before is written) under
        ``key``; returns its placeholder: the same shape and dtype, no memory."""
        if key in self._where:
            raise KeyError(f"{key} is already spilled")
        self._file.seek(0, os.SEEK_END)
        start, count = self._file.tell(), 0
        for piece in pieces:
            if piece.dtype != dtype or piece.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"{key}: a piece of {piece.dtype} {piece.shape} in an array of {dtype} {shape}")
            np.ascontiguousarray(piece).tofile(self._file)
            count += piece.shape[0]
        if count != shape[0]:
            raise ValueError(f"{key}: pieces of {count} rows for an array of {shape[0]}")
        self._where[key] = (start, tuple(shape), dtype)
        return np.broadcast_to(np.zeros((), dtype=dtype), shape)

    def get(self, key: str) -> np.ndarray:
        """The array written under ``key``, read back into memory."""
        offset, shape, dtype = self._where[key]
        self._file.flush()
        self._file.seek(offset)
        count = int(np.prod(shape, dtype=np.int64))
        data = np.fromfile(self._file, dtype=np.dtype(dtype.str), count=count)
        if data.size != count:
            raise OSError(f"{self.path}: {key} is truncated ({data.size} of {count} values)")
        return data.view(dtype).reshape(shape)  # the dtype object again: coremltools reads its metadata

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        """Remove the file (the placeholders stay valid as shapes)."""
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def serialized(self):
        """Inside, coremltools writes each spilled const's blob from this
        file instead of from its placeholder."""
        from coremltools.converters.mil.backend.mil import helper

        real = helper._get_offset_by_writing_data
        spill = self

        class Real:  # what coremltools reads of the var: its dtype and its value
            def __init__(self, var, value):
                self.dtype, self.val = var.dtype, value

        def write(var, blob_writer):
            key = getattr(var.op, "weight_id", None) if var.op is not None else None
            if key in spill._where:
                _, shape, dtype = spill._where[key]
                if tuple(var.val.shape) == tuple(shape) and var.val.dtype == dtype:
                    value = spill.get(key)
                    if value.dtype == np.float16:  # what coremltools writes, without its two copies of the weight
                        return blob_writer.write_fp16_data(value.reshape(-1).view(np.uint16))
                    return real(Real(var, value), blob_writer)
            return real(var, blob_writer)

        helper._get_offset_by_writing_data = write
        try:
            yield self
        finally:
            helper._get_offset_by_writing_data = real
