"""Qwen3: Llama plus an RMSNorm over each head's queries and keys before rope
(sliding-window layers, when the config asks, as Qwen2's)."""
from __future__ import annotations

from typing import Any

from anemlld.convert.models.base import AneLM, Attention, ModelArgs, RMSNorm

PREFIX = "qwen"
SLIDING_WINDOW = True


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    return ModelArgs.from_config(cfg)


class QKNormAttention(Attention):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__(args, layer_idx)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)

    def norm_qk(self, q, k):
        return self.q_norm(q), self.k_norm(k)


class Model(AneLM):
    attention = QKNormAttention
