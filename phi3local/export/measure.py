"""How fast an export loads and answers on this machine: `measurements.json`, the input of `azure spec`.

The Azure deployment's request timeout and probe delays are derived from these figures (see
phi3local/azure/spec.py), so they are measured on the exported files themselves, with the same
onnxruntime-genai loading and generation loop the server uses.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

MEASUREMENTS_FILE = "measurements.json"
PROMPT = [{"role": "user", "content": "Tell me a short story about a cat who finds a key."}]


def measure_serving(onnx_dir: Path, new_tokens: int = 32, execution_provider: str | None = None) -> dict:
    """Load time, time to first token and decode ms per token (a second, warm run; stop tokens ignored)."""
    from phi3local.serve.chat import OnnxChatModel

    t0 = time.perf_counter()
    model = OnnxChatModel(Path(onnx_dir))
    load_seconds = time.perf_counter() - t0
    model.stop_ids = set()  # decode a fixed number of tokens: the figure must not depend on when it stops
    ids = np.asarray(model.tokenizer.encode(model.render(PROMPT)), dtype=np.int32)
    new_tokens = max(2, min(new_tokens, model.context_length - len(ids) - 1))
    for _ in range(2):  # the first run warms up allocations and kernels
        start = time.perf_counter()
        first = None
        count = 0
        for _token, _piece in model.iter_tokens(ids, new_tokens):
            count += 1
            if first is None:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
    return {
        "load_seconds": round(load_seconds, 4),
        "first_token_ms": round(1000 * first, 3),
        "per_token_ms": round(1000 * (total - first) / max(count - 1, 1), 3),
        "tokens": count,
        "prompt_tokens": int(len(ids)),
        "measured_on": f"{platform.machine()} {platform.processor() or platform.system()}, "
                       f"onnxruntime-genai {execution_provider or 'default'} provider, this machine",
    }
