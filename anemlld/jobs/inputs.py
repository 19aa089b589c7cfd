"""What an input is: its files, its fingerprint, and what it asks for (read
from it and its sidecar before any journal row is written)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anemlld import layout
from anemlld.jobs.placement import ERROR_FILE
from shared.errors import AnemllError, BadInput
from shared.options import ConvertOptions
from shared.sidecar import INSIDE, default_name, find_sidecar, load_sidecar

FINGERPRINT_VERSION = "jobs-1"


def input_files(folder: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of the files that make up an input:
    everything but hidden files, the inside sidecar (counted by its bytes)
    and our own error.json."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel in (INSIDE, ERROR_FILE):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append((rel, st.st_size, 0 if layout.rewritten_on_load(rel) else st.st_mtime_ns))
    return sorted(out)


def input_fingerprint(folder: Path, *parts: str) -> str:
    """Cheap identity of an input (no file contents read but the sidecar's):
    its files and ``parts`` (name, options, sidecar bytes)."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for part in parts:
        h.update(b"\0" + part.encode())
    for rel, size, mtime in input_files(folder):
        h.update(f"\0{rel}:{size}:{mtime}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Input:
    """What a folder asks for."""

    name: str
    fingerprint: str
    converted: bool  # holds meta.yaml: register, do not convert
    options: dict[str, Any]
    serve: dict[str, Any]
    error: AnemllError | None = None  # a bad sidecar: the job fails at once

    @property
    def kind(self) -> str:
        return "register" if self.converted else "convert"


def describe(where: Path, origin: Path, overrides: dict[str, Any]) -> Input:
    """Read the input at ``where`` (which belongs at ``origin``); ``overrides``
    (name, options) win over its sidecar."""
    fallback = overrides.get("name") or default_name(origin)
    raw = b""
    try:
        path = find_sidecar(where)
        raw = path.read_bytes() if path else b""
        sidecar = load_sidecar(where)
    except (AnemllError, OSError) as e:
        error = e if isinstance(e, AnemllError) else BadInput(
            f"cannot read the sidecar of {origin.name}: {e}", "check that the file is readable", stage="sidecar")
        error.stage = error.stage or "sidecar"
        fp = input_fingerprint(where, "error", fallback, hashlib.sha256(raw).hexdigest())
        return Input(fallback, fp, False, {}, {}, error)
    name = overrides.get("name") or sidecar.name
    if where.name != origin.name and name == default_name(where):
        name = default_name(origin)  # read from a renamed failed-folder copy: the name is the original's
    options = sidecar.convert
    if overrides.get("options"):
        merged = {k: v for k, v in options.to_mapping().items() if k in ConvertOptions.KEYS}
        merged.update(overrides["options"])
        try:
            options = ConvertOptions.from_mapping(merged, where="options")
        except BadInput as e:
            raise AnemllError(f"{e.message} (with the sidecar's options)", e.hint, code="bad_request") from None
    keep_alive = sidecar.keep_alive_seconds
    serve = {"pin": sidecar.pin, "keep_alive": -1 if keep_alive is not None and math.isinf(keep_alive) else keep_alive}
    converted = (where / layout.META_FILE).is_file()
    mapping = {} if converted else options.to_mapping()  # a converted folder's options are in it
    fp = input_fingerprint(where, "register" if converted else "convert", name,
                           json.dumps(mapping, sort_keys=True), hashlib.sha256(raw).hexdigest())
    return Input(name, fp, converted, mapping, serve)


def converted_problem(folder: Path) -> AnemllError | None:
    """A folder that already holds converted parts must name parts that are there."""
    try:
        lay = layout.read_meta(folder)
        lay.parts()
    except AnemllError as e:
        e.stage = "register"
        return e
    return None


def manifest_options(folder: Path) -> dict[str, Any]:
    """A converted folder's options: from our manifest, else what meta.yaml says."""
    try:
        options = json.loads((folder / layout.MANIFEST_FILE).read_text())["options"]
        return {k: v for k, v in options.items() if k in ConvertOptions.KEYS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        lay = layout.read_meta(folder)
        return {"context_length": lay.context_length, "batch_size": lay.batch_size}
    except AnemllError:
        return {}
