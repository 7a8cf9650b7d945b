"""The real-size bench's stages (kernels_bench.real_size) on the tiny model: every stage runs through the CLI as at
3.8B and its figures are parsed, so `make bench-real-size` does not first fail an hour into a run."""

from __future__ import annotations

import pytest

from kernels_bench import real_size
from phi3local.model.load import resolve_model_path


@pytest.fixture
def tiny_bench(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI3LOCAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tiny = real_size.Path(resolve_model_path("tiny"))
    settings = {**real_size.SETTINGS, "steps": 3, "eval_batches": 1}
    return real_size.Bench("tiny", tmp_path / "bench", settings, model=tiny, tokenizer_folder=tiny)


def test_every_stage_runs_and_reports_its_figures(tiny_bench):
    recipe = real_size.write_recipe(tiny_bench)
    plan = real_size.stage_plan(tiny_bench, recipe)
    assert plan["exit"] == 0 and plan["planned_peak_bytes"] > 0
    train = real_size.stage_train(tiny_bench, recipe)
    assert train["exit"] == 0, train["output_tail"]
    assert len(train["step_seconds"]) == 3 and all(n > 0 for n in train["step_trained_tokens"])
    assert train["trained_tokens_per_s"] > 0 and 0 < train["load_s"] < train["wall_s"]
    assert train["peak_anon_bytes"] > 0 and train["peak_rss_bytes"] >= train["peak_anon_bytes"]
    trl = real_size.stage_trl(tiny_bench)
    assert len(trl["step_seconds"]) == 3 and trl["trained_tokens_per_s"] > 0 and trl["peak_anon_bytes"] > 0
    summary = real_size.summarise({"plan": plan, "train": train, "trl": trl})
    assert summary["tokens_per_s_ratio_vs_trl"] > 0 and summary["peak_anon_ratio_vs_trl"] > 0
    merge = real_size.stage_merge(tiny_bench)
    assert merge["exit"] == 0 and merge["size_bytes"] > 0, merge["output_tail"]
    export = real_size.stage_export(tiny_bench)
    assert export["exit"] == 0 and export["report"]["precision"] == "int4", export["output_tail"]
    chat = real_size.stage_chat(tiny_bench)
    assert chat["chat"]["exit"] == 0 and chat["chat"]["output_tail"].strip(), chat["chat"]["output_tail"]
    assert chat["serve"]["status"] == 200 and chat["serve"]["answer"], chat["serve"]


def test_a_commands_peak_rss_is_its_own_not_the_drivers_past_peak(tmp_path):
    """Linux gives a forked child its parent's peak RSS and wait4 reports it: after the driver built a 3.8B model,
    `plan` (~250 MB) read 8.3 GB. A 1 GB peak in this process before the command must not show in its figure."""
    import sys
    from pathlib import Path

    def rss() -> int:
        return next(int(x.split()[1]) * 1024 for x in Path("/proc/self/status").read_text().splitlines()
                    if x.startswith("VmRSS"))

    peak = bytearray(1 << 30)
    peak[:: 4096] = b"x" * len(peak[:: 4096])  # touched, so resident
    del peak
    figure = real_size.run_command([sys.executable, "-c", "print(1)"], tmp_path / "log.txt")["peak_rss_bytes"]
    assert figure < rss() + (256 << 20), (figure, rss())


def test_gpu_check_dry_run_builds_every_command_within_its_budget_and_names_the_wheels(tmp_path):
    """`make gpu-check-dry`: what the lent-GPU check would run, without a GPU: each stage's CLI command, the
    estimated wall time within the 8-minute budget, and the wheels to carry in the order they matter."""
    import re
    import subprocess
    import sys

    from kernels_bench import gpu_check
    from kernels_bench.common import REPO_ROOT

    done = subprocess.run([sys.executable, "-m", "kernels_bench.gpu_check", "--dry-run"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for verb in ("plan", "train", "merge", "export"):
        assert re.search(rf"-m phi3local {verb} /\S+", out), verb
    assert "--precision int4 --target cuda" in out and "--device cuda --device-memory 79GB" in out
    expected = int(re.search(r"expected wall time: (\d+) s of 480", out).group(1))
    assert 0 < expected <= gpu_check.BUDGET_S
    assert sum(gpu_check.ESTIMATE_S[s] for s in gpu_check.stage_order(["sdpa"], unsloth=False)[:5]) <= expected
    assert out.index("bitsandbytes==") < out.index("trl==") < out.index("pyarrow==")
    assert "make gpu-wheels" in out
