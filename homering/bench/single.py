"""The baseline of ``homering bench cluster``: plain llama-cpp-python on one device, the whole model.

Run as ``python -m homering.bench.single --model M --prompt-file F --tokens N``
inside the device's namespace and cgroup (the benchmark does that through the
testbed). Prints one JSON object: ``ttft_ms`` (prompt processing plus the first
token), ``ms_per_token`` (median-free mean of the greedy decode steps after the
first token) and ``n_prompt``.

The model is memory-mapped as llama.cpp does by default; when it does not fit
in the device's RAM limit, the kernel evicts and re-reads its pages every token,
which is what the paper's llama.cpp baseline suffers (PRIMA.CPP §1: 10,120
ms/token for Llama 3-70B on its largest device).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def run(
    model: str, prompt_ids: list[int], n_tokens: int, *, threads: int = 1, n_ctx: int = 512, n_batch: int = 512
) -> dict:
    """Time one prompt and ``n_tokens`` greedy decode steps with ``llama_cpp.Llama``.

    Args:
        model: GGUF path.
        prompt_ids: the prompt's token ids (BOS included when wanted).
        n_tokens: tokens to generate (≥ 2: the first one ends the TTFT).
        threads: llama.cpp threads; n_ctx: context; n_batch: prompt batch (one batch by default,
            as llama.cpp does for a prompt shorter than 512 tokens).

    Returns:
        ``{"ttft_ms", "ms_per_token", "n_prompt", "tokens"}``.
    """
    import llama_cpp

    from homering.engine.window import plain_llama

    llm = plain_llama(
        model,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        use_mmap=True,
        use_mlock=False,
        verbose=False,
    )
    try:
        n_vocab = llm.n_vocab()

        def greedy() -> int:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            return int(np.argmax(logits))

        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        tok = greedy()
        t_first = time.perf_counter()
        tokens = [tok]
        for _ in range(n_tokens - 1):
            llm.eval([tok])
            tok = greedy()
            tokens.append(tok)
        t_end = time.perf_counter()
    finally:
        llm.close()
    return {
        "ttft_ms": (t_first - t0) * 1000,
        "ms_per_token": (t_end - t_first) * 1000 / max(1, n_tokens - 1),
        "n_prompt": len(prompt_ids),
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m homering.bench.single``): print :func:`run`'s result as one JSON line."""
    ap = argparse.ArgumentParser(prog="python -m homering.bench.single", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-file", required=True, help="JSON list of prompt token ids")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args(argv)
    with open(args.prompt_file) as f:
        prompt = json.load(f)
    result = run(args.model, prompt, max(2, args.tokens), threads=args.threads, n_ctx=args.ctx)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
