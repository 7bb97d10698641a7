"""Secrets (an MQTT password, the API key) come from files or the environment, never from argv."""

from __future__ import annotations

import os
from pathlib import Path

from homering.errors import HomeringError

ENV_API_KEY = "HOMERING_API_KEY"
ENV_API_KEY_FILE = "HOMERING_API_KEY_FILE"


def read_secret(path: str | os.PathLike, what: str) -> str:
    """The first line of the file at ``path`` (e.g. a Docker secret), without its line ending.

    Raises:
        HomeringError: the file cannot be read, or its first line is empty.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise HomeringError(f"cannot read the {what} file {path}: {reason}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise HomeringError(f"the {what} file {path} is empty")
    return lines[0].strip()


def api_key(path: str | os.PathLike | None = None, *, environ: dict[str, str] | None = None) -> str | None:
    """The API key: the first line of ``path`` (or of ``$HOMERING_API_KEY_FILE``), else ``$HOMERING_API_KEY``;
    None when none is set (the API is open).

    Raises:
        HomeringError: the key file cannot be read or is empty.
    """
    env = os.environ if environ is None else environ
    path = path or env.get(ENV_API_KEY_FILE) or None
    if path is not None:
        return read_secret(path, "API key")
    return env.get(ENV_API_KEY) or None
