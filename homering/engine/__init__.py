"""The window engine: llama.cpp contexts restricted to a layer window."""

from homering.engine.window import LayerWindow, WindowOutput

__all__ = ["LayerWindow", "WindowOutput"]
