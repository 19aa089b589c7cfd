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
    shapes = export.Shapes(args.hidden_size, lay.context_length, lay.batch_size, (1, 1, 1, 1))
    head = lay.part("lm_head", ".mlpackage")
    shutil.rmtree(head)
    export.export_head(lm, shapes, argmax=True).save(str(head))
    edit_meta(dest, argmax_in_model=True, lm_head_functions=None)
    (dest / layout.MANIFEST_FILE).unlink(missing_ok=True)  # not ours any more
    return dest
