"""Hugging Face folder -> ANE parts: source reading, ANE-shaped models, export,
LUT quantization, combining, compiling, meta.yaml."""
