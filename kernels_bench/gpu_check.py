"""The GPU check: what a short loan of one CUDA GPU must measure, as one script (`make gpu-check`, <= 8 minutes).

    make gpu-wheels           # here, before the loan: the wheels the GPU machine lacks, into runs/gpu-wheels
    make gpu-check-dry        # here: every stage's command, the time estimates, the wheels (also in make test)
    make gpu-check            # on the lent machine; results in kernels_bench/results/gpu_check.json

Phi-3-mini at its real shapes with seeded random weights drawn on the GPU (`kernels_bench.real_models`), then,
each in its own process and each step through the CLI a user runs where phi3local is concerned:
  plan      `phi3local plan --device cuda --device-memory <this card>`: the planned peak
  phi3local `phi3local train` (NF4 QLoRA, packing, checkpointing), SDPA, and flash-attention 2 when flash_attn
            imports: trained tokens/s, torch.cuda.max_memory_allocated against the plan (target: within 15%)
  peers     TRL SFTTrainer + peft packed and unpacked (its default), Unsloth when it imports, on the same model,
            tokens, LoRA, steps, sequence cap and micro-batch; the phi3local/TRL order alternates
  export    `phi3local merge` then `phi3local export --precision int4 --target cuda` (parity report) when
            onnxruntime-genai imports; else recorded as not measured
The machine has no package index: torch, transformers, peft and accelerate are there; the rest comes as wheels in
runs/gpu-wheels (`run`'s carry, 64 MiB in all), `WHEELS` in the order they matter. Measured sizes (cp311, manylinux):
bitsandbytes 43.1 MB, pyarrow 55.0 MB, the others under 2 MB each: bitsandbytes and pyarrow do not fit together, so
TRL's stages (datasets needs pyarrow) run only where pyarrow is already installed, and onnxruntime-genai-cuda does not
fit either. What is missing is recorded, never skipped silently. Stages run in the order of what matters most and a
stage whose estimate (`ESTIMATE_S`, H100) no longer fits the budget (8 minutes) is recorded as not measured. Every
stage's result is saved as soon as it is measured, so a loan that ends early keeps what ran.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kernels_bench.common import PHI3_TOKENIZER, REPO_ROOT, RESULTS_DIR, WORK_DIR, write_results
from kernels_bench.real_size import (
    SETTINGS,
    Bench,
    export_args,
    machine,
    merge_args,
    plan_args,
    stage_export,
    stage_merge,
    stage_plan,
    stage_train,
    stage_trl,
    train_args,
    write_recipe,
)

NAME = "gpu_check"
PLAN_TARGET = 0.15  # |plan / max allocated - 1|
GPU_SETTINGS = {**SETTINGS, "device": "cuda", "max_seq_len": 2048, "micro_batch_size": 2, "steps": 12, "skip": 4,
                "eval_batches": 1}
BUDGET_S = 480
# Expected seconds per stage on one H100 (model drawn on the GPU, 4-bit load ~30 s, 12 steps of 2 x 2048 tokens, the
# 15 GB fp32 merge and the int4 builder on the host's 16 cores): estimates, not measurements (no GPU has run this).
ESTIMATE_S = {"model": 40, "plan": 15, "phi3local_sdpa": 75, "trl_packed": 75, "phi3local_flash_attention_2": 75,
              "trl": 75, "unsloth": 75, "merge": 60, "export_int4_cuda": 120}
# (import name, PyPI name) of what the GPU machine lacks, in the order they matter; versions are this machine's.
WHEELS = [("bitsandbytes", "bitsandbytes"), ("rich", "rich"), ("markdown_it", "markdown-it-py"), ("mdurl", "mdurl"),
          ("sentencepiece", "sentencepiece"), ("trl", "trl"), ("datasets", "datasets"), ("dill", "dill"),
          ("multiprocess", "multiprocess"), ("xxhash", "xxhash"), ("pyarrow", "pyarrow")]
WHEEL_DIR = REPO_ROOT / "runs" / "gpu-wheels"
CARRY_BYTES = 64 * 1024**2
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def save(results: dict) -> None:
    write_results(RESULTS_DIR / f"{NAME}.json", results)


def pinned(package: str) -> str:
    return f"{package}=={importlib.metadata.version(package)}"


def wheel_command(package: str, dest: Path = WHEEL_DIR) -> list[str]:
    """pip download of one wheel for the GPU machine (Linux x86_64, this Python), no dependencies: WHEELS lists them."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "--python-version",
            python, *(x for p in PLATFORMS for x in ("--platform", p)), "-d", str(dest), pinned(package)]


def download_wheels(dest: Path = WHEEL_DIR) -> dict:
    """WHEELS into dest in order while they fit CARRY_BYTES; what does not fit is named."""
    dest.mkdir(parents=True, exist_ok=True)
    kept, left_out, total = [], [], sum(p.stat().st_size for p in dest.glob("*.whl"))
    for _, package in WHEELS:
        before = set(dest.glob("*.whl"))
        subprocess.run(wheel_command(package, dest), check=True)
        new = set(dest.glob("*.whl")) - before
        size = sum(p.stat().st_size for p in new)
        if total + size > CARRY_BYTES:
            for p in new:
                p.unlink()
            left_out.append(f"{package} ({size / 1e6:.1f} MB)")
            continue
        total += size
        kept.append(package)
    return {"kept": kept, "left_out": left_out, "bytes": total}


def stage_order(attns: list[str], unsloth: bool) -> list[str]:
    """What matters most first: phi3local and its TRL peer, the export, then the other attention and peers."""
    order = ["model", "plan", "phi3local_sdpa", "trl_packed"]
    order += [f"phi3local_{a}" for a in attns[1:]] + ["merge", "export_int4_cuda", "trl"]
    return order + (["unsloth"] if unsloth else [])


def dry_run() -> int:
    """Every stage with the command it runs and its time estimate, and the wheels to carry: no GPU, nothing run."""
    s = {**GPU_SETTINGS, "attn": "sdpa", "device_memory_gib": 79}
    folder = WORK_DIR / "gpu_check" / "sdpa"
    bench = Bench("phi3-mini", folder, s, model=WORK_DIR / "models" / "real-phi3-mini-cuda", tokenizer_folder=PHI3_TOKENIZER)
    recipe = folder / "recipe.yaml"
    commands = {"model": ["kernels_bench.real_models.ensure_real_model('phi3-mini', device='cuda')"],
                "plan": plan_args(bench, recipe), "phi3local_sdpa": train_args(recipe),
                "phi3local_flash_attention_2": train_args(WORK_DIR / "gpu_check" / "flash_attention_2" / "recipe.yaml"),
                "trl_packed": ["kernels_bench.real_size:child_trl(packing=True)"],
                "trl": ["kernels_bench.real_size:child_trl(packing=False)"],
                "unsloth": ["kernels_bench.real_size:child_trl(packing=True, unsloth=True)"],
                "merge": merge_args(bench), "export_int4_cuda": export_args(bench, "int4")}
    order = stage_order(["sdpa", "flash_attention_2"], unsloth=True)
    elapsed, fits = 0, []
    print(f"gpu-check on one H100, budget {BUDGET_S} s; stages in order (estimated seconds, H100):")
    for name in order:
        runs = elapsed + ESTIMATE_S[name] <= BUDGET_S
        elapsed += ESTIMATE_S[name] if runs else 0
        if runs:
            fits.append(name)
        print(f"  {name:28s} {ESTIMATE_S[name]:4d} s  {'runs' if runs else 'over budget: not measured'}")
        print(f"      {' '.join(str(a) for a in commands[name])}")
    print(f"expected wall time: {elapsed} s of {BUDGET_S} ({len(fits)} of {len(order)} stages)")
    print(f"wheels to carry (runs/gpu-wheels, {CARRY_BYTES // 1024**2} MiB), in order; the GPU machine has torch, "
          "transformers, peft, accelerate:")
    present = {p.name.split("-")[0].lower().replace("_", "-"): p.stat().st_size for p in WHEEL_DIR.glob("*.whl")}
    for _, package in WHEELS:
        size = present.get(package.lower())
        print(f"  {pinned(package):32s} {f'{size / 1e6:.1f} MB in runs/gpu-wheels' if size else 'not downloaded'}")
    print("download them here (PyPI): make gpu-wheels; on the GPU machine make gpu-check installs them first")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels_bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the stages, commands, estimates and wheels")
    parser.add_argument("--wheels", action="store_true", help="download the wheels to carry into runs/gpu-wheels")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run()
    if args.wheels:
        print(json.dumps(download_wheels(), indent=2))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU (it is run on a lent GPU machine); nothing measured", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    card_gib = props.total_memory // 1024**3
    results: dict = {"name": NAME, "gpu": props.name, "gpu_memory_bytes": props.total_memory,
                     "machine": machine(), "settings": GPU_SETTINGS, "stages": {}, "not_measured": {}}
    stages = results["stages"]
    began = time.perf_counter()
    attns = ["sdpa"] + (["flash_attention_2"] if available("flash_attn") else [])
    if "flash_attention_2" not in attns:
        results["not_measured"]["phi3local flash_attention_2"] = "flash_attn does not import here"
    peers = [("trl_packed", True, False), ("trl", False, False)]
    if available("unsloth"):
        peers.append(("unsloth", True, True))
    else:
        results["not_measured"]["unsloth"] = "unsloth does not import here"

    def record(name: str, fn) -> dict:
        print(f"[gpu_check] {name} ...", flush=True)
        t = time.perf_counter()
        try:
            stages[name] = fn()
        except Exception as e:  # noqa: BLE001  (a failed stage is a result: record it and go on)
            stages[name] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
        stages[name]["stage_wall_s"] = time.perf_counter() - t
        results["wall_s"] = time.perf_counter() - began
        save(results)
        flat = {k: v for k, v in stages[name].items() if not isinstance(v, (dict, list))}
        print(f"[gpu_check] {name}: {json.dumps(flat, default=str)[:400]}", flush=True)
        return stages[name]

    benches = {a: Bench("phi3-mini", WORK_DIR / "gpu_check" / a, {**GPU_SETTINGS, "attn": a,
                                                                  "device_memory_gib": card_gib}) for a in attns}
    sdpa = benches["sdpa"]
    recipes = {a: write_recipe(b) for a, b in benches.items()}

    def train(attn: str) -> dict:
        run = stage_train(benches[attn], recipes[attn])
        measured = (run.get("run_summary") or {}).get("peak_memory_bytes") or max(
            [x for x in run.get("step_peak_memory_bytes", []) if x] or [0])
        planned = stages.get("plan", {}).get("planned_peak_bytes")
        if measured and planned:
            run["plan_error"] = planned / measured - 1
            run["plan_within_target"] = abs(planned / measured - 1) <= PLAN_TARGET
        return run

    work = {"model": lambda: {"folder": str(sdpa.model_dir),
                              **json.loads((sdpa.model_dir / "real_model.json").read_text())},
            "plan": lambda: stage_plan(sdpa, recipes["sdpa"]),
            "merge": lambda: stage_merge(sdpa), "export_int4_cuda": lambda: stage_export(sdpa, "int4")}
    work.update({f"phi3local_{a}": (lambda a=a: train(a)) for a in attns})
    work.update({name: (lambda packing=packing, unsloth=unsloth, name=name:
                        stage_trl(sdpa, packing=packing, unsloth=unsloth, name=name))
                 for name, packing, unsloth in peers})
    for name in stage_order(attns, unsloth=available("unsloth")):
        if name in ("merge", "export_int4_cuda") and not available("onnxruntime_genai"):
            results["not_measured"][name] = "onnxruntime_genai does not import here (onnxruntime-genai-cuda)"
        elif name.startswith(("trl", "unsloth")) and not (available("trl") and available("datasets")):
            results["not_measured"][name] = "trl or datasets (pyarrow) does not import here"
        elif time.perf_counter() - began + ESTIMATE_S[name] > BUDGET_S:
            results["not_measured"][name] = f"over the {BUDGET_S} s budget (estimate {ESTIMATE_S[name]} s)"
        else:
            record(name, work[name])
    ours = stages.get("phi3local_sdpa", {}).get("trained_tokens_per_s")
    results["ratios"] = {f"phi3local_sdpa / {n}": ours / stages[n]["trained_tokens_per_s"]
                         for n, *_ in peers if ours and stages.get(n, {}).get("trained_tokens_per_s")}
    results["wall_s"] = time.perf_counter() - began
    save(results)
    print(json.dumps({"ratios": results["ratios"], "not_measured": results["not_measured"],
                      "wall_s": results["wall_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
