"""Models: the registry of known models, GGUF inspection, and layer-window slicing."""

from homering.models.gguf_info import ModelInfo, inspect_gguf
from homering.models.registry import DEFAULT_MODEL, KNOWN_MODELS, resolve_model

__all__ = ["ModelInfo", "inspect_gguf", "KNOWN_MODELS", "DEFAULT_MODEL", "resolve_model"]
