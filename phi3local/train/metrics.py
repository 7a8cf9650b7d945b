"""What a run keeps of its metrics: metrics.jsonl always, TensorBoard and MLflow when asked for.

Every sink gets the same records (one per logged step, one per evaluation), so the curves in
TensorBoard, in MLflow (the tracking Azure ML itself uses) and in metrics.jsonl are the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from phi3local.errors import Phi3LocalError


class TrackerError(Phi3LocalError):
    """A tracker the recipe asks for cannot be used."""


class MetricsLog:
    """One JSON object per line, appended and flushed, so a crashed run keeps what it logged; plus the
    trackers in `trackers` ("tensorboard", "mlflow")."""

    def __init__(self, run_dir: Path, trackers: list[str] = (), params: dict | None = None,
                 recipe_file: Path | None = None, run_name: str | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        drop_partial_record(self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run, closed in close())
        self._tb = None
        self._mlflow = None
        if "tensorboard" in trackers:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is an optional install; metrics.jsonl has everything
                pass
        if "mlflow" in trackers:
            self._mlflow = _start_mlflow(run_name or Path(run_dir).name, params or {}, recipe_file)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._mlflow is not None:
            self._mlflow.log_metrics(scalars, step=int(record["step"]))

    def close(self, failed: bool = False) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run(status="FAILED" if failed else "FINISHED")


def drop_partial_record(path: Path) -> None:
    """Cut a last line without its newline: half a record, left by a run killed or out of disk mid-write, so
    a resumed run appends whole lines and the file stays one JSON object per line."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)


def _start_mlflow(run_name: str, params: dict, recipe_file: Path | None):
    """An MLflow run at MLFLOW_TRACKING_URI (Azure ML jobs set it themselves; else ./mlruns), with the
    recipe's values as params and the resolved recipe as an artifact."""
    try:
        import mlflow
    except ImportError:
        raise TrackerError("training.trackers lists mlflow but it is not installed: pip install 'phi3local[mlflow]'") \
            from None
    mlflow.start_run(run_name=run_name)
    # MLflow caps a param value at 6000 characters and a batch at 100 params.
    flat = {k: str(v)[:6000] for k, v in params.items()}
    items = list(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))
    if recipe_file is not None and Path(recipe_file).is_file():
        mlflow.log_artifact(str(recipe_file))
    return mlflow


class NullMetricsLog:
    """What ranks other than 0 log to: nothing (rank 0 writes the job's totals)."""

    def write(self, record: dict) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass
