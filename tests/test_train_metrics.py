"""The metrics a run keeps: metrics.jsonl, the live panel's trend, and an MLflow run read back from its store."""

import json
from pathlib import Path

from phi3local.config import load_recipe
from phi3local.train import recipe as loop
from phi3local.train.display import loss_trend

REPO = Path(__file__).resolve().parents[1]


def test_an_mlflow_run_holds_the_params_every_logged_step_and_the_recipe(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    # MLflow 3 keeps the plain-folder store behind an opt-in; a server or Azure ML is the same client API.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run"
    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", [
        f"output_dir={run_dir}", "training.display=none", "eval.generate_samples=0", "training.max_steps=6",
        "training.log_every=2", "eval.every=3", "training.checkpoint_every=0", "training.trackers=[mlflow]"])
    loop.run_training(recipe)

    client = MlflowClient(store)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["training.lr"] == "0.005" and run.data.params["model.name_or_path"] == "tiny"
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in steps]  # one per logged step
    assert [m.step for m in history] == [2, 4, 6]
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert len(val) == len([r for r in logged if "val_loss" in r]) >= 2
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "recipe.yaml" in artifacts
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="recipe.yaml",
                                                     dst_path=str(tmp_path / "dl")))
    assert local.read_text() == (run_dir / "recipe.yaml").read_text()


def test_loss_trend_is_a_sparkline_of_the_recent_losses():
    assert loss_trend([1.0]) == ""
    assert loss_trend([4.0, 3.0, 2.0, 1.0]) == "█▆▃▁  -3.000"  # 8 levels between the lowest and highest
    assert loss_trend(list(range(100)), width=8).startswith("▁▂▃▄▅▆▇█")


def test_a_half_written_record_is_cut_before_a_resumed_run_appends(tmp_path):
    """A run stopped by a full disk mid-line leaves half a record; the next run's lines must all parse."""
    from phi3local.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n" + '{"step": 2, "lo')
    log = MetricsLog(tmp_path)
    log.write({"step": 2, "loss": 4.5})
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1, "loss": 5.0},
                                                                          {"step": 2, "loss": 4.5}]
    MetricsLog(tmp_path).close()  # a whole file is left as it is
    assert path.read_text().count("\n") == 2
