"""Gemma 3 (``gemma3_text``: 270M, 1B; the text part of ``gemma3``: 4B and up).

What differs from Llama, all of it folded into weights or small subclasses:
embeddings times sqrt(hidden_size) and RMSNorm weights as ``1 + weight``
(both folded in as the weights load), four norms per layer (the attention
and MLP outputs are normed before they join the residual stream), Qwen3's
q/k norms, a GELU-tanh gated MLP, scores scaled by ``query_pre_attn_scalar``,
and local (``sliding_attention``) layers with their own rope base beside the
global ones (``layer_types``, or every ``sliding_window_pattern``-th layer
global in older files). The residual stream can exceed fp16's range; the
converter measures it and carries it scaled by ``residual_scale``, which the
embeddings and the post-norms take and every following norm cancels
(convert/calibrate.py).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from anemlld.convert.models.base import AneLM, DecoderLayer, ModelArgs, RMSNorm, rope_scaling, rope_theta
from anemlld.convert.models.qwen3 import QKNormAttention
from shared.errors import BadInput

PREFIX = "gemma3"
SLIDING_WINDOW = True
RESIDUAL_SCALE = True  # the converter may rescale the residual stream (convert/calibrate.py)

# Gemma3TextConfig's defaults for the keys a config.json may leave out (the
# 4B checkpoint's text_config names six keys and relies on these for the rest).
DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6,
}

# the norms whose output joins the residual stream: they carry its scale
RESIDUAL_NORMS = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")


def layer_kinds(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or older files' every ``sliding_window_pattern``-th layer global."""
    if cfg.get("layer_types") is not None:
        return cfg["layer_types"]
    pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(int(cfg["num_hidden_layers"]))]


def rope_of(cfg: dict[str, Any], kind: str) -> tuple[float, dict | None]:
    """The rope base and scaling of one kind of layer: ``rope_parameters``
    per layer type (transformers 5), or ``rope_theta`` and ``rope_scaling``
    for the global layers and ``rope_local_base_freq`` for the local ones."""
    params = cfg.get("rope_parameters") or {}
    if kind in params:
        view = {"rope_parameters": params[kind]}
    elif kind == "full_attention":
        view = {"rope_theta": cfg["rope_theta"], "rope_scaling": cfg.get("rope_scaling")}
    else:
        view = {"rope_theta": cfg["rope_local_base_freq"]}
    return rope_theta(view), rope_scaling(view)


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    cfg = {**DEFAULTS, **cfg}
    if cfg.get("attention_bias"):
        raise BadInput("config.json sets attention_bias = true: biases on every attention projection, which "
                       "gemma3 does not implement here", "convert a supported architecture", stage="inspect")
    kinds = layer_kinds(cfg)
    cfg["layer_types"] = kinds  # the base reads each layer's window from them
    (theta, scaling), (local_theta, local_scaling) = rope_of(cfg, "full_attention"), rope_of(cfg, "sliding_attention")
    return ModelArgs.from_config(
        cfg, hidden_act=cfg["hidden_activation"], rope_theta=theta, rope_scaling=scaling,
        query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
        local_rope_layers=tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention"),
        local_rope_theta=local_theta, local_rope_scaling=local_scaling)


class Layer(DecoderLayer):
    """Norms on both sides of attention and of the MLP."""

    def __init__(self, args: ModelArgs, layer_idx: int, attention):
        super().__init__(args, layer_idx, attention)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h, cos, sin, mask, current_pos, kv):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask, current_pos,
                                                             kv))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Model(AneLM):
    attention = QKNormAttention
    decoder_layer = Layer

    def fold(self, name: str, weight: torch.Tensor) -> None:
        a = self.args
        if name == "model.embed_tokens.weight":
            weight.mul_(math.sqrt(a.hidden_size) * a.residual_scale)
        elif name.endswith("norm.weight"):
            weight.add_(1.0).mul_(a.residual_scale if name.endswith(RESIDUAL_NORMS) else 1.0)
