"""What compute costs: a training run's device-hours and price, Azure instance estimates, hosted fine-tuning.

No torch import (the Azure venv uses it too). Prices come from a table the user edits: the shipped
phi3local/assets/prices.json (hardware facts READ from Microsoft's and NVIDIA's pages; every price a
placeholder marked as such) with a user file (azure.price_table, or the PHI3LOCAL_PRICES variable) whose
entries replace the shipped ones by name. Nothing is fetched.

    run cost        device_hours = seconds / 3600 x devices; cost = device_hours x price per device-hour;
                    cost per million trained tokens = cost / trained_tokens x 1e6
    instance        per hour = instance price x count; per month = x 730 h (Azure's monthly hours)
    Azure training  target tokens/s = local tokens/s x target peak FLOP/s / local peak FLOP/s (same MFU
                    assumed); hours = trained tokens / target tokens/s
    hosted tuning   tokens x epochs / 1000 x price per 1k tokens
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from phi3local.errors import Phi3LocalError
from phi3local.units import format_seconds

PRICES_FILE = Path(__file__).resolve().parent / "assets" / "prices.json"
ENV_PRICES = "PHI3LOCAL_PRICES"
HOURS_PER_MONTH = 730  # Azure's pricing pages quote a month as 730 hours


class CostError(Phi3LocalError, ValueError):
    """A price table cannot be read or lacks what an estimate needs; the message names the file and key."""

    exit_code = 2


# ------------------------------------------------------------------------------------------ price table

@dataclass(frozen=True)
class Instance:
    name: str
    gpu: str | None
    gpus: int
    gpu_memory_gib: float
    vcpus: int
    memory_gib: float
    usd_per_hour: float | None
    placeholder: bool

    def hardware(self) -> str:
        host = f"{self.vcpus} vCPU, {self.memory_gib:g} GiB RAM"
        if not self.gpus:
            return f"CPU only, {host}"
        return f"{self.gpus} x {self.gpu} ({self.gpu_memory_gib:g} GiB each), {host}"


@dataclass
class PriceTable:
    instances: dict[str, dict[str, Any]]
    gpus: dict[str, dict[str, Any]]
    hosted_usd_per_1k_tokens: float
    sources: list[str]

    def instance(self, name: str) -> Instance | None:
        raw = self.instances.get(name)
        if raw is None:
            return None
        where = f"{self.sources[-1]}: instances.{name}"
        return Instance(name=name, gpu=raw.get("gpu"), gpus=int(_number(raw.get("gpus", 0), f"{where}.gpus")),
                        gpu_memory_gib=_number(raw.get("gpu_memory_gib", 0), f"{where}.gpu_memory_gib"),
                        vcpus=int(_number(raw.get("vcpus", 0), f"{where}.vcpus")),
                        memory_gib=_number(raw.get("memory_gib", 0), f"{where}.memory_gib"),
                        usd_per_hour=_number(raw["usd_per_hour"], f"{where}.usd_per_hour")
                        if raw.get("usd_per_hour") is not None else None,
                        placeholder=bool(raw.get("placeholder", False)))

    def gpu_peak_flops(self, gpu: str | None) -> float | None:
        entry = self.gpus.get(gpu or "")
        return _number(entry["peak_flops"], f"gpus.{gpu}.peak_flops") if entry and "peak_flops" in entry else None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise CostError(f"{where}: expected a number >= 0, got {value!r}")
    return float(value)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CostError(f"{path}: no such price table") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CostError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CostError(f"{path}: expected a JSON object with instances, gpus, hosted_finetune")
    for key in ("instances", "gpus", "hosted_finetune"):
        if key in data and not isinstance(data[key], dict):
            raise CostError(f"{path}: {key} must be an object")
    return data


def load_price_table(override: str | Path | None = None) -> PriceTable:
    """The shipped table, then the user's (override, else $PHI3LOCAL_PRICES) on top, entry by entry."""
    shipped = _read(PRICES_FILE)
    table = PriceTable(dict(shipped["instances"]), dict(shipped["gpus"]),
                       float(shipped["hosted_finetune"]["usd_per_1k_tokens"]), [str(PRICES_FILE)])
    user = override or os.environ.get(ENV_PRICES)
    if user:
        data = _read(Path(user))
        table.instances.update({k: v for k, v in data.get("instances", {}).items() if not k.startswith("_")})
        table.gpus.update({k: v for k, v in data.get("gpus", {}).items() if not k.startswith("_")})
        hosted = data.get("hosted_finetune", {}).get("usd_per_1k_tokens")
        if hosted is not None:
            table.hosted_usd_per_1k_tokens = _number(hosted, f"{user}: hosted_finetune.usd_per_1k_tokens")
        table.sources.append(str(user))
    return table


# ------------------------------------------------------------------------------------------ a training run

def run_cost(seconds: float, trained_tokens: int, usd_per_device_hour: float, devices: int = 1) -> dict[str, Any]:
    """The cost fields of a run summary (usd fields None when no price is set)."""
    device_hours = seconds / 3600.0 * devices
    priced = usd_per_device_hour > 0
    cost = device_hours * usd_per_device_hour if priced else None
    per_million = cost / trained_tokens * 1e6 if priced and trained_tokens else None
    return {"wall_seconds": seconds, "devices": devices, "device_hours": device_hours,
            "usd_per_device_hour": usd_per_device_hour if priced else None, "usd": cost,
            "usd_per_million_trained_tokens": per_million}


class EnergyMeter:
    """Energy of one CUDA device over a run, from NVML's total-energy counter (Volta and newer GPUs).

    Off CUDA, without pynvml (nvidia-ml-py), or on a GPU without the counter it measures nothing
    (joules() is None) and says why in `unavailable`.
    """

    def __init__(self, device_type: str, device_index: int | None = 0):
        self.unavailable: str | None = None
        self._handle = None
        self._start_mj: int | None = None
        if device_type != "cuda":
            self.unavailable = f"not measured on {device_type} (NVML is CUDA only)"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            # torch numbers the visible devices; NVML all of them: map through CUDA_VISIBLE_DEVICES when set.
            index = _nvml_index(device_index or 0)
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except ImportError:
            self.unavailable = "not measured: pip install nvidia-ml-py for NVML energy"
        except Exception as e:  # noqa: BLE001 - NVMLError_NotSupported on pre-Volta GPUs, a driver problem
            self.unavailable = f"not measured: NVML: {e}"

    def joules(self) -> float | None:
        if self._start_mj is None:
            return None
        import pynvml

        try:
            return (pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start_mj) / 1000.0
        except Exception:  # noqa: BLE001
            return None


def _nvml_index(torch_index: int) -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    try:
        return int(visible[torch_index])
    except (ValueError, IndexError):
        return torch_index


def run_summary_fields(seconds: float, trained_tokens: int, usd_per_device_hour: float, device_type: str,
                       peak_flops: float, energy: EnergyMeter | None = None, devices: int = 1) -> dict[str, Any]:
    """The "cost" block of a training run's summary.json (`devices`: the ranks of a distributed run, each
    holding one device for the whole wall time; `energy`: rank 0's device only)."""
    fields = run_cost(seconds, trained_tokens, usd_per_device_hour, devices)
    joules = energy.joules() if energy is not None else None
    fields.update({"device": device_type, "peak_flops": peak_flops, "trained_tokens": trained_tokens,
                   "energy_joules": joules, "energy_kwh": joules / 3.6e6 if joules is not None else None,
                   "energy_note": energy.unavailable if energy is not None else "not measured"})
    return fields


def summary_rows(cost: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) rows of the run summary table."""
    rows = [("wall time / device-hours", f"{cost['wall_seconds']:.1f} s / {cost['device_hours']:.4f}")]
    if cost["usd"] is None:
        rows.append(("cost", "not priced (set training.usd_per_device_hour)"))
    else:
        rows.append(("cost", f"${cost['usd']:.4f} at ${cost['usd_per_device_hour']:g}/device-hour"))
        if cost["usd_per_million_trained_tokens"] is not None:
            rows.append(("cost per 1M trained tokens", f"${cost['usd_per_million_trained_tokens']:.4f}"))
    energy = f"{cost['energy_kwh']:.4f} kWh" if cost["energy_kwh"] is not None else cost["energy_note"]
    rows.append(("energy", energy))
    return rows


# ------------------------------------------------------------------------------------------ Azure estimates

@dataclass
class Estimate:
    what: str
    usd: float | None
    lines: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _price_note(instance: Instance, table: PriceTable) -> str:
    return f" (placeholder price: set yours in {ENV_PRICES} or azure.price_table)" if instance.placeholder else ""


def instance_estimate(instance_type: str, count: int, table: PriceTable) -> Estimate:
    """An endpoint or cluster of `count` instances: the hardware and its price per hour and per month."""
    inst = table.instance(instance_type)
    if inst is None:
        return Estimate("instance", None, [f"{instance_type}: not in the price table ({', '.join(table.sources)}); "
                                           "add it there for the hardware and an estimate"])
    lines = [f"{instance_type}: {inst.hardware()}"]
    if inst.usd_per_hour is None:
        return Estimate("instance", None, lines + ["no price set for it in the price table"])
    hourly = inst.usd_per_hour * count
    lines.append(f"${hourly:,.2f}/hour, ${hourly * HOURS_PER_MONTH:,.0f}/month ({count} x ${inst.usd_per_hour:g}/h, "
                 f"{HOURS_PER_MONTH} h){_price_note(inst, table)}")
    return Estimate("instance", hourly, lines)


def training_job_estimate(trained_tokens: int, local_tokens_per_second: float, local_peak_flops: float,
                          instance_type: str, instance_count: int, table: PriceTable, processes: int = 1) -> Estimate:
    """A training job on Azure, from this machine's measured speed scaled by the target GPUs' peak.

    `processes`: the job's DDP ranks (one GPU each); the speed is assumed to scale linearly with them, an
    upper bound (the gradient all-reduce costs more between nodes than inside one).
    """
    inst = table.instance(instance_type)
    if inst is None or not inst.gpus:
        return Estimate("train job", None, [f"{instance_type}: not a GPU instance in the price table; no estimate"])
    peak = table.gpu_peak_flops(inst.gpu)
    if not peak:
        return Estimate("train job", None, [f"no peak_flops for GPU {inst.gpu} in the price table; no estimate"])
    if local_tokens_per_second <= 0 or local_peak_flops <= 0:
        return Estimate("train job", None, ["the local run has no measured tokens/s or peak: no estimate"])
    # local_peak_flops is the local run's total over its ranks, as its tokens/s: their ratio is per unit of peak.
    target_tps = local_tokens_per_second * peak / local_peak_flops * processes
    hours = trained_tokens / target_tps / 3600.0
    lines = [f"local {local_tokens_per_second:,.0f} tokens/s at {local_peak_flops / 1e12:.2f} TFLOP/s peak -> "
             f"{inst.gpu} {peak / 1e12:.0f} TFLOP/s: ~{target_tps:,.0f} tokens/s (same MFU assumed)"
             + (f" x {processes} ranks" if processes > 1 else ""),
             f"{trained_tokens:,} trained tokens: ~{format_seconds(hours * 3600)} of {instance_count} x {instance_type}"]
    if inst.usd_per_hour is None:
        return Estimate("train job", None, lines + ["no price set for the instance"])
    usd = hours * inst.usd_per_hour * instance_count
    lines.append(f"~${usd:,.2f} (compute only, at ${inst.usd_per_hour:g}/h){_price_note(inst, table)}")
    return Estimate("train job", usd, lines)


def hosted_finetune_estimate(tokens: int, epochs: int, usd_per_1k_tokens: float) -> Estimate:
    """Azure's hosted fine-tuning: billed per trained token x epochs."""
    billed = tokens * epochs
    if usd_per_1k_tokens <= 0:
        return Estimate("hosted", None, [f"hosted: {tokens:,} tokens x {epochs} epoch(s) = {billed:,} billed tokens; "
                                         "no price set (azure.finetune_usd_per_1k_tokens)"])
    usd = billed / 1000.0 * usd_per_1k_tokens
    return Estimate("hosted", usd, [f"hosted: {tokens:,} tokens x {epochs} epoch(s) x ${usd_per_1k_tokens:g}/1k "
                                    f"= ${usd:,.2f} (plus the hourly fee of a deployed fine-tuned model)"])


def local_run_cost(run_dir: Path) -> dict[str, Any] | None:
    """The cost block and speed of a finished local run (summary.json), or None."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("cost"), dict):
        return None
    return {**summary["cost"], "tokens_per_second": summary.get("tokens_per_second"),
            "summary_file": str(path), "age_hours": (time.time() - path.stat().st_mtime) / 3600}


def local_line(local: dict[str, Any] | None, run_dir: str) -> str:
    if local is None:
        return f"local: no finished run in {run_dir} (run `phi3local train` with this recipe to measure it)"
    usd = local.get("usd")
    price = f"${usd:,.4f}" if usd is not None else "not priced (training.usd_per_device_hour)"
    return (f"local: {local['trained_tokens']:,} trained tokens in {local['device_hours']:.4f} device-hours on "
            f"{local['device']}: {price}")


# ------------------------------------------------------------------------------------------ the CLI's estimates

def azure_train_estimate(recipe: Any, instance_count: int = 1, gpus_per_node: int = 1) -> Estimate:
    """`azure train`: the recipe's finished local run (output_dir/summary.json) scaled to the cluster's GPU."""
    local = local_run_cost(Path(recipe.output_dir))
    if local is None or not local.get("tokens_per_second"):
        return Estimate("train job", None, [local_line(None, recipe.output_dir)])
    table = load_price_table(recipe.azure.price_table)
    est = training_job_estimate(int(local["trained_tokens"]), float(local["tokens_per_second"]),
                                float(local["peak_flops"]), recipe.azure.train_instance_type, instance_count, table,
                                processes=instance_count * gpus_per_node)
    est.lines.insert(0, local_line(local, recipe.output_dir))
    if local.get("device") != "cuda":
        # A CPU run is bound by other things than a GPU's peak: the scaled speed is only an upper bound.
        est.lines.append("measured on CPU: a GPU's MFU differs; train on a GPU locally for a usable estimate")
    return est


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# A rough count when no local prepare measured the file (English text with a BPE vocabulary: ~4 bytes a token).
BYTES_PER_TOKEN_GUESS = 4


def data_tokens(data_file: Path, prepared_dir: Path) -> tuple[int, str]:
    """Tokens of data_file: exact from a local prepare of the same file (matched by sha256), else a guess."""
    digest = _file_sha256(data_file)
    try:
        stats = json.loads((prepared_dir / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stats = {}
    inputs = stats.get("inputs", {}) if isinstance(stats, dict) else {}
    if any(isinstance(v, dict) and v.get("sha256") == digest for v in inputs.values()):
        return int(stats["tokens"]["all"]["tokens"]), f"counted by the local prepare ({prepared_dir / 'stats.json'})"
    guess = Path(data_file).stat().st_size // BYTES_PER_TOKEN_GUESS
    return guess, (f"~{BYTES_PER_TOKEN_GUESS} bytes/token guess; `phi3local prepare` with data.train_file={data_file} "
                   "counts them")


def finetune_comparison(recipe: Any, data_file: Path) -> list[str]:
    """`azure finetune`: the hosted estimate next to the local run's cost for the same data."""
    prepared = Path(recipe.data.prepared_dir or Path(recipe.output_dir) / "prepared")
    tokens, how = data_tokens(Path(data_file), prepared)
    price = recipe.azure.finetune_usd_per_1k_tokens or load_price_table(recipe.azure.price_table).hosted_usd_per_1k_tokens
    epochs = max(recipe.training.epochs, 1)
    lines = hosted_finetune_estimate(tokens, epochs, price).lines
    lines.append(f"  tokens: {how}; held-out validation rows are not billed")
    local = local_run_cost(Path(recipe.output_dir))
    lines.append(local_line(local, recipe.output_dir))
    return lines
