"""Benchmarks (``homering bench …``): print numbers and write JSON."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console


def write_json(results: dict, out: str | Path, console: Console | None = None) -> Path:
    """Write ``results`` as indented JSON to ``out`` (creating its folder) and say so on stderr."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    (console or Console(stderr=True)).print(f"wrote {out}")
    return out
