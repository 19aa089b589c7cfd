"""Helpers for tests of the layouts ANEMLL 0.3.5 writes: transformers' greedy
tokens with their top-two gaps, and folders laid out as ANEMLL's converter
lays them out, built with coremltools from our own converted models."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from anemlld import layout
from anemlld.convert import export
from anemlld.convert.models import build
from anemlld.convert.models.base import weights_loaded_later
from anemlld.convert.source import HFSource


@torch.no_grad()
def hf_greedy(src: Path, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation (fp32, a plain forward loop) and the
    gap between its top two logits at each step."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids, tokens, gaps = list(prompt), [], []
    for _ in range(steps):
        logits = ref(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        gaps.append(float(top2[0] - top2[1]))
        tokens.append(int(logits.argmax()))
        ids.append(tokens[-1])
    return tokens, gaps


def agree_until_a_near_tie(ours: list[int], theirs: list[int], gaps: list[float], tie: float = 0.05) -> int:
    """Leading tokens that agree; they may part only where the reference's
    top two are within ``tie`` (fp16 rounding may flip those)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            assert gaps[i] < tie, f"token {i} differs ({a} vs {b}) with a clear gap {gaps[i]:.3f}"
            return i
    return min(len(ours), len(theirs))


def edit_meta(folder: Path, **changes) -> None:
    """Set meta.yaml parameters; None removes one."""
    doc = yaml.safe_load((folder / layout.META_FILE).read_text())
    params = doc["model_info"]["parameters"]
    params.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del params[key]
    (folder / layout.META_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))


def anemll_argmax_folder(ours: Path, src: Path, dest: Path) -> Path:
    """``ours`` (converted without LUT) with its LM head replaced by the one
    ANEMLL's ``--argmax`` writes: one function returning ``argmax_idx`` and
    ``argmax_val`` per split, meta.yaml ``argmax_in_model: true``."""
    shutil.copytree(ours, dest)
    lay = layout.read_meta(dest)
    source = HFSource.open(src)
    from anemlld.convert.models import ARCHITECTURES

    args = ARCHITECTURES[lay.architecture].model_args(source.config)
    with weights_loaded_later():
        lm = build(lay.architecture, args, layers=range(0), embeddings=False, lm_head=True,
                   lm_head_split=lay.split_lm_head, context_length=lay.context_length)
    lm.load_weights(source.get)
    source.close()
    shapes = export.Shapes(args.hidden_size, lay.context_length, lay.batch_size)
    head = lay.part("lm_head", ".mlpackage")
    shutil.rmtree(head)
    export.export_head(lm, shapes, argmax=True).save(str(head))
    edit_meta(dest, argmax_in_model=True, lm_head_functions=None)
    (dest / layout.MANIFEST_FILE).unlink(missing_ok=True)  # not ours any more
    return dest


def anemll_monolithic_folder(ours: Path, dest: Path) -> Path:
    """Our monolithic folder as ANEMLL 0.3.5 writes one: its meta.yaml keys
    only, the compiled file named, none of our manifest."""
    shutil.copytree(ours, dest)
    (dest / layout.MANIFEST_FILE).unlink()
    edit_meta(dest, monolithic_model="llama_monolithic_full.mlmodelc", lut_group_size=None, vocab_size=None,
              lm_head_chunk_sizes=None, lut_embeddings=None, lut_ffn=None, lut_lmhead=None, model_type=None)
    doc = yaml.safe_load((dest / layout.META_FILE).read_text())  # ANEMLL puts model_type beside the parameters
    doc["model_info"]["model_type"] = "monolithic"
    (dest / layout.META_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def anemll_monolithic_argmax_folder(ours: Path, src: Path, dest: Path) -> Path:
    """``anemll_monolithic_folder`` of ``ours`` (no LUT), rebuilt as ANEMLL's
    ``--monolithic --argmax`` writes it: both functions return ``argmax_idx``
    and ``argmax_val`` instead of logits; meta.yaml ``argmax_in_model: true``."""
    from anemlld.convert.models import ARCHITECTURES

    anemll_monolithic_folder(ours, dest)
    lay = layout.read_meta(dest)
    source = HFSource.open(src)
    args = ARCHITECTURES[lay.architecture].model_args(source.config)
    with weights_loaded_later():
        lm = build(lay.architecture, args, lm_head_split=lay.split_lm_head, context_length=lay.context_length)
    lm.load_weights(source.get)
    source.close()
    shapes = export.Shapes(args.hidden_size, lay.context_length, lay.batch_size)
    package = lay.part("monolithic_model", ".mlpackage")
    functions = {}
    for fn, prefill in (("infer", False), ("prefill", True)):
        functions[fn] = dest / f"{fn}.mlpackage"
        export.export_monolithic(lm, shapes, prefill, argmax=True).save(str(functions[fn]))
    shutil.rmtree(package)
    export.combine(functions, package, {}, "monolithic, argmax")
    for path in functions.values():
        shutil.rmtree(path)
    ours_params = layout.read_meta(ours).params  # ANEMLL's argmax folders say how the vocabulary is split
    edit_meta(dest, argmax_in_model=True, lm_head_chunk_sizes=ours_params["lm_head_chunk_sizes"],
              vocab_size=ours_params["vocab_size"])
    return dest


class UpdateMaskPrefill(torch.nn.Module):
    """A chunk's prefill as ANEMLL's older converters declare it, taking
    ``update_mask`` (1, 1, context, batch): 1 at [current_pos + i, i]. Ours
    writes the cache with a dynamic slice, so this one checks the mask
    instead: any wrong entry is added to every hidden value, and the model's
    tokens part from transformers'."""

    def __init__(self, lm, context: int):
        super().__init__()
        self.model = lm
        self.context = context

    def forward(self, hidden_states, position_ids, causal_mask, current_pos, update_mask):
        out = self.model.layers_forward(hidden_states, position_ids, causal_mask=causal_mask, current_pos=current_pos)
        rows = current_pos + torch.arange(hidden_states.shape[1], dtype=torch.int32)
        want = (torch.arange(self.context, dtype=torch.int32)[:, None] == rows[None, :]).to(update_mask.dtype)
        return out + (update_mask[0, 0] - want).abs().sum()


def with_update_mask_prefill(folder: Path, src: Path) -> Path:
    """Rebuild each FFN chunk of ``folder`` (ours, no LUT) with a prefill that
    takes ``update_mask``; meta.yaml says so as ANEMLL writes it."""
    import coremltools as ct
    import numpy as np

    from anemlld.convert.models import ARCHITECTURES
    from anemlld.convert.models.base import causal_mask
    from anemlld.convert.pipeline import split_layers

    lay = layout.read_meta(folder)
    source = HFSource.open(src)
    args = ARCHITECTURES[lay.architecture].model_args(source.config)
    ctx, batch = lay.context_length, lay.batch_size
    shapes = export.Shapes(args.hidden_size, ctx, batch)
    for chunk, layers in zip(lay.chunks(".mlpackage"), split_layers(args.num_hidden_layers, lay.num_chunks)):
        with weights_loaded_later():
            lm = build(lay.architecture, args, layers=layers, embeddings=False, lm_head=False, context_length=ctx)
        lm.load_weights(source.get)
        infer = chunk.with_name("infer.mlpackage")
        export.export_chunk(lm, shapes, False).save(str(infer))
        lm, dtype = export._trace_dtype(lm)
        positions = torch.arange(batch, dtype=torch.int32)
        example = (torch.zeros(1, batch, args.hidden_size, dtype=dtype), positions,
                   causal_mask(positions, ctx, dtype), torch.zeros(1, dtype=torch.int32),
                   torch.zeros(1, 1, ctx, batch, dtype=dtype))
        traced = export._trace(UpdateMaskPrefill(lm, ctx), example)
        inputs = [ct.TensorType(name="hidden_states", shape=(1, batch, args.hidden_size), dtype=np.float16),
                  ct.TensorType(name="position_ids", shape=(batch,), dtype=np.int32),
                  ct.TensorType(name="causal_mask", shape=(1, 1, batch, ctx), dtype=np.float16),
                  ct.TensorType(name="current_pos", shape=(1,), dtype=np.int32),
                  ct.TensorType(name="update_mask", shape=(1, 1, ctx, batch), dtype=np.float16)]
        states = export._states(lm)
        prefill = chunk.with_name("prefill.mlpackage")
        export._convert(traced, inputs, [ct.TensorType(name="output_hidden_states", dtype=np.float16)],
                        states).save(str(prefill))
        shutil.rmtree(chunk)
        export.combine({"infer": infer, "prefill": prefill}, chunk, {}, "update_mask prefill")
        shutil.rmtree(infer)
        shutil.rmtree(prefill)
    source.close()
    edit_meta(folder, update_mask_prefill=True, prefill_dynamic_slice=False)
    return folder


# --- Gemma 3 as ANEMLL 0.3.5 builds it (docs/anemll.md has the contract) -----

GEMMA_FUNCTIONS = ("infer", "infer_rotate", "prefill", "prefill_rotate")
GEMMA_MODES = {"infer": (False, False), "infer_rotate": (False, True), "prefill": (True, False),  # (prefill, rotate)
               "prefill_rotate": (True, True)}


class AnemllGemmaFunction(torch.nn.Module):
    """One function of a Gemma 3 FFN chunk as ANEMLL 0.3.5 builds it: inputs
    ``hidden_states``, ``position_ids``, ``causal_mask`` (1, 1, S, context:
    rows of the plain causal mask) and ``current_pos``; the global layers
    write ``kv_cache_global`` at current_pos and attend through the whole
    mask; the local layers keep ``kv_cache_local`` of ``window`` slots and
    attend to all of them through the mask's first ``window`` columns. The
    fill functions (``infer``, ``prefill``) write the local cache at
    current_pos (prefill with a dynamic slice); the rotate functions shift it
    left by S and write at ``window - S``. The last chunk's prefill returns
    the first row, as ANEMLL's does: its runner never reads it. Built over our
    own layers (``AneLM.layers_forward`` with a ring of ``window`` slots).
    With ``update_mask`` (a prefill of ANEMLL's without the dynamic slice)
    it also takes ``update_mask`` (1, 1, context, S), 1 at [current_pos + i,
    i], and checks it: any wrong entry is added to the hidden states whose
    K/V it writes, and the tokens after part from transformers'."""

    def __init__(self, lm, window: int, prefill: bool, rotate: bool, update_mask: bool = False):
        super().__init__()
        from anemlld.convert.models.base import cache_place

        self.model, self.window, self.prefill, self.rotate = lm, window, prefill, rotate
        self.update_mask = update_mask
        windows = lm.args.layer_windows
        self.local = [cache_place(lm.args, i) for i in lm.layer_range if windows[i] is not None]

    def forward(self, hidden_states, position_ids, causal_mask, current_pos, update_mask=None):
        seq, w, body = hidden_states.shape[1], self.window, self.model.model
        at = current_pos
        if self.rotate:
            kv = body.kv_cache_local
            for index, count in self.local:
                for row in (index, index + count):
                    kv[row:row + 1, :, 0:w - seq, :] = kv[row:row + 1, :, seq:w, :].clone()
            at = torch.full((1,), w - seq, dtype=torch.int32)
        if update_mask is not None:  # a wrong entry goes into the K/V this step writes
            rows = current_pos + torch.arange(seq, dtype=torch.int32)
            want = torch.arange(causal_mask.shape[-1], dtype=torch.int32)[:, None] == rows[None, :]
            hidden_states = hidden_states + (update_mask[0, 0] - want.to(update_mask.dtype)).abs().sum()
        h = self.model.layers_forward(hidden_states, position_ids, causal_mask=causal_mask, current_pos=current_pos,
                                      local_mask=causal_mask[:, :, :, :w], ring_pos=at)
        return h[:, :1] if self.prefill and body.norm is not None else h


def anemll_gemma_chunks(src: Path, ours: Path):
    """The torch functions of each FFN chunk of ANEMLL's Gemma 3 layout for
    ``src``, over the chunks, context and residual scale of ``ours`` (our
    conversion of it), fp32, the functions of a chunk sharing its caches;
    and the embeddings and LM head they go with, as one model."""
    import dataclasses
    import json

    from anemlld.convert.models import ARCHITECTURES
    from anemlld.convert.pipeline import split_layers

    lay = layout.read_meta(ours)
    manifest = json.loads((ours / layout.MANIFEST_FILE).read_text())
    source = HFSource.open(src)
    args = ARCHITECTURES["gemma3"].model_args(source.config)
    args = dataclasses.replace(args, residual_scale=manifest.get("fp16_range", {}).get("residual_scale", 1.0))
    window, out = args.sliding_window, []
    for layers in split_layers(args.num_hidden_layers, lay.num_chunks):
        with weights_loaded_later():
            lm = build("gemma3", args, layers=layers, embeddings=False, lm_head=False,
                       context_length=lay.context_length, ring=window)
        lm.load_weights(source.get)
        out.append({fn: AnemllGemmaFunction(lm, window, *GEMMA_MODES[fn]) for fn in GEMMA_FUNCTIONS})
    with weights_loaded_later():
        ends = build("gemma3", args, layers=range(0), lm_head_split=lay.split_lm_head,
                     context_length=lay.context_length)
    ends.load_weights(source.get)
    source.close()
    return out, ends


def _export_gemma_function(fn: AnemllGemmaFunction, context: int, batch: int, path: Path) -> None:
    import coremltools as ct
    import numpy as np

    from anemlld.convert.models.base import causal_mask

    seq, hidden = (batch if fn.prefill else 1), fn.model.args.hidden_size
    positions = torch.arange(seq, dtype=torch.int32)
    example = (torch.zeros(1, seq, hidden, dtype=torch.float16), positions,
               causal_mask(positions, context, torch.float16), torch.zeros(1, dtype=torch.int32))
    if fn.update_mask:
        example += (torch.zeros(1, 1, context, seq, dtype=torch.float16),)
    traced = export._trace(fn, example)
    fn.model.reset_cache()
    inputs = [ct.TensorType(name="hidden_states", shape=(1, seq, hidden), dtype=np.float16),
              ct.TensorType(name="position_ids", shape=(seq,), dtype=np.int32),
              ct.TensorType(name="causal_mask", shape=(1, 1, seq, context), dtype=np.float16),
              ct.TensorType(name="current_pos", shape=(1,), dtype=np.int32)]
    if fn.update_mask:
        inputs.append(ct.TensorType(name="update_mask", shape=(1, 1, context, seq), dtype=np.float16))
    export._convert(traced, inputs, export.chunk_outputs(ct), export._states(fn.model)).save(str(path))


def anemll_gemma_folders(ours: Path, src: Path, root: Path) -> tuple[Path, Path, Path]:
    """``ours`` (our Gemma 3 conversion of ``src``, no LUT, a window shorter
    than its context) with its FFN chunks rebuilt as ANEMLL 0.3.5 builds
    them (``AnemllGemmaFunction``: two states, four functions per chunk) and
    meta.yaml as it writes it, twice from one export: ``root/four`` with the
    four functions in one file per chunk, ``root/split`` as its
    ``--split-rotate`` writes them, ``infer`` + ``infer_rotate`` in
    ``gemma3_FFN_chunk_NNofMM_combined`` and ``prefill`` + ``prefill_rotate``
    in ``gemma3_PF_chunk_NNofMM`` (meta ``ffn``, ``pf``); and ``root/mask``,
    the four-function folder with prefills that take ``update_mask``
    (``update_mask_prefill: true``, no dynamic slice)."""
    lay = layout.read_meta(ours)
    ctx, batch, n = lay.context_length, lay.batch_size, lay.num_chunks
    folders = {"four": root / "four", "split": root / "split", "mask": root / "mask"}
    for dest in folders.values():
        shutil.copytree(ours, dest, ignore=shutil.ignore_patterns("*_FFN_*"))
    for i, functions in enumerate(anemll_gemma_chunks(src, ours)[0]):
        functions["infer"].model.half()
        paths = {}
        functions["prefill_mask"] = AnemllGemmaFunction(functions["prefill"].model, functions["prefill"].window,
                                                        prefill=True, rotate=False, update_mask=True)
        for name, fn in functions.items():
            paths[name] = root / f"{name}.mlpackage"
            _export_gemma_function(fn, ctx, batch, paths[name])
        paths["prefill_plain"], paths["prefill"] = paths["prefill"], paths["prefill_mask"]
        stem = f"gemma3_FFN_PF_chunk_{i + 1:02d}of{n:02d}"
        export.combine({k: paths[k] for k in GEMMA_FUNCTIONS}, folders["mask"] / f"{stem}.mlpackage", {},
                       "ANEMLL-shaped Gemma 3, update_mask prefill")
        paths["prefill"] = paths.pop("prefill_plain")
        files = {"four": {f"gemma3_FFN_PF_chunk_{i + 1:02d}of{n:02d}": GEMMA_FUNCTIONS},
                 "split": {f"gemma3_FFN_chunk_{i + 1:02d}of{n:02d}_combined": ("infer", "infer_rotate"),
                           f"gemma3_PF_chunk_{i + 1:02d}of{n:02d}": ("prefill", "prefill_rotate")}}
        for kind, dest in folders.items():
            for stem, names in files.get(kind, {}).items():
                export.combine({k: paths[k] for k in names}, dest / f"{stem}.mlpackage", {}, "ANEMLL-shaped Gemma 3")
        for path in paths.values():
            shutil.rmtree(path)
    ours_params = lay.params
    meta = {"context_length": ctx, "batch_size": batch, "lut_embeddings": "none", "lut_ffn": "none",
            "lut_lmhead": "none", "num_chunks": n, "model_prefix": "gemma3",
            "embeddings": "gemma3_embeddings.mlmodelc", "lm_head": "gemma3_lm_head.mlmodelc",
            "ffn": f"gemma3_FFN_PF_chunk_01of{n:02d}.mlmodelc",
            "split_lm_head": ours_params["split_lm_head"], "num_logits": ours_params["split_lm_head"],
            "sliding_window": ours_params["sliding_window"], "attention_size": ctx, "state_length": ctx,
            "update_mask_prefill": False, "prefill_dynamic_slice": True, "argmax_in_model": False,
            "vocab_size": ours_params["vocab_size"], "lm_head_chunk_sizes": ours_params["lm_head_chunk_sizes"]}
    split = {"split_rotate": True, "ffn": f"gemma3_FFN_chunk_01of{n:02d}_combined.mlmodelc",
             "pf": f"gemma3_PF_chunk_01of{n:02d}.mlmodelc"}
    variants = {"four": {}, "split": split, "mask": {"update_mask_prefill": True, "prefill_dynamic_slice": False}}
    for kind, dest in folders.items():
        params = {**meta, **variants[kind]}
        layout.write_meta(dest, f"anemll-gemma3-ctx{ctx}", "0.3.5", "gemma3", params)
        (dest / layout.MANIFEST_FILE).unlink()
    return folders["four"], folders["split"], folders["mask"]
