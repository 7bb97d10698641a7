"""An F16 copy of a quantized GGUF model, with the ``gguf`` package: a bigger target for a draft.

There is no second size of SmolLM2 offline. Its weights dequantized to F16 make a target that the Q4_1
original (the draft) agrees with almost always, while it costs more to run: a real draft/target pair for
speculative decoding (:mod:`homering.engine.drafting`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from homering import paths
from homering.errors import ModelError


def f16_path(src: Path) -> Path:
    """Where the F16 copy of ``src`` is cached: ``<models dir>/<stem>.F16.gguf``."""
    return paths.models_dir() / f"{src.stem}.F16.gguf"


def dequantize_to_f16(src: Path, dst: Path | None = None, *, force: bool = False) -> Path:
    """Write ``src`` with every quantized tensor dequantized to F16 (F32 tensors stay F32); the same
    metadata and tokenizer. Written to a temporary file and renamed, so a cached copy is always whole.

    Args:
        src: a GGUF model.
        dst: the output [default: :func:`f16_path`]; kept when it exists (unless ``force``).

    Returns:
        the F16 file.

    Raises:
        ModelError: ``src`` is not a GGUF file gguf can read.
    """
    import gguf

    dst = dst or f16_path(src)
    if dst.is_file() and not force:
        return dst
    try:
        reader = gguf.GGUFReader(str(src))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {src}: {exc}") from None
    arch = str(reader.fields["general.architecture"].contents())
    tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = np.array(t.data)
        else:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float16)
        writer.add_tensor(t.name, data)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
