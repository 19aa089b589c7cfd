"""anemlld: converts Hugging Face models for the Apple Neural Engine and serves them."""

__version__ = "0.1.0"
