"""The GPU check: what a short loan of one CUDA GPU must measure, as one script (`make gpu-check`, <= 8 minutes).

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
The machine has no package index: torch, transformers and peft are there; bring bitsandbytes, trl, accelerate,
datasets and (if wanted) onnxruntime-genai-cuda as wheels (`carry`). What is missing is recorded, never skipped
silently. Every stage's result is saved as soon as it is measured, so a loan that ends early keeps what ran.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from kernels_bench.common import RESULTS_DIR, WORK_DIR
from kernels_bench.real_size import (
    SETTINGS,
    Bench,
    machine,
    stage_export,
    stage_merge,
    stage_plan,
    stage_train,
    stage_trl,
    write_recipe,
)

NAME = "gpu_check"
PLAN_TARGET = 0.15  # |plan / max allocated - 1|
GPU_SETTINGS = {**SETTINGS, "device": "cuda", "max_seq_len": 2048, "micro_batch_size": 2, "steps": 12, "skip": 4,
                "eval_batches": 1}


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def save(results: dict) -> None:
    path = RESULTS_DIR / f"{NAME}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(path)


def main() -> int:
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
    record("model", lambda: {"folder": str(sdpa.model_dir), **json.loads((sdpa.model_dir / "real_model.json").read_text())})
    record("plan", lambda: stage_plan(sdpa, recipes["sdpa"]))
    order = [("phi3local_sdpa", None)] + [(n, p) for n, *p in peers]
    order += [(f"phi3local_{a}", None) for a in attns[1:]]
    for name, peer in order:
        if peer is None:
            attn = name.removeprefix("phi3local_")
            run = record(name, lambda attn=attn: stage_train(benches[attn], recipes[attn]))
            measured = (run.get("run_summary") or {}).get("peak_memory_bytes") or max(
                [x for x in run.get("step_peak_memory_bytes", []) if x] or [0])
            planned = stages["plan"].get("planned_peak_bytes")
            if measured and planned:
                run["plan_error"] = planned / measured - 1
                run["plan_within_target"] = abs(planned / measured - 1) <= PLAN_TARGET
        else:
            packing, unsloth = peer
            record(name, lambda packing=packing, unsloth=unsloth, name=name:
                   stage_trl(sdpa, packing=packing, unsloth=unsloth, name=name))
    ours = stages.get("phi3local_sdpa", {}).get("trained_tokens_per_s")
    results["ratios"] = {f"phi3local_sdpa / {n}": ours / stages[n]["trained_tokens_per_s"]
                         for n, *_ in peers if ours and stages.get(n, {}).get("trained_tokens_per_s")}
    if available("onnxruntime_genai"):
        record("merge", lambda: stage_merge(sdpa))
        record("export_int4_cuda", lambda: stage_export(sdpa, "int4"))
    else:
        results["not_measured"]["export"] = "onnxruntime_genai does not import here (carry onnxruntime-genai-cuda)"
    results["wall_s"] = time.perf_counter() - began
    save(results)
    print(json.dumps({"ratios": results["ratios"], "not_measured": results["not_measured"],
                      "wall_s": results["wall_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
