"""Conversion options: one record for `anemlld convert` flags and the sidecar's
``[convert]`` table, with the same names and the same validation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shared.errors import BadInput

LUT_CHOICES = ("none", 4, 6, 8)
ARCHITECTURES = ("llama", "qwen2", "qwen3")


def parse_lut(key: str, value: Any) -> int | None:
    """``none``/4/6/8 (strings or ints) -> bits or None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "no", "off", "")):
        return None
    try:
        bits = int(value)
    except (TypeError, ValueError):
        bits = -1
    if bits not in (4, 6, 8) or isinstance(value, bool):
        raise BadInput(f"{key} = {value!r} is not a LUT size", f"use one of none, 4, 6, 8 for {key}")
    return bits


def lut_name(bits: int | None) -> str:
    return "none" if bits is None else str(bits)


@dataclass(frozen=True)
class ConvertOptions:
    context_length: int = 512
    batch_size: int = 64
    chunks: int | str = "auto"  # an integer or "auto"
    max_chunk_mb: int = 950
    lut_embeddings: int | None = None
    lut_ffn: int | None = 4
    lut_lm_head: int | None = 6
    prefix: str | None = None  # default: the architecture's
    architecture: str | None = None  # default: detected from config.json
    lut_group_size: int = field(default=16, metadata={"internal": True})

    KEYS = ("context_length", "batch_size", "chunks", "max_chunk_mb", "lut_embeddings",
            "lut_ffn", "lut_lm_head", "prefix", "architecture")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "options") -> "ConvertOptions":
        """Build from user-facing names (sidecar table or CLI), validating each key."""
        unknown = sorted(set(values) - set(cls.KEYS))
        if unknown:
            raise BadInput(f"unknown key {unknown[0]!r} in {where}",
                           f"valid keys are: {', '.join(cls.KEYS)}")
        kw: dict[str, Any] = {}
        for key, value in values.items():
            if key.startswith("lut_"):
                kw[key] = parse_lut(key, value)
            elif key in ("context_length", "batch_size", "max_chunk_mb"):
                kw[key] = _positive_int(key, value)
            elif key == "chunks":
                if isinstance(value, str) and value.strip().lower() == "auto":
                    kw[key] = "auto"
                else:
                    kw[key] = _positive_int(key, value, extra="or \"auto\"")
            elif key == "architecture":
                if value is not None:
                    name = str(value).strip().lower()
                    if name not in ARCHITECTURES:
                        raise BadInput(f"unsupported architecture {value!r}",
                                       f"supported: {', '.join(ARCHITECTURES)}")
                    kw[key] = name
            elif key == "prefix":
                if value is not None:
                    if not isinstance(value, str) or not value or not value.replace("_", "").replace("-", "").isalnum():
                        raise BadInput(f"prefix = {value!r} is not a usable file-name prefix",
                                       "use letters, digits, '-' or '_' (for example \"llama\")")
                    kw[key] = value
        opts = cls(**kw)
        opts.check()
        return opts

    def check(self) -> None:
        """Checks that need several options together."""
        if self.context_length % self.batch_size:
            raise BadInput(
                f"context_length {self.context_length} is not a multiple of batch_size {self.batch_size}",
                "choose a batch_size that divides context_length (for example 64 with 512)")
        if self.batch_size > self.context_length:
            raise BadInput(f"batch_size {self.batch_size} is larger than context_length {self.context_length}",
                           "lower batch_size")

    def to_mapping(self) -> dict[str, Any]:
        """User-facing names and values (LUTs as none/4/6/8), e.g. for job records."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = lut_name(v) if f.name.startswith("lut_") and f.name != "lut_group_size" else v
        return out


def _positive_int(key: str, value: Any, extra: str = "") -> int:
    if isinstance(value, bool):
        value = None
    try:
        n = int(value)
        ok = n > 0 and (not isinstance(value, float) or value.is_integer())
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BadInput(f"{key} = {value!r} is not a positive integer",
                       f"set {key} to a whole number above 0 {extra}".rstrip())
    return n
