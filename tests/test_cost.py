"""phi3local/cost.py: the arithmetic with real numbers, the price table and its override, and the run summary."""

from __future__ import annotations

import json

import pytest

from phi3local import cost
from phi3local.units import format_seconds


def test_run_cost_arithmetic():
    # 90 minutes on one device at $2.40/h = $3.60; 1.8M trained tokens -> $2.00 per million.
    c = cost.run_cost(5400.0, 1_800_000, 2.40)
    assert c["device_hours"] == pytest.approx(1.5)
    assert c["usd"] == pytest.approx(3.60)
    assert c["usd_per_million_trained_tokens"] == pytest.approx(2.00)
    two = cost.run_cost(1800.0, 500_000, 3.0, devices=2)  # 2 devices x 0.5 h = 1 device-hour
    assert (two["device_hours"], two["usd"], two["usd_per_million_trained_tokens"]) == pytest.approx((1.0, 3.0, 6.0))
    unpriced = cost.run_cost(60.0, 1000, 0.0)
    assert unpriced["usd"] is None and unpriced["usd_per_million_trained_tokens"] is None
    assert unpriced["device_hours"] == pytest.approx(1 / 60)


def test_summary_fields_on_cpu_say_energy_is_not_measured():
    fields = cost.run_summary_fields(7200.0, 4_000_000, 1.5, "cpu", 2e11, cost.EnergyMeter("cpu"))
    assert fields["usd"] == pytest.approx(3.0) and fields["usd_per_million_trained_tokens"] == pytest.approx(0.75)
    assert fields["energy_joules"] is None and "CUDA only" in fields["energy_note"]
    rows = dict(cost.summary_rows(fields))
    assert rows["cost"] == "$3.0000 at $1.5/device-hour" and rows["cost per 1M trained tokens"] == "$0.7500"
    assert "not priced" in dict(cost.summary_rows(cost.run_summary_fields(1, 1, 0, "cpu", 1)))["cost"]


def test_shipped_table_marks_every_price_a_placeholder_and_an_override_replaces_entries(tmp_path, monkeypatch):
    monkeypatch.delenv(cost.ENV_PRICES, raising=False)
    shipped = cost.load_price_table()
    a100 = shipped.instance("Standard_NC24ads_A100_v4")
    assert (a100.gpu, a100.gpus, a100.gpu_memory_gib) == ("A100", 1, 80) and a100.placeholder
    assert all(v.get("placeholder") for v in shipped.instances.values())
    assert shipped.gpu_peak_flops("A100") == 312e12
    mine = tmp_path / "prices.json"
    mine.write_text(json.dumps({"instances": {"Standard_NC24ads_A100_v4": {
        "gpu": "A100", "gpus": 1, "gpu_memory_gib": 80, "vcpus": 24, "memory_gib": 220, "usd_per_hour": 4.0}},
        "hosted_finetune": {"usd_per_1k_tokens": 0.003}}))
    monkeypatch.setenv(cost.ENV_PRICES, str(mine))
    table = cost.load_price_table()
    assert table.instance("Standard_NC24ads_A100_v4").usd_per_hour == 4.0
    assert not table.instance("Standard_NC24ads_A100_v4").placeholder
    assert table.instance("Standard_NC4as_T4_v3").placeholder  # the rest stays shipped
    assert table.hosted_usd_per_1k_tokens == 0.003
    est = cost.instance_estimate("Standard_NC24ads_A100_v4", 2, table)
    assert est.usd == pytest.approx(8.0)  # per hour; a month is 730 h
    assert "$8.00/hour, $5,840/month" in est.lines[1] and "placeholder" not in est.lines[1]
    assert "placeholder price" in cost.instance_estimate("Standard_NC4as_T4_v3", 1, table).lines[1]
    assert cost.instance_estimate("Standard_Nope", 1, table).usd is None


def test_bad_price_tables_name_the_file_and_key(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(cost.CostError, match="p.json: not valid JSON"):
        cost.load_price_table(bad)
    bad.write_text(json.dumps({"instances": {"X": {"gpus": 1, "usd_per_hour": "cheap"}}}))
    with pytest.raises(cost.CostError, match=r"instances.X.usd_per_hour: expected a number"):
        cost.load_price_table(bad).instance("X")
    with pytest.raises(cost.CostError, match="no such price table"):
        cost.load_price_table(tmp_path / "missing.json")


def test_training_job_estimate_scales_local_speed_by_peak():
    table = cost.load_price_table()
    table.instances["Standard_NC24ads_A100_v4"] = {**table.instances["Standard_NC24ads_A100_v4"], "usd_per_hour": 3.6}
    # 1,000 tokens/s on a 31.2 TFLOP/s device -> 10,000 tokens/s on an A100 (312): 36M tokens take 1 h = $3.60.
    est = cost.training_job_estimate(36_000_000, 1000.0, 31.2e12, "Standard_NC24ads_A100_v4", 1, table)
    assert est.usd == pytest.approx(3.6)
    assert "~10,000 tokens/s" in est.lines[0] and f"~{format_seconds(3600)} of 1 x" in est.lines[1]
    assert cost.training_job_estimate(1, 1.0, 1.0, "Standard_DS3_v2", 1, table).usd is None  # no GPU


def test_hosted_finetune_estimate():
    # 250,000 tokens x 3 epochs at $0.004 per 1k = $3.00.
    assert cost.hosted_finetune_estimate(250_000, 3, 0.004).usd == pytest.approx(3.0)
    none = cost.hosted_finetune_estimate(250_000, 3, 0.0)
    assert none.usd is None and "750,000 billed tokens" in none.lines[0]


def test_data_tokens_exact_from_a_matching_prepare_else_a_labelled_guess(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"x" * 4000)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    assert cost.data_tokens(data, prepared) == (1000, cost.data_tokens(data, prepared)[1])
    assert "guess" in cost.data_tokens(data, prepared)[1]
    (prepared / "stats.json").write_text(json.dumps({"inputs": {"train": {"sha256": cost._file_sha256(data)}},
                                                     "tokens": {"all": {"tokens": 1234}}}))
    tokens, how = cost.data_tokens(data, prepared)
    assert tokens == 1234 and "counted by the local prepare" in how


def test_a_training_runs_summary_states_its_cost(tmp_path):
    from pathlib import Path

    from phi3local.config import load_recipe
    from phi3local.train.recipe import run_training

    repo = Path(__file__).resolve().parents[1]
    recipe = load_recipe(repo / "recipes" / "tiny-cpu.yaml", [
        f"output_dir={tmp_path / 'run'}", "training.max_steps=2", "training.checkpoint_every=0", "eval.every=0",
        "eval.generate_samples=0", "training.display=none", "training.usd_per_device_hour=3.6",
        "training.trackers=[]", "training.peak_flops=1e12"])
    summary = run_training(recipe)
    c = json.loads((tmp_path / "run" / "summary.json").read_text())["cost"]
    assert c == summary["cost"] and c["trained_tokens"] == summary["trained_tokens"] > 0
    assert c["device_hours"] == pytest.approx(summary["seconds"] / 3600)
    assert c["usd"] == pytest.approx(summary["seconds"] / 3600 * 3.6)
    assert c["usd_per_million_trained_tokens"] == pytest.approx(c["usd"] / c["trained_tokens"] * 1e6)
    assert c["device"] == "cpu" and c["peak_flops"] == 1e12 and c["energy_joules"] is None
    # `azure train`'s estimate starts from this run: its tokens/s scaled from 1 TFLOP/s to the A100's 312.
    est = cost.azure_train_estimate(recipe)
    assert est.usd is not None and f"{summary['tokens_per_second'] * 312:,.0f} tokens/s" in est.lines[1]
    assert "measured on CPU" in est.lines[-1]


def test_energy_meter_reads_nvmls_counter_of_the_visible_device(monkeypatch):
    import sys
    import types

    counters = {3: [1_000_000, 1_250_500]}  # mJ since the driver loaded, read at start and at the end
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda index: index
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda handle: counters[handle].pop(0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    meter = cost.EnergyMeter("cuda", 1)  # torch's cuda:1 is NVML's device 3 here
    assert meter.unavailable is None and meter.joules() == pytest.approx(250.5)
    fields = cost.run_summary_fields(3600.0, 1_000_000, 2.0, "cuda", 1e14, meter_with(fake, 3_600_000))
    assert fields["energy_joules"] == pytest.approx(3600.0) and fields["energy_kwh"] == pytest.approx(0.001)
    assert dict(cost.summary_rows(fields))["energy"] == "0.0010 kWh"

    def unsupported(handle):
        raise RuntimeError("Not Supported")

    fake.nvmlDeviceGetTotalEnergyConsumption = unsupported
    assert "not measured: NVML: Not Supported" in cost.EnergyMeter("cuda", 0).unavailable


def meter_with(fake, used_mj: int):
    start = [0, used_mj]
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda handle: start.pop(0)
    return cost.EnergyMeter("cuda", 0)
