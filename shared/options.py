"""Conversion options: one record for `anemlld convert` flags and the sidecar's
``[convert]`` table, with the same names and the same validation."""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import BadInput

LUT_CHOICES = ("none", 4, 6, 8)
ARCHITECTURES = ("gemma3", "llama", "mistral", "phi3", "qwen2", "qwen3")


LUT_PARTS = ("lut_embeddings", "lut_ffn", "lut_lm_head")
LUT_HINT = ('use none, 4, 6 or 8, or ANEMLL\'s "bits,group" ("4,8": 4 bits, one table per 8 output channels; '
            '"4,0": one table for the whole tensor)')


def parse_lut(key: str, value: Any) -> int | None:
    """``none``/4/6/8 (strings or ints) -> bits or None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "no", "off", "")):
        return None
    bits = _whole_number(value)
    if bits not in (4, 6, 8):
        raise BadInput(f"{key} = {value!r} is not a LUT size", f"{LUT_HINT} for {key}")
    return bits


def parse_lut_spec(key: str, value: Any) -> tuple[int | None, int | None]:
    """A part's LUT as ANEMLL spells it: bits (``4``, ``"none"``) or
    ``"bits,group"`` -> (bits or None, output channels per table, 0 for one
    table per tensor, None for the default)."""
    if not (isinstance(value, str) and "," in value):
        return parse_lut(key, value), None
    bits_text, _, group_text = value.partition(",")
    group = _whole_number(group_text.strip())
    bits = _whole_number(bits_text.strip())
    if bits not in (4, 6, 8) or group is None or group < 0:
        raise BadInput(f"{key} = {value!r} is not a LUT size with a group size", f"{LUT_HINT} for {key}")
    return bits, group


def lut_name(bits: int | None, group: int | None = None) -> str:
    if bits is None:
        return "none"
    return str(bits) if group is None else f"{bits},{group}"


def parse_option(key: str, value: Any) -> Any:
    """One user-facing option, checked and normalized (``"4"`` -> 4, ``"AUTO"`` -> "auto")."""
    if key in LUT_PARTS:  # bits, or "bits,group" kept as one normalized string
        bits, group = parse_lut_spec(key, value)
        return bits if group is None else lut_name(bits, group)
    if key.endswith("_lut_group"):
        return None if value is None else _whole_number(value)
    if key in ("context_length", "batch_size", "max_chunk_mb", "lut_group_size"):
        return _positive_int(key, value)
    if key == "chunks":
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return _positive_int(key, value, extra='or "auto"')
    if key == "architecture":
        return _architecture(value)
    if key == "prefix":
        return _prefix(value)
    if key in ("argmax_in_model", "monolithic"):
        return _flag(key, value)
    raise KeyError(key)


@dataclass(frozen=True)
class ConvertOptions:
    """Valid by construction: every way of making one (CLI, sidecar, code,
    ``dataclasses.replace``) goes through the same checks."""

    context_length: int = 512
    batch_size: int = 64
    chunks: int | str = "auto"  # an integer or "auto"
    max_chunk_mb: int = 950
    lut_embeddings: int | None = None
    lut_ffn: int | None = 4
    lut_lm_head: int | None = 6
    prefix: str | None = None  # default: the architecture's
    architecture: str | None = None  # default: detected from config.json
    argmax_in_model: bool = False  # the LM head (or monolithic model) also gets an ``argmax`` function (greedy decoding reads one id)
    monolithic: bool = False  # one package: embeddings, every layer and the head
    lut_group_size: int = field(default=16, metadata={"internal": True})  # output channels per table
    # A part's own group size, from "bits,group" in its lut_* option (0: per tensor; None: lut_group_size)
    embeddings_lut_group: int | None = field(default=None, metadata={"internal": True})
    ffn_lut_group: int | None = field(default=None, metadata={"internal": True})
    lm_head_lut_group: int | None = field(default=None, metadata={"internal": True})

    KEYS = ("context_length", "batch_size", "chunks", "max_chunk_mb", "lut_embeddings",
            "lut_ffn", "lut_lm_head", "prefix", "architecture", "argmax_in_model",
            "monolithic")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, parse_option(f.name, getattr(self, f.name)))
        for part in LUT_PARTS:
            bits, group = parse_lut_spec(part, getattr(self, part))
            object.__setattr__(self, part, bits)
            if group is not None:
                object.__setattr__(self, _group_field(part), group)
        self.check()

    def group_size(self, part: str) -> int:
        """Output channels per LUT of ``part`` (``lut_ffn``, ...); 0 is one per tensor."""
        group = getattr(self, _group_field(part))
        return self.lut_group_size if group is None else group

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "options") -> "ConvertOptions":
        """Build from user-facing names (sidecar table or CLI), validating each key."""
        if not isinstance(values, Mapping):
            raise BadInput(f"{where} is not a table of options", f"valid keys are: {', '.join(cls.KEYS)}")
        unknown = sorted(str(k) for k in values if k not in cls.KEYS)
        if unknown:
            raise BadInput(f"unknown key {unknown[0]!r} in {where}", _key_hint(unknown[0], cls.KEYS))
        return cls(**values)

    def check(self) -> None:
        """Checks that need several options together."""
        ctx, batch = self.context_length, self.batch_size
        if batch > ctx:
            raise BadInput(f"batch_size {batch} is larger than context_length {ctx}",
                           f"lower batch_size to a divisor of {ctx}, such as {_divisor_below(ctx, batch)}")
        if self.monolithic and self.chunks not in ("auto", 1):
            raise BadInput(f"chunks = {self.chunks} asks for FFN chunks, and a monolithic model has none",
                           "leave chunks unset (or 1) with monolithic, or leave out monolithic")
        if ctx % batch:
            raise BadInput(f"context_length {ctx} is not a multiple of batch_size {batch}",
                           f"set context_length to {ctx + batch - ctx % batch} "
                           f"or batch_size to {_divisor_below(ctx, batch)}")

    def to_mapping(self) -> dict[str, Any]:
        """User-facing names and values (LUTs as none/4/6/8), e.g. for job records."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = lut_name(v, getattr(self, _group_field(f.name))) if f.name in LUT_PARTS else v
        return out


def _group_field(part: str) -> str:
    return part.removeprefix("lut_") + "_lut_group"


def _whole_number(value: Any) -> int | None:
    """``value`` as an int if it is one (3, "3", 3.0); None for bools, 2.5, "x"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, (int, str)):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _positive_int(key: str, value: Any, extra: str = "") -> int:
    n = _whole_number(value)
    if n is None or n <= 0:
        raise BadInput(f"{key} = {value!r} is not a positive integer",
                       f"set {key} to a whole number above 0 {extra}".rstrip())
    return n


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # -o argmax_in_model=true
        return value.strip().lower() == "true"
    raise BadInput(f"{key} = {value!r} is not true or false", f"write {key} = true or {key} = false")


def _architecture(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).strip().lower()
    if name not in ARCHITECTURES:
        raise BadInput(f"unsupported architecture {value!r} (supported: {', '.join(ARCHITECTURES)})",
                       "leave architecture unset to detect it from config.json, or name one of the supported")
    return name


def _prefix(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.replace("_", "").replace("-", "").isalnum():
        raise BadInput(f"prefix = {value!r} is not a usable file-name prefix",
                       "use letters, digits, '-' or '_' (for example \"llama\")")
    return value


def _key_hint(key: str, keys: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_").lower(), keys, n=1, cutoff=0.7)
    valid = f"valid keys are: {', '.join(keys)}"
    return f"did you mean {close[0]!r}? {valid}" if close else valid


def _divisor_below(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit``."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return max(d for d in small + [n // d for d in small] if d <= limit)
