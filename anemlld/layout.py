"""The converted-model folder: part file names and ``meta.yaml``, as the
Apple-side runtimes of the ANEMLL ecosystem expect them. The converter writes
this layout; the runtime reads it (ours or one ANEMLL made)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.errors import BadInput

META_FILE = "meta.yaml"
MANIFEST_FILE = "anemlld.json"  # marks a folder as ours; holds fingerprint and options
# ANEMLL's runner takes this window for a gemma3-prefixed folder whose meta.yaml names none
ANEMLL_GEMMA3_WINDOW = 512


def folder_size(path: str | Path | None) -> int:
    """Bytes of the files under ``path`` (0 if there is none)."""
    total = 0
    if path is None:
        return 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def rewritten_on_load(relative_path: str) -> bool:
    """Files that loading a model rewrites (coremltools rewrites each package's
    Manifest.json, same bytes, new mtime): their mtime says nothing about the
    model, so change detection looks at their size only."""
    parts = relative_path.replace("\\", "/").split("/")
    return len(parts) >= 2 and parts[-1] == "Manifest.json" and parts[-2].endswith(".mlpackage")


def _lut_suffix(bits: int | None) -> str:
    return f"_lut{bits}" if bits else ""


def embeddings_name(prefix: str, bits: int | None) -> str:
    return f"{prefix}_embeddings{_lut_suffix(bits)}"


def lm_head_name(prefix: str, bits: int | None) -> str:
    return f"{prefix}_lm_head{_lut_suffix(bits)}"


def ffn_base(prefix: str, bits: int | None) -> str:
    return f"{prefix}_FFN_PF{_lut_suffix(bits)}"


def monolithic_name(prefix: str, bits: int | None) -> str:
    return f"{prefix}_monolithic_full{_lut_suffix(bits)}"


def chunk_name(prefix: str, bits: int | None, index: int, count: int) -> str:
    """``index`` counts from 0; file names count from 01."""
    return f"{ffn_base(prefix, bits)}_chunk_{index + 1:02d}of{count:02d}"


@dataclass
class Layout:
    """A converted model folder, resolved to the files that exist."""

    root: Path
    params: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        return int(self.params["context_length"])

    @property
    def batch_size(self) -> int:
        return int(self.params.get("batch_size", 64))

    @property
    def num_chunks(self) -> int:
        return 1 if self.monolithic else int(self.params["num_chunks"])

    @property
    def monolithic(self) -> bool:
        """One package with embeddings, every layer and the head (ANEMLL 0.3.5's ``model_type: monolithic``)."""
        return self.params.get("model_type") == "monolithic"

    @property
    def split_lm_head(self) -> int:
        """Outputs of the LM head (``logits1..K``); older folders name it ``num_logits``."""
        return int(self.params.get("split_lm_head", self.params.get("num_logits", 8)))

    @property
    def argmax_only(self) -> bool:
        """The LM head returns each split's argmax instead of logits (ANEMLL's
        ``--argmax``): greedy decoding only."""
        return _true(self.params.get("argmax_in_model"))

    @property
    def update_mask_prefill(self) -> bool:
        """Prefill functions take ``update_mask`` (ANEMLL's before its dynamic-slice prefill)."""
        return _true(self.params.get("update_mask_prefill"))

    @property
    def prefill_dynamic_slice(self) -> bool:
        """Prefill functions write the cache at ``current_pos`` (ours, ANEMLL 0.3.5's)."""
        return _true(self.params.get("prefill_dynamic_slice"))

    @property
    def head_argmax_function(self) -> bool:
        """The LM head has an ``argmax`` function beside its default ``logits``
        (ours, with ``--argmax-in-model``)."""
        return "argmax" in str(self.params.get("lm_head_functions", "")).split(",")

    @property
    def monolithic_argmax_function(self) -> bool:
        """The monolithic model has an ``argmax`` function (an infer step
        returning each split's winner) beside ``infer`` and ``prefill`` (ours,
        with ``--argmax-in-model``)."""
        return self.monolithic and "argmax" in str(self.params.get("monolithic_functions", "")).split(",")

    @property
    def lm_head_chunk_sizes(self) -> list[int]:
        """Vocabulary entries per LM-head split, in order: maps a split's own
        argmax to a token id."""
        sizes = self.params.get("lm_head_chunk_sizes")
        if isinstance(sizes, str):
            sizes = [s for s in sizes.strip("[] ").split(",") if s.strip()]
        parts = self.split_lm_head
        if sizes is not None:
            sizes = [int(s) for s in sizes]  # ValueError for what is not a list of whole numbers
        if sizes is not None and (len(sizes) == parts or "vocab_size" not in self.params):
            return sizes
        # none, or not one per split: from the vocabulary, as ANEMLL's runner does then
        vocab = int(self.params["vocab_size"])
        return [vocab // parts + (1 if i < vocab % parts else 0) for i in range(parts)]

    @property
    def sliding_window(self) -> int | None:
        """The window of the sliding-window layers, None if every layer is full."""
        value = self.params.get("sliding_window")
        return int(value) if value else None

    @property
    def ring_size(self) -> int | None:
        """Slots of the sliding-window layers' ring cache; None without one
        (no such layers, or a folder from before rings: the window is then
        in every layer's causal mask)."""
        value = self.params.get("ring_size")
        return int(value) if value else None

    @property
    def rotation_window(self) -> int | None:
        """ANEMLL's Gemma 3 layout: the window of the local caches that its
        ``infer_rotate`` / ``prefill_rotate`` functions shift once the
        position reaches it (runtime/rotation.py); None for every other folder
        (ours keep rings; a window as long as the context never binds)."""
        window, ours = self.sliding_window, (self.root / MANIFEST_FILE).is_file()
        return window if window and not self.ring_size and window < self.context_length and not ours else None

    @property
    def split_rotate(self) -> bool:
        """Each chunk in two files (ANEMLL's ``--split-rotate``): ``ffn`` holds
        ``infer`` and ``infer_rotate``, ``pf`` the prefill functions."""
        return _true(self.params.get("split_rotate"))

    @property
    def full_attention(self) -> bool:
        """Whether any layer attends to the whole context (takes causal_mask)."""
        return self.ring_size is None or bool(self.params.get("global_layers"))

    @property
    def architecture(self) -> str:
        return str(self.info.get("architecture", "llama"))

    def _resolve(self, name: str) -> Path:
        """A part named in meta.yaml, with either extension (compiled or not)."""
        stem = name
        for ext in (".mlmodelc", ".mlpackage"):
            if stem.endswith(ext):
                stem = stem[: -len(ext)]
        for ext in (".mlmodelc", ".mlpackage"):
            p = self.root / (stem + ext)
            if p.exists():
                return p
        raise BadInput(f"{self.root.name}/meta.yaml names {name}, which is not in the folder",
                       "the converted model is incomplete: convert it again", stage="load")

    def part(self, kind: str, prefer: str = ".mlmodelc") -> Path:
        """``embeddings``, ``lm_head`` or ``monolithic_model``: the file, preferring ``prefer``."""
        p = self._resolve(str(self.params[kind]))
        return _prefer(p, prefer)

    def parts(self, prefer: str = ".mlmodelc") -> list[Path]:
        """Every part file, in the order a token runs through them."""
        if self.monolithic:
            return [self.part("monolithic_model", prefer)]
        if self.split_rotate:
            self.prefill_chunks(prefer)  # not on a token's way, but they must be there too
        return [self.part("embeddings", prefer), *self.chunks(prefer), self.part("lm_head", prefer)]

    def chunks(self, prefer: str = ".mlmodelc", key: str = "ffn") -> list[Path]:
        """The FFN chunk files meta.yaml's ``ffn`` names (``pf``: the prefill
        files of a split-rotate folder)."""
        ffn = str(self.params[key])
        for ext in (".mlmodelc", ".mlpackage"):
            if ffn.endswith(ext):
                ffn = ffn[: -len(ext)]
        # ANEMLL 0.3.4 names the base (llama_FFN_PF_lut4), 0.3.5 the first chunk
        # (llama_FFN_PF_lut4_chunk_01of02, or gemma3_FFN_chunk_01of02_combined
        # with --split-rotate): the chunk number goes where the suffix is, or at the end.
        n = self.num_chunks
        if re.search(r"_chunk_\d+of\d+", ffn):
            names = [re.sub(r"_chunk_\d+of\d+", f"_chunk_{i + 1:02d}of{n:02d}", ffn) for i in range(n)]
        else:
            names = [f"{ffn}_chunk_{i + 1:02d}of{n:02d}" for i in range(n)]
        return [_prefer(self._resolve(name), prefer) for name in names]

    def prefill_chunks(self, prefer: str = ".mlmodelc") -> list[Path]:
        """The files holding each chunk's prefill function: the chunks, or a
        split-rotate folder's ``pf`` files."""
        return self.chunks(prefer, "pf") if self.split_rotate else self.chunks(prefer)


def _check_rotation_layout(path: Path, params: dict[str, Any]) -> None:
    """ANEMLL's Gemma 3 with a window shorter than the context: the variants
    served (four functions per chunk in one file or, split-rotate, in two;
    prefill by dynamic slice or update_mask, or none) and those refused by name."""
    convert = "or let anemlld convert the original Hugging Face model (its ring caches need no rotate functions)"
    if _true(params.get("single_cache")):
        raise BadInput(f"{path} sets single_cache: ANEMLL's Gemma 3 with one KV cache and no rotation, whose "
                       "local layers see no window once the position passes it; anemlld does not serve it",
                       f"convert it with ANEMLL without --single-cache (two caches, rotate functions), {convert}",
                       stage="load")
    if params["model_type"] == "monolithic":
        raise BadInput(f"{path} is a monolithic Gemma 3 with a sliding window shorter than its context "
                       f"({params['sliding_window']} < {params['context_length']}), which anemlld does not serve",
                       f"convert it with ANEMLL in chunks (--chunk 1 or more), {convert}", stage="load")
    if _true(params.get("split_rotate")) and "pf" not in params:
        raise BadInput(f"{path} sets split_rotate but names no pf (the files of the prefill functions)",
                       "add pf: (the first PF chunk's file name) to meta.yaml, or convert the model again",
                       stage="load")
    size = params.get("attention_size")
    if size is not None and str(size).strip() != str(params["context_length"]):
        raise BadInput(f"{path}: attention_size {size} differs from context_length {params['context_length']}; "
                       "anemlld serves ANEMLL's Gemma 3 folders whose causal mask spans the context only",
                       f"convert it with ANEMLL without a separate attention size, {convert}", stage="load")


TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
FLAGS = ("argmax_in_model", "update_mask_prefill", "prefill_dynamic_slice", "split_rotate", "single_cache")


def _true(value: Any) -> bool:
    return value is True or str(value).strip().lower() in TRUE


def _prefer(p: Path, ext: str) -> Path:
    alt = p.with_suffix(ext)
    return alt if alt.exists() else p


def write_meta(root: Path, name: str, version: str, architecture: str, params: dict[str, Any],
               model_type: str = "chunked") -> None:
    """ANEMLL 0.3.5's runner and Swift CLI read ``model_type`` from
    ``model_info`` (not its ``parameters``), where ANEMLL writes it for
    monolithic models only; ours is in the parameters too."""
    info = {"name": name, "version": version, "architecture": architecture}
    if model_type != "chunked":
        info["model_type"] = model_type
    doc = {"model_info": {**info, "parameters": {**params, "model_type": model_type}}}
    (root / META_FILE).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def read_meta(root: str | Path) -> Layout:
    root = Path(root)
    path = root / META_FILE
    if not path.is_file():
        raise BadInput(f"{root} has no {META_FILE}", "convert the model first (anemlld convert SRC --out DIR)",
                       stage="load")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        info = dict(doc["model_info"])
        params = dict(info.pop("parameters"))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise BadInput(f"{path} cannot be read: {e}", "convert the model again", stage="load") from None
    # ANEMLL 0.3.5 writes model_type beside the parameters (model_info.model_type),
    # and only for monolithic models; ours carry it in both places.
    kinds = {str(v) for v in (info.get("model_type"), params.get("model_type")) if v is not None}
    if len(kinds) > 1:
        raise BadInput(f"{path} says model_type {info['model_type']!r} in model_info and "
                       f"{params['model_type']!r} in its parameters", "fix meta.yaml or convert the model again",
                       stage="load")
    kind = kinds.pop() if kinds else "chunked"
    if kind not in ("chunked", "monolithic"):
        raise BadInput(f"{path}: model_type {kind!r} is not a layout anemlld knows (chunked, monolithic)",
                       "convert the model again with anemlld", stage="load")
    params["model_type"] = kind
    if ("sliding_window" not in params and str(params.get("model_prefix", "")).lower().startswith("gemma3")
            and not (root / MANIFEST_FILE).is_file()):
        params["sliding_window"] = ANEMLL_GEMMA3_WINDOW
    needed = ("context_length", "monolithic_model") if kind == "monolithic" else (
        "context_length", "num_chunks", "embeddings", "lm_head", "ffn")
    missing = [k for k in needed if k not in params]
    if missing:
        raise BadInput(f"{path} lacks model_info.parameters.{missing[0]}", "convert the model again", stage="load")
    for key in FLAGS:
        value = params.get(key)
        if value is not None and not isinstance(value, bool) and str(value).strip().lower() not in TRUE + FALSE:
            raise BadInput(f"{path}: model_info.parameters.{key} = {value!r} is neither true nor false",
                           "fix meta.yaml or convert the model again", stage="load")
    for key in ("context_length", "num_chunks", "batch_size", "split_lm_head", "num_logits", "sliding_window",
                "ring_size"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not str(value).strip().isdigit()):
            raise BadInput(f"{path}: model_info.parameters.{key} = {value!r} is not a whole number",
                           "fix meta.yaml or convert the model again", stage="load")
        if value is not None and key not in ("sliding_window", "ring_size") and int(value) < 1:
            raise BadInput(f"{path}: model_info.parameters.{key} = {value!r} must be at least 1",
                           "fix meta.yaml or convert the model again", stage="load")
    window, ring = int(params.get("sliding_window") or 0), int(params.get("ring_size") or 0)
    if ring and not window:
        raise BadInput(f"{path} gives a ring_size but no sliding_window", "convert the model again", stage="load")
    batch, context = int(params.get("batch_size", 64)), int(params["context_length"])
    if ring and ring < context and (ring % batch or ring < window + batch - 1):
        raise BadInput(f"{path}: ring_size {ring} cannot hold a window of {window} and a batch of {batch} in whole "
                       "batches", "convert the model again", stage="load")
    if window and not ring and window < context and not (root / MANIFEST_FILE).is_file():
        _check_rotation_layout(path, params)
    sizes = params.get("lm_head_chunk_sizes")
    try:
        lay = Layout(root, params, info)
        argmax = lay.argmax_only or lay.head_argmax_function  # the splits' winners are mapped with the sizes
        if sizes is not None or argmax:
            found = lay.lm_head_chunk_sizes
            if argmax and len(found) != lay.split_lm_head:
                raise ValueError
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{path}: an argmax LM head needs lm_head_chunk_sizes (a whole number per split) or "
                       f"vocab_size to map its answers to tokens; it has lm_head_chunk_sizes = {sizes!r}",
                       "fix meta.yaml or convert the model again", stage="load") from None
    return lay
