"""The measured matmul peak FLOP/s: `phi3local.model.flops.measured_matmul_peak`, the MFU denominator.

The training loop divides model FLOP/s by this number (unless `training.peak_flops` is set), so it is
shown here with its spread over repeated measurements and next to other sizes and dtypes: a square
matmul of the package's default size is the yardstick, the others show how far it is from the best the
device does. On a shared or busy machine the measurement drops with the load (see `loadavg`).
"""

from __future__ import annotations

import time

import torch

from kernels_bench.common import Ctx
from kernels_bench.report import Column, bar_chart, fmt_flops, fmt_seconds, print_table, save_result
from kernels_bench.timing import time_fn
from phi3local.model import flops

NAME = "matmul_peak"


def run(ctx: Ctx) -> dict:
    began = time.perf_counter()
    timing = ctx.timing_args()
    rows = []
    # The package's own measurement (best-of over 0.5 s), taken `repeats` times with its cache cleared.
    samples = []
    for _ in range(timing["repeats"]):
        flops._PEAK_CACHE.clear()
        samples.append(flops.measured_matmul_peak(ctx.device, ctx.dtype))
    samples.sort()
    median = samples[len(samples) // 2]
    rows.append({"what": "measured_matmul_peak (package, MFU denominator)", "dtype": str(ctx.dtype),
                 "size": 8192 if ctx.is_cuda else 1024, "flops_per_s": median, "min": samples[0], "max": samples[-1],
                 "samples": samples, "seconds": None})
    sizes = ctx.pick([256, 512], [512, 1024, 2048], [4096, 8192])
    dtypes = [torch.float32] + ([torch.bfloat16] if ctx.is_cuda else [])
    if not ctx.is_cuda and ctx.size != "tiny":
        dtypes.append(torch.bfloat16)  # shows whether this CPU has bf16 units (AMX / avx512-bf16)
    for dtype in dtypes:
        for n in sizes:
            if dtype == torch.bfloat16 and not ctx.is_cuda and n > 1024:
                continue  # emulated bf16 on CPU: the 1024 case says enough
            a = torch.randn(n, n, device=ctx.device, dtype=dtype)
            b = torch.randn(n, n, device=ctx.device, dtype=dtype)
            t = time_fn(lambda a=a, b=b: a @ b, ctx.device, max_seconds=10, **timing)
            rows.append({"what": f"a @ b, {n}x{n}", "dtype": str(dtype), "size": n, "seconds": t.median,
                         "flops_per_s": 2 * n**3 / t.median, "min": 2 * n**3 / t.max, "max": 2 * n**3 / t.min,
                         "timing": t.as_dict()})
    config = {"dtype": str(ctx.dtype), "sizes": sizes, "timing": timing}
    path = save_result(ctx.out_dir, ctx.result_name(NAME), ctx.size, ctx.device, config, rows,
                       summary={"mfu_denominator_flops": median}, wall_s=time.perf_counter() - began,
                       notes=["the first row is what the training loop uses for MFU (best-of over 0.5 s per "
                              "measurement; min/max over repeated measurements)"])
    print_table(f"Matmul peak ({ctx.device.type})", rows, [
        Column("what", "what", justify="left"), Column("dtype", "dtype", justify="left"),
        Column("seconds", "median time", fmt_seconds), Column("flops_per_s", "FLOP/s", fmt_flops),
        Column("min", "min", fmt_flops), Column("max", "max", fmt_flops)], ctx.console)
    bar_chart(ctx.out_dir / f"{ctx.result_name(NAME)}.png", f"matmul FLOP/s, {ctx.device.type}",
              [f"{r['what']} {r['dtype']}" for r in rows], [r["flops_per_s"] / 1e9 for r in rows], "GFLOP/s",
              [(r["min"] / 1e9, r["max"] / 1e9) for r in rows])
    return {"path": str(path), "rows": rows, "summary": {"mfu_denominator_flops": median}}
