"""kernels_bench helpers: timing statistics, peak memory, isolated runs, result files (fast, CPU)."""

import json
import math

import pytest
import torch

from kernels_bench import isolate, memory, report, timing


def test_timing_statistics_and_call_counts():
    t = timing.Timing([3.0, 1.0, 2.0, 10.0])
    assert t.median == 2.5 and t.min == 1.0 and t.max == 10.0
    assert t.spread == pytest.approx(9.0 / 2.5)
    assert t.iqr == pytest.approx(4.75 - 1.75) and timing.Timing([7.0]).iqr == 0.0  # quartiles interpolated
    calls = []
    result = timing.time_fn(lambda: calls.append(1), warmup=2, iters=3, repeats=4)
    assert len(calls) == 2 + 3 * 4 and len(result.samples) == 4
    assert set(result.as_dict()) >= {"median_s", "min_s", "max_s", "spread", "n", "samples_s"}


def test_time_fn_max_seconds_stops_early():
    import time

    calls = []
    result = timing.time_fn(lambda: (calls.append(1), time.sleep(0.02)), warmup=0, iters=1, repeats=50,
                            max_seconds=0.05)
    assert 1 <= len(result.samples) < 50


def test_profiler_peak_sees_a_temporary_allocation():
    n = 4 * 1024 * 1024  # 16 MiB of fp32

    def work():
        x = torch.ones(n)
        y = x * 2  # two live tensors at the peak
        return float(y[0])

    peak = memory.torch_allocated_peak_bytes(work)
    assert 2 * 4 * n <= peak < 4 * 4 * n


def test_rss_peak_delta_counts_touched_memory():
    result = memory.rss_peak_delta_bytes(lambda: torch.ones(32 * 1024 * 1024).sum())  # 128 MiB, touched
    assert result["rss_peak_delta_bytes"] >= 100 * 2**20 or not result["exact"]
    assert memory.current_rss_bytes() > 0 and memory.peak_rss_bytes() >= memory.current_rss_bytes() // 2


def test_rss_sampler_records_a_baseline_and_peak():
    with memory.RssSampler(interval=0.001) as s:
        x = torch.ones(16 * 1024 * 1024)
        x += 1
    assert s.peak >= s.baseline > 0


def test_isolated_run_returns_result_and_its_own_peak_rss():
    result = isolate.run_isolated("kernels_bench.report:environment", {"device": "cpu"}, timeout=120)
    assert result["device"] == "cpu" and result["peak_rss_bytes"] > 0 and result["process_wall_s"] > 0
    with pytest.raises(isolate.IsolatedRunError):
        isolate.run_isolated("kernels_bench.report:no_such_function", {}, timeout=120)


def test_save_result_is_json_safe(tmp_path):
    path = report.save_result(tmp_path, "x", "tiny", "cpu", {"dtype": torch.float32},
                              [{"a": float("nan"), "b": torch.tensor([1.5]), "c": math.inf}], wall_s=1.0)
    doc = json.loads(path.read_text())
    assert doc["rows"] == [{"a": None, "b": [1.5], "c": None}] and doc["config"]["dtype"] == "torch.float32"
    assert doc["environment"]["versions"]["torch"]
    assert report.fmt_bytes(3 * 2**20) == "3.0 MiB" and report.fmt_seconds(0.0025) == "2.50 ms"


def test_results_name_paths_from_the_checkout_not_this_machine():
    """Committed results files must not hold this machine's absolute paths (a result's command lines name the
    venv, the run folders and ../shared's data)."""
    from kernels_bench.common import REPO_ROOT, machine_independent, repo_relative

    shared = REPO_ROOT.parent / "shared" / "data"
    assert repo_relative(REPO_ROOT / "runs" / "x") == "runs/x"
    assert repo_relative(shared / "stories260k") == "../shared/data/stories260k"
    text = machine_independent(json.dumps({"command": f"{REPO_ROOT}/.venv/bin/python -m phi3local train "
                                                      f"{REPO_ROOT}/runs/r.yaml {shared}/x.jsonl"}))
    assert json.loads(text)["command"] == "./.venv/bin/python -m phi3local train ./runs/r.yaml ../shared/data/x.jsonl"
