"""Llama (2, 3.x with llama3 rope scaling): the base model as it is."""
from __future__ import annotations

from typing import Any

from anemlld.convert.models.base import AneLM, Attention, ModelArgs

PREFIX = "llama"


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    return ModelArgs.from_config(cfg)


class Model(AneLM):
    attention = Attention
