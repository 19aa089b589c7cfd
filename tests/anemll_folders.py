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
