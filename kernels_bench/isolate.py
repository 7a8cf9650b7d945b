"""Run one benchmark function in a fresh Python process, so its peak RSS is its own.

    result = run_isolated("kernels_bench.cross_entropy:measure_memory", {"contender": "chunked", ...})

The child imports `module`, calls `function(**kwargs)` (which returns a JSON-able dict), adds its own
`peak_rss_bytes` (ru_maxrss at exit) and prints the result on one marked line of stdout. The child's
stderr goes straight through (progress stays visible); its other stdout is kept and shown on failure.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

from kernels_bench.common import REPO_ROOT
from phi3local.errors import Phi3LocalError

MARKER = "@@PHI3LOCAL_BENCH_RESULT@@ "


class IsolatedRunError(Phi3LocalError, RuntimeError):
    pass


def run_isolated(target: str, kwargs: dict, timeout: float = 1800.0, env: dict | None = None,
                 echo: bool = False) -> dict:
    cmd = [sys.executable, "-m", "kernels_bench.isolate", target, json.dumps(kwargs)]
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env, stdout=subprocess.PIPE, stderr=None, text=True,
                          timeout=timeout)
    lines = proc.stdout.splitlines()
    results = [ln[len(MARKER):] for ln in lines if ln.startswith(MARKER)]
    other = "\n".join(ln for ln in lines if not ln.startswith(MARKER))
    if echo and other:
        print(other)
    if proc.returncode != 0 or not results:
        raise IsolatedRunError(f"{target} failed (exit {proc.returncode}); its output ended with:\n{other[-4000:]}")
    result = json.loads(results[-1])
    result["process_wall_s"] = time.perf_counter() - started
    return result


def main(argv: list[str]) -> int:
    from kernels_bench.memory import current_rss_bytes, peak_rss_bytes

    target, raw = argv[0], argv[1] if len(argv) > 1 else "{}"
    module_name, func_name = target.split(":")
    rss_at_start = current_rss_bytes()
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(**json.loads(raw))
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
    result.setdefault("rss_at_start_bytes", rss_at_start)
    sys.stdout.flush()
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
