"""One conversion, stage by stage: inspect -> load -> quantize -> export ->
compile -> publish.

Everything is built in a work folder beside the output (``.NAME.partial``)
and renamed into place only when complete, so an interrupted conversion never
leaves a folder that looks finished. Each finished part is kept in the work
folder under a name that includes the input's fingerprint, so running the
same conversion again resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from anemlld import __version__, layout
from anemlld.convert import calibrate, estimate, export, program, spill
from anemlld.convert.models import ARCHITECTURES, DEFAULT_LM_HEAD_SPLIT, build
from anemlld.convert.models.base import (AneLM, ModelArgs, refuse_unimplemented, ring_size, split_sizes,
                                         weights_loaded_later)
from anemlld.convert.source import HFSource, detect_architecture, fingerprint
from shared.errors import AnemllError, BadInput
from shared.options import ConvertOptions

log = logging.getLogger(__name__)

MB = 1024 * 1024
ProgressFn = Callable[["Progress"], None]


@dataclass(frozen=True)
class Progress:
    stage: str       # inspect, calibrate, load, quantize, export, compile, publish, done
    part: str        # the part being worked on ("" for whole-job stages)
    fraction: float  # of the whole conversion, 0..1
    message: str = ""
    eta_seconds: float | None = None  # time left, from the rate measured so far (None once done)


@dataclass
class Plan:
    """What a conversion will produce, decided before any heavy work."""

    source: HFSource
    options: ConvertOptions
    architecture: str
    args: ModelArgs
    prefix: str
    chunk_ranges: list[range]
    lm_head_split: int
    fingerprint: str
    estimated_bytes: int
    parts: list[str] = field(default_factory=list)
    fp16_range: calibrate.Range | None = None  # measured at conversion, for architectures that can rescale

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_ranges)

    @property
    def ring(self) -> int | None:
        """Slots of the sliding-window layers' ring cache, None without such layers."""
        window = self.args.sliding_window
        return None if window is None else ring_size(window, self.options.batch_size, self.options.context_length)


@dataclass
class Result:
    out_dir: Path
    reused: bool
    compiled: bool
    compile_note: str
    seconds: float
    stage_seconds: dict[str, float]


def split_layers(layers: int, chunks: int) -> list[range]:
    """Every layer in exactly one chunk; sizes differ by at most one."""
    base, extra = divmod(layers, chunks)
    out, start = [], 0
    for i in range(chunks):
        n = base + (1 if i < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def chunk_bytes(args: ModelArgs, layers: int, bits: int | None) -> int:
    return int(layers * args.layer_params * estimate.bytes_per_weight(bits))


def choose_chunks(args: ModelArgs, options: ConvertOptions) -> int:
    layers = args.num_hidden_layers
    if options.chunks != "auto":
        n = int(options.chunks)
        if n > layers:
            raise BadInput(f"chunks = {n} is more than the model's {layers} layers",
                           f"use chunks between 1 and {layers}, or \"auto\"", stage="inspect")
        return n
    limit = options.max_chunk_mb * MB
    for n in range(1, layers + 1):
        largest = max(len(r) for r in split_layers(layers, n))
        if chunk_bytes(args, largest, options.lut_ffn) <= limit:
            return n
    one = chunk_bytes(args, 1, options.lut_ffn) / MB
    raise BadInput(f"one decoder layer alone is {one:.0f} MB, above max_chunk_mb = {options.max_chunk_mb}",
                   "raise max_chunk_mb or use a smaller lut_ffn", stage="inspect")


def check_checkpoint(arch: str, args: ModelArgs, source: HFSource) -> None:
    """Every tensor the model reads is in the checkpoint with the shape
    config.json implies; checked from the headers, before any work."""
    import torch

    with torch.device("meta"):  # shapes only, no memory
        model = build(arch, args, context_length=1)
    hint = "the weights do not match config.json: re-download the model, or restore its original config.json"
    for name, shape in model.checkpoint_shapes().items():
        have = source.shapes.get(name)
        if have is None:
            raise BadInput(f"weight {name} is missing from the checkpoint", hint, stage="inspect")
        if tuple(have) != shape:
            raise BadInput(f"weight {name} has shape {tuple(have)}, config.json implies {shape}", hint,
                           stage="inspect")


def plan(src_dir: str | Path, options: ConvertOptions) -> Plan:
    options.check()
    source = HFSource.open(src_dir)
    arch = options.architecture or detect_architecture(source.config)
    module = ARCHITECTURES[arch]
    refuse_unimplemented(source.config, arch, options.context_length,
                         windows=getattr(module, "SLIDING_WINDOW", False))
    args = module.model_args(source.config).within(options.context_length)
    check_checkpoint(arch, args, source)
    n = 1 if options.monolithic else choose_chunks(args, options)
    prefix = options.prefix or module.PREFIX
    split = DEFAULT_LM_HEAD_SPLIT[arch]
    h, v = args.hidden_size, args.vocab_size
    size = int(h * v * estimate.bytes_per_weight(options.lut_embeddings)
               + chunk_bytes(args, args.num_hidden_layers, options.lut_ffn)
               + h * v * estimate.bytes_per_weight(options.lut_lm_head))
    fp = fingerprint([__version__, arch, str(n), json.dumps(options.to_mapping(), sort_keys=True),
                      *source.fingerprint_parts()])
    p = Plan(source, options, arch, args, prefix, split_layers(args.num_hidden_layers, n), split, fp, size)
    o = options
    if o.monolithic:
        if size > o.max_chunk_mb * MB:
            raise BadInput(f"a monolithic model of {source.path.name} would be about {size / MB:.0f} MB, above "
                           f"max_chunk_mb = {o.max_chunk_mb} (Core ML files past about 1 GB fail to load on iOS, "
                           "2 GB on macOS)", "convert it chunked (leave out monolithic), use smaller LUTs, or "
                           "raise max_chunk_mb", stage="inspect")
        p.parts = [layout.monolithic_name(prefix, o.lut_ffn)]
        estimate.check_memory(p)
        return p
    p.parts = ([layout.embeddings_name(prefix, o.lut_embeddings)]
               + [layout.chunk_name(prefix, o.lut_ffn, i, n) for i in range(n)]
               + [layout.lm_head_name(prefix, o.lut_lm_head)])
    estimate.check_part_sizes(p)
    estimate.check_memory(p)
    return p


def _read_manifest(folder: Path) -> dict | None:
    """Our manifest, or None when the folder has none (or one we did not write)."""
    try:
        doc = json.loads((folder / layout.MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("fingerprint"), str) else None


def check_output(out: Path) -> dict | None:
    """The manifest of an existing output of ours, None if there is none;
    refuses a folder that holds something else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise BadInput(f"{out} exists and is not a folder", "choose another --out", stage="inspect")
    manifest = _read_manifest(out)
    if manifest is not None and not str(manifest.get("converter", "")).startswith("anemlld"):
        manifest = None
    if manifest is None and any(out.iterdir()):
        raise BadInput(f"{out} exists and was not made by anemlld",
                       "choose another --out, or empty that folder if you mean to replace it", stage="inspect")
    return manifest


def check_disk(p: Plan, out: Path) -> None:
    need = estimate.disk_bytes(p)
    where = out.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise BadInput(f"not enough free disk in {where}: about {need / MB:.0f} MB needed, "
                       f"{free / MB:.0f} MB free", "free some space or choose an --out on another disk",
                       stage="inspect")


class _Stages:
    """Progress bookkeeping: each unit of work has a weight (its weights
    count, times the relative cost of what is done to them)."""

    def __init__(self, progress: ProgressFn | None, total: float, prior_seconds: float):
        self.progress, self.total, self.done = progress, max(total, 1.0), 0.0
        self.seconds: dict[str, float] = {}
        self.time_left = estimate.TimeLeft(self.total, prior_seconds)

    def report(self, stage: str, part: str, message: str = "") -> None:
        if self.progress:
            self.progress(Progress(stage, part, min(self.done / self.total, 1.0), message,
                                   round(self.time_left.left(self.done), 1)))

    def run(self, stage: str, part: str, weight: float, fn: Callable, *a):
        self.report(stage, part)
        t = time.perf_counter()
        try:
            return fn(*a)
        except AnemllError as e:
            e.stage = e.stage or stage
            raise
        finally:
            took = time.perf_counter() - t
            self.seconds[stage] = self.seconds.get(stage, 0.0) + took
            self.done += weight
            self.time_left.add(weight, took)


def convert(src_dir: str | Path, out_dir: str | Path, options: ConvertOptions | None = None,
            progress: ProgressFn | None = None) -> Result:
    """Convert the Hugging Face folder ``src_dir`` into ``out_dir``."""
    t0 = time.perf_counter()
    options = options or ConvertOptions()
    out = Path(out_dir).expanduser().resolve()
    p = plan(src_dir, options)
    existing = check_output(out)
    if existing and existing.get("fingerprint") == p.fingerprint:
        if progress:
            progress(Progress("done", "", 1.0, "already converted with these inputs and options"))
        return Result(out, True, bool(existing.get("compiled")), existing.get("compile_note", ""),
                      0.0, {})
    check_disk(p, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial"
    _prepare_work(work, p)

    o, args = p.options, p.args
    emb_w = args.vocab_size * args.hidden_size
    layer_w = args.layer_params
    quant = lambda bits: estimate.QUANTIZE_WEIGHT if bits else 0.0  # noqa: E731 (k-means cost per weight, export = 1)
    total = (emb_w * (1 + quant(o.lut_embeddings)) + emb_w * (1 + quant(o.lut_lm_head))
             + sum(len(r) * layer_w * (1 + quant(o.lut_ffn)) for r in p.chunk_ranges))
    st = _Stages(progress, total, estimate.estimate(p).seconds)
    skipped = f"; the text model only, {p.source.skipped} other tensors skipped" if p.source.skipped else ""
    st.report("inspect", "", f"{p.architecture}, {args.num_hidden_layers} layers, {p.num_chunks} chunks{skipped}")
    if getattr(ARCHITECTURES[p.architecture], "RESIDUAL_SCALE", False):
        _calibrate(p, st)

    shapes = export.Shapes(args.hidden_size, o.context_length, o.batch_size)
    try:
        if o.monolithic:
            _build_monolithic(p, shapes, work, st, quant)
        else:
            _build_end(p, shapes, work, st, emb_w, quant(o.lut_embeddings), head=False)
            for i, layers in enumerate(p.chunk_ranges):
                _build_chunk(p, shapes, work, st, i, layers, len(layers) * layer_w, quant(o.lut_ffn))
            _build_end(p, shapes, work, st, emb_w, quant(o.lut_lm_head), head=True)
    finally:
        p.source.close()

    note = export.compiler()
    compiled = note is None
    if compiled:
        for name in p.parts:
            pkg = work / f"{name}.mlpackage"
            if not (work / f"{name}.mlmodelc").exists():
                st.run("compile", name, 0.0, export.compile_package, pkg, work)
        note = "compiled with xcrun coremlcompiler"
    st.report("compile", "", note if not compiled else "")

    _finish(p, work, compiled, note, st.seconds)
    st.report("publish", "")
    _publish(work, out)
    seconds = time.perf_counter() - t0
    if progress:
        progress(Progress("done", "", 1.0, f"converted in {seconds:.1f} s"))
    return Result(out, False, compiled, note, seconds, st.seconds)


def _prepare_work(work: Path, p: Plan) -> None:
    """Reuse a work folder left by the same conversion; wipe any other."""
    state = _read_manifest(work)
    if work.exists() and (state is None or state.get("fingerprint") != p.fingerprint):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob(f"{spill.PREFIX}*"):  # weights of a part an interrupted run did not finish
        stale.unlink()
    (work / layout.MANIFEST_FILE).write_text(json.dumps({"fingerprint": p.fingerprint, "complete": False}))


def _metadata(p: Plan, bits: int | None, chunk_no: int | None = None, functions: str = "") -> dict[str, str]:
    o = p.options
    meta = {"com.anemll.context_length": o.context_length, "com.anemll.num_chunks": p.num_chunks,
            "com.anemll.batch_size": o.batch_size, "com.anemll.info": f"anemlld {__version__}"}
    if bits is not None:  # ANEMLL's runners int() this key whenever they open a package: no "none"
        meta["com.anemll.lut_bits"] = bits
    if chunk_no is not None:
        meta["com.anemll.chunk_no"] = chunk_no
    if functions:
        meta["com.anemll.functions"] = functions
    return {k: str(v) for k, v in meta.items()}


def _save(model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".saving.mlpackage")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    tmp.rename(path)


def _calibrate(p: Plan, st: _Stages) -> None:
    """Measure the fp16 range (convert/calibrate.py); the parts are then
    built with the residual scale it chose."""
    import torch

    t, loads = time.perf_counter(), st.seconds.get("load", 0.0)
    st.report("calibrate", "")
    ids, text = calibrate.calibration_ids(p.source.path, p.args.vocab_size,
                                          min(p.options.context_length, calibrate.MAX_TOKENS))

    def embed_rows(args: ModelArgs, ids: list[int]):
        rows = p.source.rows("model.embed_tokens.weight", ids).float()
        with torch.device("meta"):
            build(p.architecture, args, layers=range(0), embeddings=False, lm_head=False).fold(
                "model.embed_tokens.weight", rows)
        return rows

    def load(args: ModelArgs, **part) -> AneLM:
        # a ring of the whole context (ring=None) is addressed by position: one pass over every token
        return _loaded(p, st, "calibrate", args, ring=None, **part)

    p.fp16_range = calibrate.fp16_range(p.args, p.chunk_ranges, load, embed_rows, ids, p.options.context_length)
    p.args = dataclasses.replace(p.args, residual_scale=p.fp16_range.residual_scale)
    st.seconds["calibrate"] = time.perf_counter() - t - (st.seconds.get("load", 0.0) - loads)
    st.report("calibrate", "", p.fp16_range.message(text))


def _loaded(p: Plan, st: _Stages, name: str, args: ModelArgs | None = None, **part) -> AneLM:
    """The torch model of one part with its checkpoint weights (built with
    ``args``, the plan's by default); nothing of the checkpoint stays mapped
    afterwards."""
    with weights_loaded_later():
        lm = build(p.architecture, args or p.args, context_length=p.options.context_length,
                   **{"ring": p.ring, **part})
    st.run("load", name, 0.0, lm.load_weights, p.source.get)
    p.source.close()  # unmap the shards: their pages otherwise stay resident through the export
    return lm


def _build_direct(p: Plan, st: _Stages, work: Path, name: str, part: dict, luts: dict[str, tuple[int, int]],
                  quantize_w: float, export_w: float, function: Callable, shapes: export.Shapes,
                  variants: dict[str, dict], meta: dict[str, str], description: str) -> None:
    """One part through the direct route (convert/program.py): its weights
    read, and quantized with ``luts``, once, one at a time, for every
    function of ``variants``, which are built and saved as one package."""
    direct = st.run("load", name, 0.0, lambda: program.DirectPart(
        p.architecture, p.args, p.options.context_length, p.source.get, p.source.close, p.ring, str(work), **part))
    try:
        st.run("quantize" if luts else "load", name, quantize_w, direct.read, luts)
        model = st.run("export", name, export_w, direct.export, function, shapes, variants)
    finally:
        direct.close()  # its spilled weights, written into the package or not
    del direct
    export.set_metadata(model, meta, description)
    _save(model, work / f"{name}.mlpackage")
    del model
    gc.collect()


def _luts(p: Plan, *parts: tuple[str, str]) -> dict[str, tuple[int, int]]:
    """(scope, option) -> the LUTs of the options set: scope -> (bits, group size)."""
    o = p.options
    return {scope: (getattr(o, option), o.group_size(option)) for scope, option in parts if getattr(o, option)}


def _build_end(p: Plan, shapes, work: Path, st: _Stages, w: float, q: float, head: bool) -> None:
    """The embeddings part (``head`` False) or the split LM head (True);
    with ``argmax_in_model`` the head has ``logits`` (the default, what
    every runner calls) and ``argmax`` functions over one copy of its weights."""
    name = p.parts[-1] if head else p.parts[0]
    if (work / f"{name}.mlpackage").exists():
        st.done += w * (1 + q)
        return
    part = dict(layers=range(0), embeddings=not head, lm_head=head, lm_head_split=p.lm_head_split)
    functions = ""
    if not head:
        option, function, variants, what = "lut_embeddings", export.embeddings_function, {"main": {}}, \
            "token embeddings"
        luts = _luts(p, (export.EMBEDDINGS_SCOPE, option))
    else:
        option, function, what = "lut_lm_head", export.head_function, f"LM head in {p.lm_head_split} parts"
        luts = _luts(p, (export.HEAD_SCOPE, option))
        variants = {"main": {}}
        if p.options.argmax_in_model:
            variants = {export.LOGITS: {"argmax": False}, export.ARGMAX: {"argmax": True}}
            functions, what = ",".join(variants), f"{what}: logits, or each part's argmax"
    _build_direct(p, st, work, name, part, luts, w * q, w, function, shapes, variants,
                  _metadata(p, getattr(p.options, option), functions=functions), what)


def _build_chunk(p: Plan, shapes, work: Path, st: _Stages, index: int, layers: range, w: float,
                 q: float) -> None:
    name = p.parts[1 + index]
    if (work / f"{name}.mlpackage").exists():
        st.done += w * (1 + q)
        return
    variants = {export.INFER: {"prefill": False}, export.PREFILL: {"prefill": True}}
    _build_direct(p, st, work, name, dict(layers=layers, embeddings=False, lm_head=False),
                  _luts(p, (export.LAYERS_SCOPE, "lut_ffn")), w * q, w, export.chunk_function, shapes, variants,
                  _metadata(p, p.options.lut_ffn, index + 1, ",".join(variants)),
                  f"decoder layers {layers.start}-{layers.stop - 1} of {p.args.num_hidden_layers}")


def _build_monolithic(p: Plan, shapes, work: Path, st: _Stages, quant: Callable[[int | None], float]) -> None:
    """Embeddings, every layer and the head in one package, functions
    ``infer`` and ``prefill``, and with ``argmax_in_model`` ``argmax`` (an
    infer step returning each split's winner); each part keeps its own LUT."""
    name = p.parts[0]
    o, args = p.options, p.args
    emb_w, layers_w = args.vocab_size * args.hidden_size, args.num_hidden_layers * args.layer_params
    quantize_w = emb_w * (quant(o.lut_embeddings) + quant(o.lut_lm_head)) + layers_w * quant(o.lut_ffn)
    export_w = 2 * emb_w + layers_w
    if (work / f"{name}.mlpackage").exists():
        st.done += quantize_w + export_w
        return
    luts = _luts(p, (export.EMBEDDINGS_SCOPE, "lut_embeddings"), (export.LAYERS_SCOPE, "lut_ffn"),
                 (export.HEAD_SCOPE, "lut_lm_head"))
    variants = {export.INFER: {"prefill": False}, export.PREFILL: {"prefill": True}}
    if o.argmax_in_model:
        variants[export.ARGMAX] = {"prefill": False, "argmax": True}
    _build_direct(p, st, work, name, dict(lm_head_split=p.lm_head_split), luts, quantize_w, export_w,
                  export.monolithic_function, shapes, variants,
                  _metadata(p, o.lut_ffn, functions=",".join(variants)),
                  f"monolithic: embeddings, {args.num_hidden_layers} decoder layers, LM head in {p.lm_head_split} parts")


def _finish(p: Plan, work: Path, compiled: bool, note: str, seconds: dict[str, float]) -> None:
    o, args = p.options, p.args
    ext = ".mlmodelc" if compiled else ".mlpackage"
    params = {
        "context_length": o.context_length,
        "batch_size": o.batch_size,
        "lut_embeddings": o.lut_embeddings or "none",
        "lut_ffn": o.lut_ffn or "none",
        "lut_lmhead": o.lut_lm_head or "none",
        "num_chunks": p.num_chunks,
        "model_prefix": p.prefix,
        "embeddings": p.parts[0] + ext,
        "lm_head": p.parts[-1] + ext,
        "ffn": layout.ffn_base(p.prefix, o.lut_ffn) + ext,
        "split_lm_head": p.lm_head_split,
        "lm_head_chunk_sizes": split_sizes(args.vocab_size, p.lm_head_split),
        "state_length": o.context_length,
        "vocab_size": args.vocab_size,
        # What ANEMLL 0.3.5's runner reads besides: without prefill_dynamic_slice
        # it never calls our prefill (it feeds the prompt token by token); our
        # prefill writes the cache with a dynamic slice at current_pos and takes
        # no update_mask. No tokenizer_path: that runner resolves it against
        # its own working directory; without it, it reads the model's folder.
        "num_logits": p.lm_head_split,
        # Our argmax is a second function of the head; the default function
        # still returns logits, as runners that read this key as false expect.
        "argmax_in_model": False,
        "prefill_dynamic_slice": True,
        "update_mask_prefill": False,
        "lut_group_size": o.lut_group_size,
    }
    if o.argmax_in_model:
        params["lm_head_functions"] = f"{export.LOGITS},{export.ARGMAX}"
    if o.monolithic:  # one file instead of the three kinds of parts, as ANEMLL 0.3.5 writes it
        for key in ("embeddings", "lm_head", "ffn", "num_chunks", "lm_head_functions"):
            params.pop(key, None)
        params.update(monolithic_model=p.parts[0] + ext, lut_bits=o.lut_ffn or "none")
        if o.argmax_in_model:  # beside infer and prefill, which return logits as ANEMLL's runner reads them
            params["monolithic_functions"] = f"{export.INFER},{export.PREFILL},{export.ARGMAX}"
    if p.ring is not None:  # the sliding-window layers: the engine's local_mask and ring_pos
        windows = args.layer_windows
        params.update(sliding_window=args.sliding_window, ring_size=p.ring,
                      local_layers=[i for i, w in enumerate(windows) if w is not None],
                      global_layers=[i for i, w in enumerate(windows) if w is None])
    for part, option in (("embeddings", "lut_embeddings"), ("ffn", "lut_ffn"), ("lmhead", "lut_lm_head")):
        if getattr(o, option):  # output channels per table, 0 for one per tensor, as ANEMLL writes it
            params[f"lut_{part}_per_channel"] = o.group_size(option)
    layout.write_meta(work, f"anemll-{p.source.path.name}-ctx{o.context_length}", __version__, p.architecture,
                      params, "monolithic" if o.monolithic else "chunked")
    for f in p.source.tokenizer_files():
        shutil.copy2(f, work / f.name)
    manifest = {
        "converter": f"anemlld {__version__}",
        "fingerprint": p.fingerprint,
        "complete": True,
        "source": str(p.source.path),
        "architecture": p.architecture,
        "options": o.to_mapping(),
        "chunks": [[r.start, r.stop] for r in p.chunk_ranges],
        "compiled": compiled,
        "compile_note": note,
        "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
        **({"fp16_range": p.fp16_range.as_dict()} if p.fp16_range else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (work / layout.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def _publish(work: Path, out: Path) -> None:
    """Swap the finished work folder into place; an old output of ours is
    moved aside first and removed only after the new one is there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
