"""How closely a converted model matches its Hugging Face original.

Both models read the same text in windows of the converted context length.
The converted model runs its real packages, one token at a time through
``infer`` (so every position's logits are seen); the reference is
transformers in fp32. Reported:

- ``perplexity`` / ``reference_perplexity``: exp of the mean next-token loss;
- ``max_abs_logit_diff`` / ``mean_abs_logit_diff`` over every position;
- ``greedy_agreement``: the fraction of positions whose most likely next
  token is the same in both (teacher-forced, so one disagreement does not
  derail the rest);
- ``kl_divergence``: the mean over positions of KL(reference || converted)
  between the next-token distributions, in nats (the figure ANEMLL's model
  cards quote beside top-1 agreement).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from anemlld.layout import MANIFEST_FILE
from anemlld.runtime.engine import Engine
from shared.errors import BadInput

SAMPLE_TEXT = Path(__file__).with_name("verify_sample.txt")


@dataclass
class Report:
    model: str
    reference: str
    executor: str
    tokens: int
    windows: int
    perplexity: float
    reference_perplexity: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    greedy_agreement: float
    kl_divergence: float
    seconds: float

    def as_dict(self) -> dict:
        # KL of a model without LUT is around 1e-5: four decimals would say 0
        return {k: (round(v, 7 if k == "kl_divergence" else 4) if isinstance(v, float) else v)
                for k, v in asdict(self).items()}


def reference_of(model_dir: Path) -> Path:
    try:
        src = json.loads((model_dir / MANIFEST_FILE).read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        raise BadInput(f"{model_dir} does not record the folder it was converted from",
                       "pass the Hugging Face folder with --reference") from None
    if not Path(src).is_dir():
        raise BadInput(f"the source recorded at conversion, {src}, is gone",
                       "pass the Hugging Face folder with --reference")
    return Path(src)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -log_softmax(logits)[np.arange(len(targets)), targets]


def kl_divergence(reference: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """KL(reference || ours) per row of two (positions, vocab) logit arrays."""
    p, q = log_softmax(reference), log_softmax(ours)
    return (np.exp(p) * (p - q)).sum(axis=-1)


def verify(model_dir: str | Path, reference: str | Path | None = None, text: str | None = None,
           max_tokens: int = 2048, executor: str = "auto", engine: Engine | None = None) -> Report:
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    ref_dir = Path(reference) if reference else reference_of(model_dir)
    engine = engine or Engine(model_dir, executor=executor)
    if engine.layout.argmax_only:
        raise BadInput(f"{model_dir}'s LM head returns only its argmax (ANEMLL's --argmax): verify compares "
                       "logits", "verify a conversion without --argmax of the same model")
    text = text if text is not None else SAMPLE_TEXT.read_text(encoding="utf-8")
    ids = list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])[:max_tokens]
    window = engine.ctx
    bos = engine.tokenizer.bos_token_id
    ref = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
    nll, ref_nll, kl, diffs_max, diffs_sum, agree, count, windows = [], [], [], 0.0, 0.0, 0, 0, 0
    step = window - (1 if bos is not None else 0)
    for start in range(0, len(ids), step):
        body = ids[start:start + step]
        seq = ([bos] if bos is not None else []) + body
        if len(seq) < 2:
            continue
        windows += 1
        session = engine.new_session()
        ours = np.stack([engine.feed(session, [t]) for t in seq[:-1]])
        with torch.no_grad():
            theirs = ref(torch.tensor([seq[:-1]])).logits[0].float().numpy()
        targets = np.asarray(seq[1:])
        nll.append(_nll(ours, targets))
        ref_nll.append(_nll(theirs, targets))
        kl.append(kl_divergence(theirs, ours))
        diff = np.abs(ours - theirs)
        diffs_max = max(diffs_max, float(diff.max()))
        diffs_sum += float(diff.mean()) * len(targets)
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        count += len(targets)
    if not count:
        raise BadInput("the evaluation text is too short", "pass a longer --text file")
    return Report(
        model=str(model_dir), reference=str(ref_dir), executor=engine.executor.name, tokens=count,
        windows=windows, perplexity=math.exp(float(np.concatenate(nll).mean())),
        reference_perplexity=math.exp(float(np.concatenate(ref_nll).mean())),
        max_abs_logit_diff=diffs_max, mean_abs_logit_diff=diffs_sum / count, greedy_agreement=agree / count,
        kl_divergence=float(np.concatenate(kl).mean()),
        seconds=time.perf_counter() - t0)
