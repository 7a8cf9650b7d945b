"""The benchmarks run and write what they promise: one kernel benchmark at the tiny size (a few seconds)."""

import json
from pathlib import Path

import torch

from kernels_bench import run_all
from kernels_bench.common import Ctx, make_console
from kernels_bench.report import ISA_FLAGS


def check_result_file(path: Path, name: str) -> dict:
    doc = json.loads(path.read_text())
    assert doc["name"] == name and doc["size"] == "tiny"
    env = doc["environment"]
    assert env["device"] == "cpu" and env["device_name"]
    assert env["machine"]["cpu_count"] >= 1 and "loadavg" in env
    isa = env["machine"]["cpu_isa"]  # hosts named alike differ in these: results say which they ran on
    assert isa["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    reported = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    assert isa["flags"] == [f for f in ISA_FLAGS if f in reported]
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        assert env["versions"][package], package
    assert doc["config"] and doc["rows"] and doc["created"] and doc["wall_s"] > 0
    return doc


def test_norm_rope_tiny_writes_json_with_timings(tmp_path):
    from kernels_bench import norm_rope

    ctx = Ctx(size="tiny", device=torch.device("cpu"), out_dir=tmp_path, console=make_console())
    norm_rope.run(ctx)
    doc = check_result_file(tmp_path / "norm_rope_tiny.json", "norm_rope_tiny")
    rms = [r for r in doc["rows"] if r["op"] == "rmsnorm"]
    assert {r["impl"] for r in rms} == {"Phi3RMSNorm (model)", "F.rms_norm (torch fused)"}
    for row in doc["rows"]:
        assert row["fwd"]["median_s"] > 0 and row["fwd"]["n"] >= 1
        assert row["fwd"]["min_s"] <= row["fwd"]["median_s"] <= row["fwd"]["max_s"]
    assert all(r["max_abs_diff"] < 1e-4 for r in rms)  # the fused reference computes the same thing
    assert (tmp_path / "norm_rope_tiny.png").is_file()


def test_run_all_cli_runs_a_selected_benchmark(tmp_path, capsys):
    code = run_all.main(["--size", "tiny", "--device", "cpu", "--bench", "matmul_peak", "--out", str(tmp_path)])
    assert code == 0
    doc = check_result_file(tmp_path / "matmul_peak_tiny.json", "matmul_peak_tiny")
    assert doc["summary"]["mfu_denominator_flops"] > 1e8  # any CPU does more than 0.1 GFLOP/s
    assert "matmul_peak" in capsys.readouterr().out


def test_full_size_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        return
    assert run_all.main(["--size", "full", "--bench", "attention", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_dpo_e2e_tiny_runs_both_contenders_from_ln2(tmp_path):
    """phi3local's DPO and TRL's DPOTrainer on the same tiny 4-bit model and pairs, each in its own process: both start
    at ln 2 with margin 0, and the result has the pairs/s and peak-memory ratio the README's row comes from."""
    from kernels_bench import dpo_e2e

    ctx = Ctx(size="tiny", device=torch.device("cpu"), out_dir=tmp_path, console=make_console())
    dpo_e2e.run(ctx)
    doc = check_result_file(tmp_path / "dpo_e2e_tiny.json", "dpo_e2e_tiny")
    assert [r["contender"] for r in doc["rows"]] == ["phi3local", "trl"]
    for row in doc["rows"]:
        assert row["pairs_per_s"] > 0 and row["peak_memory_bytes"] > 0 and row["pairs_per_step"] >= 1
    assert all(check["ok"] for check in doc["summary"]["checks"].values()), doc["summary"]["checks"]
    ratio = doc["summary"]["ratios"]["phi3local / trl"]
    assert ratio["pairs_per_s"] > 0 and ratio["peak_memory"] > 0
    assert doc["config"]["data"]["train_pairs"] >= 4 and (tmp_path / "dpo_e2e_tiny.png").is_file()


def test_train_e2e_tiny_reports_like_for_like_defaults_and_tuned_rows(tmp_path):
    """Four contenders at the tiny size: phi3local and TRL as users start them, and both packed with checkpointing
    on and fp32 adapters. Every row says its settings; the comparisons come in the three kinds the README reports."""
    from kernels_bench import train_e2e

    contenders = ["phi3local", "trl", "phi3local_packed_gc", "trl_packed_fp32_gc"]
    assert train_e2e.settings("tiny")["contenders"] == contenders
    ctx = Ctx(size="tiny", device=torch.device("cpu"), out_dir=tmp_path, console=make_console())
    train_e2e.run(ctx)
    doc = check_result_file(tmp_path / "train_e2e_tiny.json", "train_e2e_tiny")
    rows = {r["contender"]: r for r in doc["rows"]}
    assert list(rows) == contenders
    assert (rows["trl"]["packing"], rows["trl"]["gradient_checkpointing"]) == (False, True)  # SFTConfig's defaults
    assert rows["trl"]["lora_dtype"] == "torch.bfloat16" and rows["trl_packed_fp32_gc"]["lora_dtype"] == "torch.float32"
    assert (rows["phi3local_packed_gc"]["packing"], rows["phi3local_packed_gc"]["gradient_checkpointing"]) == (True, True)
    assert isinstance(rows["phi3local"]["gradient_checkpointing"], bool)  # auto resolved to what it chose
    compared = doc["summary"]["comparisons"]
    kinds = {(c["kind"], c["ours"], c["peer"]) for c in compared}
    assert ("like for like", "phi3local_packed_gc", "trl_packed_fp32_gc") in kinds
    assert ("defaults", "phi3local", "trl") in kinds
    tuned = doc["summary"]["tuned"]
    assert tuned["trl"] == max(["trl", "trl_packed_fp32_gc"], key=lambda n: rows[n]["trained_tokens_per_s"])
    assert ("tuned", tuned["phi3local_gc"], tuned["trl"]) in kinds
    for c in compared:
        ours, peer = rows[c["ours"]], rows[c["peer"]]
        assert c["trained_tokens_per_s"] == ours["trained_tokens_per_s"] / peer["trained_tokens_per_s"]
        assert c["peak_memory"] == ours["peak_memory_bytes"] / peer["peak_memory_bytes"]
    checks = doc["summary"]["checks"]
    assert checks["same_start"]["ok"], checks  # every contender starts from the same validation loss
    assert checks["val_loss phi3local_packed_gc vs trl_packed_fp32_gc"]["ok"], checks
    assert checks["phi3local evaluate() vs plain forward"]["ok"], checks


def test_batch_ceiling_reports_the_bound_batching_could_reach(tmp_path):
    from kernels_bench import batch_ceiling

    assert batch_ceiling.main(["--shapes", "64x1x128", "--precisions", "int4,int4:0,fp32", "--new-tokens", "6",
                               "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "batch_ceiling.json").read_text())
    assert [r["precision"] for r in doc["rows"]] == ["int4", "int4:0", "fp32"]
    assert {r["model"] for r in doc["rows"]} == {"h64 L1 i128"}
    for row in doc["rows"]:
        assert row["step_1_s"] > 0 and row["step_8_s"] > 0
        assert abs(row["ceiling"] - 8 * row["step_1_s"] / row["step_8_s"]) < 1e-9
    assert set(doc["summary"]["ceiling"]) == {"h64 L1 i128 int4", "h64 L1 i128 int4:0", "h64 L1 i128 fp32"}
