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
