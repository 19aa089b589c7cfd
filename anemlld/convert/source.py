"""A Hugging Face model folder as the converter reads it: config.json, the
safetensors shards (memory-mapped, one tensor at a time), tokenizer files.
Every way such a folder can be broken ends here in a :class:`BadInput`."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import BadInput
from shared.options import ARCHITECTURES

log = logging.getLogger(__name__)

# Copied next to the converted parts so the runtime has tokenizer and chat template.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json", "config.json",
    "vocab.json", "merges.txt", "added_tokens.json",
)

INDEX_FILE = "model.safetensors.index.json"
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)")


def detect_architecture(cfg: dict[str, Any]) -> str:
    from anemlld.convert.models import MODEL_TYPES

    model_type = str(cfg.get("model_type", "")).lower()
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    # Only without a model_type: a class name is matched by its prefix, and
    # Gemma3n or Qwen3-MoE classes start like Gemma3 or Qwen3 ones.
    for name in [] if model_type else cfg.get("architectures") or []:
        for key, arch in MODEL_TYPES.items():
            if str(name).lower().startswith(key):
                return arch
    found = model_type or ", ".join(map(str, cfg.get("architectures") or [])) or "unknown"
    raise BadInput(f"unsupported architecture {found!r} (supported: {', '.join(ARCHITECTURES)})",
                   "convert a model of a supported architecture; if this one is a renamed variant of one, "
                   "pass --architecture (architecture = ... in anemll.toml)", stage="inspect")


@dataclass
class HFSource:
    path: Path
    config: dict[str, Any]
    shards: dict[str, Path]  # tensor name -> shard file
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape, from the headers
    # a multimodal checkpoint's text model: our tensor name -> the checkpoint's
    names: dict[str, str] = field(default_factory=dict)
    skipped: int = 0  # the tensors that are not the text model's (a vision tower)
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "HFSource":
        path = Path(path).expanduser().resolve()
        if not path.exists():
            raise BadInput(f"{path} does not exist", "pass the path of the Hugging Face model folder",
                           stage="inspect")
        if not path.is_dir():
            raise BadInput(f"{path} is not a folder", "pass the Hugging Face model folder", stage="inspect")
        config = read_config(path)
        shards, shapes = index_tensors(path)
        config, names, skipped = text_model(config, shards, shapes)
        check_layers(config, shards)
        return cls(path, config, shards, shapes, names, skipped)

    @property
    def weight_files(self) -> list[Path]:
        return sorted(set(self.shards.values()))

    def get(self, name: str):
        """One tensor, read from its memory-mapped shard."""
        return self._read(name, lambda handle, theirs: handle.get_tensor(theirs))

    def rows(self, name: str, ids: list[int]):
        """Rows ``ids`` of a 2-D tensor, read one by one (an embedding table
        need not be read whole for a few tokens)."""
        import torch

        def read(handle, theirs):
            piece = handle.get_slice(theirs)
            return torch.cat([piece[i:i + 1] for i in ids])
        return self._read(name, read)

    def _read(self, name: str, read):
        from safetensors import safe_open

        shard = self.shards.get(name)
        if shard is None:
            raise BadInput(f"weight {name} is missing from the checkpoint",
                           "the weights do not match config.json; re-download the model", stage="load")
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = self._handles[shard] = safe_open(str(shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise _corrupt(shard, e) from None
        try:
            return read(handle, self.names.get(name, name))
        except Exception as e:
            raise _corrupt(shard, e) from None

    def close(self) -> None:
        self._handles.clear()

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def fingerprint_parts(self) -> list[str]:
        """What identifies this input: names, sizes and mtimes of the files read."""
        files = [self.path / "config.json", *self.weight_files, *self.tokenizer_files()]
        out = []
        for f in sorted(set(files)):
            st = f.stat()
            out.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        return out

    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise BadInput(f"{path} has no config.json", "copy the whole Hugging Face model folder, config.json included",
                       stage="inspect")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"config.json in {path} cannot be read: {e}",
                       "replace it with the model's original config.json", stage="inspect") from None
    if not isinstance(cfg, dict):
        raise BadInput(f"config.json in {path} is not a JSON object",
                       "replace it with the model's original config.json", stage="inspect")
    return cfg


def text_model(config: dict[str, Any], shards: dict[str, Path], shapes: dict[str, tuple[int, ...]]
               ) -> tuple[dict[str, Any], dict[str, str], int]:
    """A multimodal checkpoint of a kind we convert the text model of: its
    ``text_config``, its text model's tensors renamed in ``shards`` and
    ``shapes`` to that model's own names (our name -> theirs returned), and
    how many other tensors are skipped. Other configs come back as they are,
    the keys they leave out filled with their config class's defaults."""
    from anemlld.convert.models import CONFIG_DEFAULTS, TEXT_PARTS

    prefixes = TEXT_PARTS.get(str(config.get("model_type", "")).lower())
    names: dict[str, str] = {}
    skipped = 0
    if prefixes is not None:
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise BadInput(f"config.json of this {config['model_type']} model has no text_config",
                           "restore the model's original config.json", stage="inspect")
        config = {"tie_word_embeddings": config.get("tie_word_embeddings", True), **text}
        for theirs in list(shards):
            prefix = next((p for p in prefixes if theirs.startswith(p)), None)
            if prefix is None:
                skipped += 1
                del shards[theirs], shapes[theirs]
                continue
            ours = prefixes[prefix] + theirs[len(prefix):]
            shards[ours], shapes[ours] = shards.pop(theirs), shapes.pop(theirs)
            names[ours] = theirs
        log.info("converting the text model of a multimodal checkpoint; %d other tensors (the vision tower) "
                 "skipped", skipped)
    defaults = CONFIG_DEFAULTS.get(str(config.get("model_type", "")).lower(), {})
    return {**defaults, **config}, names, skipped


def index_tensors(path: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """Tensor name -> shard and -> shape, checking that every shard exists and its header parses."""
    index = path / INDEX_FILE
    if index.is_file():
        files = read_index(index)
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise BadInput(f"weight shard {missing[0]} is listed in {INDEX_FILE} but not in the folder"
                           + (f" ({len(missing)} shards missing)" if len(missing) > 1 else ""),
                           "the copy is incomplete: copy the missing shards, then convert again", stage="inspect")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            bins = list(path.glob("*.bin")) + list(path.glob("*.pt"))
            hint = ("only PyTorch .bin weights found; save the model with safetensors (save_pretrained(..., "
                    "safe_serialization=True))" if bins else "copy the model's .safetensors files into the folder")
            raise BadInput(f"{path} has no safetensors weights", hint, stage="inspect")
    shards: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        shard = path / name
        for tensor, shape in safetensors_header(shard).items():
            shards[tensor] = shard
            shapes[tensor] = shape
    return shards, shapes


def read_index(index: Path) -> list[str]:
    """The shard file names an index lists (plain names inside the folder)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f or not f]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a shard file name")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInput(f"{INDEX_FILE} cannot be read: {e}", "re-download the model's index and shards",
                       stage="inspect") from None
    return files


def check_layers(config: dict[str, Any], shards: dict[str, Path]) -> None:
    """Every decoder layer config.json announces, and no other, is in the
    weights, each with the same tensors, so a stale config or a partial
    checkpoint fails here rather than midway through a conversion."""
    layers: dict[int, set[str]] = {}
    for name in shards:
        m = _LAYER_TENSOR.fullmatch(name)
        if m:
            layers.setdefault(int(m[1]), set()).add(m[2])
    n = config.get("num_hidden_layers")
    if not layers or not isinstance(n, int) or isinstance(n, bool):
        return  # not a layout we know, or a config error reported with the model's arguments
    hint = "config.json and the weights disagree: re-download the model, or restore its original config.json"
    if sorted(layers) != list(range(n)):
        found = f"layers {min(layers)}-{max(layers)}" if len(layers) > 1 else f"layer {min(layers)}"
        absent = [i for i in range(n) if i not in layers]
        detail = f"; layer {absent[0]} is missing" if absent and max(layers) >= absent[0] else ""
        raise BadInput(f"config.json has num_hidden_layers = {n} but the weights hold {len(layers)} decoder "
                       f"layers ({found}{detail})", hint, stage="inspect")
    every = set().union(*layers.values())
    for i in range(n):
        missing = sorted(every - layers[i])
        if missing:
            raise BadInput(f"weight model.layers.{i}.{missing[0]} is missing from the checkpoint"
                           + (f" (and {len(missing) - 1} more in layer {i})" if len(missing) > 1 else ""),
                           hint, stage="inspect")


def safetensors_header(shard: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a shard's header, checking the header and the data size
    agree (a truncated or corrupt file fails here, before any work)."""
    try:
        with shard.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            size = shard.stat().st_size
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            if 8 + n > size:
                raise ValueError(f"file is {size} bytes but its header claims {8 + n}")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"file is {size} bytes but its header needs {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _corrupt(shard, e) from None
    try:
        return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(shard, e) from None


def _corrupt(shard: Path, err: Exception) -> BadInput:
    return BadInput(f"{shard.name} is not a readable safetensors file ({err})",
                    "the file is corrupt or truncated: copy it again from the original", stage="inspect")


def fingerprint(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
