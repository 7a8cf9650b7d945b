"""Run the benchmarks: `python -m kernels_bench.run_all --size small|full [--only kernels|train]`.

    make bench          # --size small: everything, sized for a few minutes on 2 CPU cores
    make bench-kernels  # --only kernels: matmul peak, attention, NF4 linear, cross-entropy, RMSNorm/rotary
    make bench-train    # --only train: phi3local vs TRL end to end (SFTTrainer, DPOTrainer), and a profile of one step
    make bench-gpu      # --size full: Phi-3-mini's real shapes, bf16, on CUDA

Each benchmark writes kernels_bench/results/<name>.json (<name>_<size>.json for sizes other than small)
and a PNG chart next to it, and prints its table.
"""

from __future__ import annotations

import os

# Quiet the profiler's start/stop lines (read when torch loads, so before importing it).
os.environ.setdefault("KINETO_LOG_LEVEL", "99")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kernels_bench.common import RESULTS_DIR, SIZES, BenchUnavailable, Ctx, make_console  # noqa: E402
from kernels_bench.report import Column, fmt_seconds, op_latency_us, print_table  # noqa: E402

KERNELS = ["matmul_peak", "attention", "nf4_linear", "cross_entropy", "norm_rope"]
TRAIN = ["train_e2e", "dpo_e2e", "profile_step"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernels_bench.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--only", choices=["kernels", "train"], help="run only this group")
    p.add_argument("--bench", help="comma-separated benchmark names (overrides --only): "
                   + ", ".join(KERNELS + TRAIN))
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--repeats", type=int, help="override the repeats (rounds for train_e2e and dpo_e2e)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default: %(default)s)")
    p.add_argument("--extended", action="store_true",
                   help="also run optional contenders (train_e2e on CUDA: phi3local under autocast and with bf16 "
                   "parameters; dpo_e2e: phi3local with the packing mode auto did not choose, TRL with fp32 LoRA weights)")
    p.add_argument("--contenders", help="train_e2e: comma-separated contenders to run instead of the size's "
                   "default (phi3local, trl, phi3local_{packed,unpacked}_{gc,nogc}, "
                   "trl_{packed,unpacked}_{fp32,bf16}_{gc,nogc}, trl_phi3local_batches, unsloth, phi3local_autocast, "
                   "phi3local_bf16_params); dpo_e2e: phi3local, phi3local_like, phi3local_packed, phi3local_unpacked, "
                   "phi3local_other, trl, trl_fp32_lora")
    p.add_argument("--keep-going", action="store_true", help="run the other benchmarks when one fails")
    return p.parse_args(argv)


def selected(args: argparse.Namespace) -> list[str]:
    if args.bench:
        names = [n.strip() for n in args.bench.split(",") if n.strip()]
        unknown = [n for n in names if n not in KERNELS + TRAIN]
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {unknown}; known: {KERNELS + TRAIN}")
        return names
    return {"kernels": KERNELS, "train": TRAIN, None: KERNELS + TRAIN}[args.only]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = make_console()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda: no CUDA device here[/]")
        return 2
    ctx = Ctx(size=args.size, device=device, out_dir=args.out, console=console, repeats=args.repeats,
              extended=args.extended,
              contenders=[c.strip() for c in args.contenders.split(",") if c.strip()] if args.contenders else None)
    if args.size == "full" and device.type != "cuda":
        console.print("[red]--size full runs Phi-3-mini's real shapes (hidden 3072, 32 heads of 96, intermediate "
                      "8192, sequences of 2048/4096) and needs a CUDA GPU.[/] On CPU use `make bench` "
                      "(--size small).")
        return 2
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    console.print(f"[bold]kernels_bench[/] size={args.size} device={device} "
                  f"({ctx.dtype}, {torch.get_num_threads()} threads) -> {args.out}"
                  + (f"  load average {load[0]:.1f} on {os.cpu_count()} CPUs" if load else ""))
    latency = op_latency_us()
    if device.type == "cpu" and (latency > 1000 or (load and load[0] > 0.5 * (os.cpu_count() or 1))):
        console.print(f"[yellow]the machine is busy (load {load[0] if load else '?'}, a tiny parallel op takes "
                      f"{latency:.0f} µs; idle: ~20 µs): CPU timings will be slower and noisier than on an idle "
                      "machine. Every result records environment.loadavg and environment.cpu_op_latency_us.[/]")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    status = []
    began = time.perf_counter()
    for name in selected(args):
        console.rule(f"[bold]{name}[/]")
        t0 = time.perf_counter()
        try:
            result = importlib.import_module(f"kernels_bench.{name}").run(ctx)
            status.append({"benchmark": name, "status": "ok", "seconds": time.perf_counter() - t0,
                           "result": result["path"]})
        except BenchUnavailable as e:
            console.print(f"[yellow]{name}: skipped: {e}[/]")
            status.append({"benchmark": name, "status": "skipped", "seconds": time.perf_counter() - t0,
                           "result": str(e)})
        except Exception as e:  # noqa: BLE001 - report, then stop or go on
            traceback.print_exc()
            status.append({"benchmark": name, "status": f"FAILED: {type(e).__name__}",
                           "seconds": time.perf_counter() - t0, "result": str(e)[:200]})
            if not args.keep_going:
                break
    console.rule()
    print_table(f"kernels_bench: {len(status)} benchmark(s), {fmt_seconds(time.perf_counter() - began)} in all",
                status, [Column("benchmark", "benchmark", justify="left"), Column("status", "status", justify="left"),
                         Column("seconds", "wall time", fmt_seconds), Column("result", "result", justify="left")],
                console)
    return 0 if all(s["status"] in ("ok", "skipped") for s in status) else 1


if __name__ == "__main__":
    sys.exit(main())
