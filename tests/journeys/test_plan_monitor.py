"""Journeys of issue 23: a new user plans the tiny recipe and reads a serving log, on a 60-column terminal.

`phi3local plan` must not offer a longest sequence the model cannot take, and must say what its memory
figures count; `phi3local monitor` must give the latency of the answered requests, not of the fast 4xx.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny-cpu.yaml"
COLUMNS = 60  # the `user` fixture's terminal


def test_plan_of_the_tiny_recipe_caps_the_longest_sequence_at_the_model_positions(user):
    result = user.run("plan", TINY, "--device", "cpu").ok()
    lines = result.out.splitlines()
    too_wide = [line for line in lines if len(line) > COLUMNS]
    assert not too_wide, too_wide
    longest = next(line for line in lines if "longest sequence" in line)
    positions = next(line for line in lines if "model positions" in line and "limited by" not in line)
    assert re.search(r"\b512 at micro-batch \d+$", longest.strip()), longest
    assert positions.split()[-1] == "512", positions
    assert "limited by" in result.out and "262144" not in result.out
    text = " ".join(result.out.split())
    assert "peak (step's tensors)" in text and "process's peak RSS" in text

    data = json.loads(user.run("plan", TINY, "--device", "cpu", "--json").ok().out)
    (report,) = data
    assert report["longest_seq_len"] == report["model_positions"] == 512
    assert report["longest_limited_by"] == "model positions"


def write_log(path):
    """12 answers (200) of 800..1900 ms and 36 refusals (422) of 0.2 ms, over two minutes, as serve writes them."""
    with path.open("w") as f:
        for i in range(48):
            ok = i % 4 == 0
            record = {"correlation_id": f"r{i}", "time": "2025-01-01T00:00:00Z", "unix": 1_735_689_600.0 + 2.5 * i,
                      "latency_ms": 800.0 + 100 * (i // 4) if ok else 0.2, "status": 200 if ok else 422,
                      "stream": False, "prompt_tokens": 40 if ok else None, "completion_tokens": 12 if ok else None,
                      "finish_reason": "stop" if ok else None, "error": None if ok else "context_length_exceeded",
                      "messages": [{"role": "user", "content": "hi"}], "answer": "Hello." if ok else None}
            f.write(json.dumps(record) + "\n")
    return path


def test_monitor_percentiles_are_over_the_answered_requests(user):
    log = write_log(user.cwd / "requests.jsonl")
    data = json.loads(user.run("monitor", log, "--json").ok().out)
    overall = data["overall"]
    # The answers' nearest-rank percentiles: 12 values 800..1900 ms.
    assert overall["latency_ms"] == {"p50": 1300.0, "p90": 1800.0, "p99": 1900.0, "max": 1900.0}
    assert (overall["requests"], overall["answered"], overall["errors_4xx"], overall["error_rate"]) == (
        48, 12, 36, 0.75)
    assert overall["error_latency_ms"]["max"] == 0.2

    result = user.run("monitor", log).ok()
    lines = result.out.splitlines()
    too_wide = [line for line in lines if len(line) > COLUMNS and "plot:" not in line]  # a path may be longer
    assert not too_wide, too_wide
    all_row = next(line.split() for line in lines if line.split()[:1] == ["all"])
    assert all_row[1:4] == ["48", "75.0%", "1,300"], all_row
    assert "answered requests (2xx, no error) only" in " ".join(result.out.split())
    assert "36 4xx, 0 5xx" in result.out and (user.cwd / "requests.png").stat().st_size > 0
