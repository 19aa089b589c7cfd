"""ANE-shaped torch models, one short file per architecture."""
from __future__ import annotations

from anemlld.convert.models import gemma3, llama, mistral, phi3, qwen2, qwen3
from anemlld.convert.models.base import AneLM, ModelArgs

ARCHITECTURES = {"gemma3": gemma3, "llama": llama, "mistral": mistral, "phi3": phi3, "qwen2": qwen2, "qwen3": qwen3}

# model_type (config.json) -> our architecture name
MODEL_TYPES = {"gemma3_text": "gemma3", "gemma3": "gemma3", "llama": "llama", "mistral": "mistral",
               "ministral": "mistral", "phi3": "phi3", "qwen2": "qwen2", "qwen3": "qwen3"}

# model_type of a multimodal checkpoint whose text model we convert -> where
# that text model's weights are (their name prefix -> the text model's own)
TEXT_PARTS = {"gemma3": {"language_model.model.": "model.", "model.language_model.": "model.",
                         "language_model.lm_head.": "lm_head.", "lm_head.": "lm_head."}}

# model_type -> its transformers config class's defaults, for the keys a config.json leaves out
CONFIG_DEFAULTS = {"gemma3_text": gemma3.DEFAULTS}

DEFAULT_LM_HEAD_SPLIT = {"gemma3": 16, "llama": 8, "mistral": 16, "phi3": 16, "qwen2": 16, "qwen3": 16}


def build(arch: str, args: ModelArgs, **kw) -> AneLM:
    return ARCHITECTURES[arch].Model(args, **kw)


__all__ = ["AneLM", "ModelArgs", "ARCHITECTURES", "MODEL_TYPES", "TEXT_PARTS", "CONFIG_DEFAULTS",
           "DEFAULT_LM_HEAD_SPLIT", "build"]
