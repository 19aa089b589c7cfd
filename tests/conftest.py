"""Fixtures that build tiny random Hugging Face models of every supported
architecture on the fly, with the demo model's offline tokenizer."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "examples" / "pico-llama"
SHARED_MODELS = REPO.parent / "shared" / "models"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

# Small enough to convert in seconds, shaped to exercise each architecture's
# particulars: llama3 rope scaling and an odd layer count (uneven chunks),
# Qwen2's q/k/v biases and tied embeddings, Qwen3's q/k norms and a head_dim
# that is not hidden/heads, Mistral's sliding window (4: shorter than the test
# sequences, so the window matters at every step past the fourth), Phi-3's
# fused q/k/v and gate/up, partial rotary and longrope short factors; Gemma 3's
# four norms, q/k norms, query_pre_attn_scalar, scaled embeddings, local and
# global layers with a rope base each (linear scaling on the global ones).
TINY = {
    "llama": dict(
        cls="LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
    "qwen2": dict(
        cls="Qwen2Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "mistral": dict(
        cls="MistralConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "phi3": dict(
        cls="Phi3Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, partial_rotary_factor=0.75,
        original_max_position_embeddings=256,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                         "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0], "original_max_position_embeddings": 256}),
    "gemma3": dict(
        cls="Gemma3TextConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        tie_word_embeddings=False, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}),
    "qwen3": dict(
        cls="Qwen3Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}
ARCHS = tuple(TINY)


def make_tiny_model(arch: str, dest: Path, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """Save a random ``arch`` model with the demo tokenizer into ``dest``."""
    import torch
    import transformers

    spec = dict(TINY[arch])
    spec.update(overrides)
    cfg_cls = getattr(transformers, spec.pop("cls"))
    cfg = cfg_cls(vocab_size=4096, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=0,
                  eos_token_id=[4, 1], pad_token_id=5, initializer_range=0.1, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Norm weights start at one (Gemma's at zero: it scales by 1 + weight);
    # randomize them so a wrong norm cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if arch == "gemma3" else p.uniform_(0.5, 1.5)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(dest, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_MODEL / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: make_tiny_model(arch, root / f"tiny-{arch}") for arch in ARCHS}


@pytest.fixture
def tiny_copy(tiny_models, tmp_path):
    """A private copy of a tiny model, for tests that damage it."""
    def copy(arch: str = "llama") -> Path:
        dest = tmp_path / f"src-{arch}"
        shutil.copytree(tiny_models[arch], dest)
        return dest
    return copy
