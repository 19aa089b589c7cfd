"""The sidecar: how one dropped model folder is converted and served.

It is ``anemll.toml`` inside the model folder, or ``NAME.anemll.toml`` beside
it (for folders you would rather not touch); never both. Every key is
optional, none may be misspelled::

    name = "pico"              # served name; default: the folder's name
    [convert]                  # shared.options.ConvertOptions, same names as the CLI flags
    context_length = 512
    lut_ffn = 4
    [serve]
    pin = false                # load at start and never unload
    keep_alive = "30m"         # a duration; -1 forever; 0 unload after each request
"""
from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import BadInput
from shared.options import ConvertOptions, _key_hint
from shared.settings import parse_duration

INSIDE = "anemll.toml"
BESIDE_SUFFIX = ".anemll.toml"
TOP_KEYS = ("name", "convert", "serve")
SERVE_KEYS = ("pin", "keep_alive")
# Served names go on the wire and become folder names in the models folder.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_FORM = "1-64 letters, digits, '.', '-' or '_', starting with a letter or digit"


@dataclass(frozen=True)
class Sidecar:
    name: str
    convert: ConvertOptions = field(default_factory=ConvertOptions)
    pin: bool = False
    keep_alive_seconds: float | None = None  # None: the daemon's default; math.inf: forever
    path: Path | None = None  # the file it came from; None when there is none

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], default_name: str, where: str = "sidecar",
                     path: Path | None = None) -> "Sidecar":
        """Validate a parsed sidecar table; errors name the key and ``where``."""
        try:
            return cls._from_mapping(data, default_name, where, path)
        except BadInput as e:
            message = e.message if e.message.startswith(where) else f"{where}: {e.message}"
            raise BadInput(message, e.hint, stage="sidecar") from None

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any], default_name: str, where: str,
                      path: Path | None) -> "Sidecar":
        for key in data:
            if key not in TOP_KEYS:
                what = f"table [{key}]" if isinstance(data[key], dict) else f"key {key!r}"
                raise BadInput(f"unknown {what}", _key_hint(key, TOP_KEYS))
        name = data.get("name", default_name)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise BadInput(f"name = {name!r} is not a usable model name", f"use {NAME_FORM}")
        for table in ("convert", "serve"):
            if not isinstance(data.get(table, {}), dict):
                raise BadInput(f"{table} must be a table", f"write it as [{table}] with its keys below it")
        try:
            convert = ConvertOptions.from_mapping(data.get("convert", {}), where="[convert]")
        except BadInput as e:
            message = e.message if "[convert]" in e.message else f"[convert] {e.message}"
            raise BadInput(message, e.hint) from None
        serve = data.get("serve", {})
        for key in serve:
            if key not in SERVE_KEYS:
                raise BadInput(f"unknown key {key!r} in [serve]", _key_hint(key, SERVE_KEYS))
        pin = serve.get("pin", False)
        if not isinstance(pin, bool):
            raise BadInput(f"[serve] pin = {pin!r} is not true or false", "write pin = true or pin = false")
        keep_alive = None
        if "keep_alive" in serve:
            keep_alive = parse_duration(serve["keep_alive"], "[serve] keep_alive")
        return cls(name=name, convert=convert, pin=pin, keep_alive_seconds=keep_alive, path=path)


def default_name(model_dir: Path) -> str:
    """The folder's name, made servable: other characters become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_dir).name).strip("-._")[:64]
    return name or "model"


def find_sidecar(model_dir: str | Path) -> Path | None:
    """The sidecar of ``model_dir``: inside it or beside it, None if neither."""
    model_dir = Path(model_dir)
    inside = model_dir / INSIDE
    beside = model_dir.parent / f"{model_dir.name}{BESIDE_SUFFIX}"
    found = [p for p in (inside, beside) if p.is_file()]
    if len(found) == 2:
        raise BadInput(f"{model_dir.name} has two sidecars: {inside} and {beside}",
                       f"keep one: delete {beside} if the settings inside the folder are the ones you want, "
                       f"otherwise delete {inside}", stage="sidecar")
    return found[0] if found else None


def load_sidecar(model_dir: str | Path) -> Sidecar:
    """The validated sidecar of ``model_dir``, or the defaults when it has none."""
    model_dir = Path(model_dir)
    path = find_sidecar(model_dir)
    if path is None:
        return Sidecar(name=default_name(model_dir))
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid TOML: {e}", "fix the line named above", stage="sidecar") from e
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}", "check that the file is readable",
                       stage="sidecar") from e
    return Sidecar.from_mapping(data, default_name(model_dir), where=str(path), path=path)

