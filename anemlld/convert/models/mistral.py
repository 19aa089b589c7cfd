"""Mistral and Ministral: the Llama model, with attention limited to a sliding
window of the last ``sliding_window`` tokens when the config sets one shorter
than the context (every layer then has it: ``ModelArgs.layer_windows``)."""
from __future__ import annotations

from anemlld.convert.models.llama import Model, model_args

PREFIX = "mistral"
SLIDING_WINDOW = True

__all__ = ["Model", "model_args", "PREFIX", "SLIDING_WINDOW"]
