"""Models: resolving --model, and one-line errors with exit code 2."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from homering.errors import ModelError
from homering.models.gguf_info import inspect_gguf
from homering.models.registry import KNOWN_MODELS, resolve_model


def homering(*args, **kw):
    return subprocess.run([sys.executable, "-m", "homering", *args], capture_output=True, text=True, timeout=120, **kw)


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("homering: error:")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0]


def test_pulled_models_have_the_registry_digest(smollm2, gemma):
    for name, path in (("smollm2", smollm2), ("gemma3-270m", gemma)):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        assert h.hexdigest() == KNOWN_MODELS[name].sha256


def test_inspect_real_models(smollm2, gemma):
    s, g = inspect_gguf(smollm2), inspect_gguf(gemma)
    assert (s.arch, s.n_layers, s.n_embd) == ("llama", 30, 576)
    assert (g.arch, g.n_layers, g.n_embd) == ("gemma3", 18, 640)
    assert len(s.layer_bytes) == 30 and all(b > 0 for b in s.layer_bytes)


def test_model_by_path_and_by_name(smollm2):
    assert resolve_model("smollm2") == smollm2
    assert resolve_model(str(smollm2)) == smollm2.resolve()


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("llama-9000")
    assert_clean_error(homering("models", "pull", "llama-9000"), "unknown model", "smollm2")
    assert_clean_error(homering("up", "--model", "llama-9000", "--prompt", "hi"), "unknown model")


def test_missing_file(tmp_path):
    assert_clean_error(homering("up", "--model", str(tmp_path / "nope.gguf"), "--prompt", "hi"), "not found")


def test_truncated_and_corrupt_files(tmp_path, smollm2):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2.read_bytes()[: 3 << 20])
    assert_clean_error(homering("controller", "--model", str(truncated)), "truncated")
    header_cut = tmp_path / "header-cut.gguf"
    header_cut.write_bytes(smollm2.read_bytes()[:5000])
    assert_clean_error(homering("controller", "--model", str(header_cut)), "GGUF")
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    assert_clean_error(homering("controller", "--model", str(foreign)), "not a GGUF")


def test_cli_misuse_is_one_line():
    assert_clean_error(homering("up", "--agents", "0"), "--agents")
    assert_clean_error(homering("up", "--json"), "--prompt")
    assert_clean_error(homering("agent", "--broker", "http://x"), "broker URL")


def test_models_list_shows_known_models():
    proc = homering("models", "list")
    assert proc.returncode == 0
    assert "smollm2" in proc.stdout and "gemma3-270m" in proc.stdout


def test_models_list_is_readable_at_80_columns(tmp_path):
    """At 80 columns nothing is cut with an ellipsis: every name, file name and the models' folder appear
    whole on one line, every word of every description appears, and "(default)" appears once."""
    import os

    from homering.models.registry import SYNTHETIC_MODELS

    home = tmp_path / "a-rather-long-home-folder-name-for-the-models-of-this-test" / "homering"
    proc = homering("models", "list", env={**os.environ, "COLUMNS": "80", "HOMERING_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    assert "…" not in out and "..." not in out
    assert all(len(line) <= 80 for line in lines if str(home) not in line), out
    assert out.count("(default)") == 1 and "smollm2 (default)" in out, out
    assert any(str(home / "models") in line for line in lines), out  # the folder, whole (wrapped by the terminal)
    words = out.split()
    for m in [*KNOWN_MODELS.values(), *SYNTHETIC_MODELS.values()]:
        assert any(m.name in line.split() for line in lines), m.name
        assert m.filename in words, m.filename
        for word in m.description.split():
            assert word in words, (m.name, word)
