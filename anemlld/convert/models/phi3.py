"""Phi-3 and Phi-4-mini: the Llama model with q/k/v and gate/up stored fused in
the checkpoint (``qkv_proj``, ``gate_up_proj``: split into separate
projections as they load, the layout the other architectures export),
rotary embeddings on part of each head (``partial_rotary_factor``, 0.75 in
Phi-4-mini) and longrope's short factors with their cos/sin scaling (the
context must stay within ``original_max_position_embeddings``); both are in
the shared base, as is Phi-3-mini's sliding window (every layer's)."""
from __future__ import annotations

from anemlld.convert.models import llama
from anemlld.convert.models.llama import model_args

PREFIX = "phi3"
SLIDING_WINDOW = True


class Model(llama.Model):
    fused = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


__all__ = ["Model", "model_args", "PREFIX", "SLIDING_WINDOW"]
