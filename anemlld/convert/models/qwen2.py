"""Qwen2 / Qwen2.5: Llama with biases on the q/k/v projections (and, when
``use_sliding_window`` is set, sliding-window layers where ``layer_types``
says so, from the shared base)."""
from __future__ import annotations

from typing import Any

from anemlld.convert.models.base import AneLM, Attention, ModelArgs

PREFIX = "qwen"
SLIDING_WINDOW = True


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    # Qwen2's q/k/v always carry a bias; its config.json has no flag for it.
    return ModelArgs.from_config(cfg, attention_bias=True)


class Model(AneLM):
    attention = Attention
