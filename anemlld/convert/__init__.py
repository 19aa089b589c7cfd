"""Hugging Face folder -> ANE parts: source reading, ANE-shaped models, export,
LUT quantization, combining, compiling, meta.yaml."""

import os as _os

# coremltools draws a tqdm bar for every pass; the converter's own progress
# reporting replaces them. tqdm reads this when first imported.
_os.environ.setdefault("TQDM_DISABLE", "1")
