"""Where homering keeps its files: ``$HOMERING_HOME`` or the user's cache dir."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """The root folder for models and sliced windows.

    ``$HOMERING_HOME`` when set, otherwise the platform's user cache dir
    (``~/.cache/homering`` on Linux). Created on first use.
    """
    root = os.environ.get("HOMERING_HOME") or platformdirs.user_cache_dir("homering")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Folder of pulled model files (``<home>/models``)."""
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def windows_dir() -> Path:
    """Folder of sliced layer-window files (``<home>/windows``)."""
    path = home() / "windows"
    path.mkdir(parents=True, exist_ok=True)
    return path
