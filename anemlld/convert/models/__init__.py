"""ANE-shaped torch models, one short file per architecture."""
from __future__ import annotations

from anemlld.convert.models import llama, mistral, phi3, qwen2, qwen3
from anemlld.convert.models.base import AneLM, ModelArgs

ARCHITECTURES = {"llama": llama, "mistral": mistral, "phi3": phi3, "qwen2": qwen2, "qwen3": qwen3}

# model_type (config.json) -> our architecture name
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "ministral": "mistral", "phi3": "phi3", "qwen2": "qwen2",
               "qwen3": "qwen3"}

DEFAULT_LM_HEAD_SPLIT = {"llama": 8, "mistral": 16, "phi3": 16, "qwen2": 16, "qwen3": 16}


def build(arch: str, args: ModelArgs, **kw) -> AneLM:
    return ARCHITECTURES[arch].Model(args, **kw)


__all__ = ["AneLM", "ModelArgs", "ARCHITECTURES", "MODEL_TYPES", "DEFAULT_LM_HEAD_SPLIT", "build"]
