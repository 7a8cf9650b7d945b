"""Data parallel training: 2 ranks under torchrun (gloo) against 1 process, same global batch, same recipe.

`recipes/tiny-cpu.yaml`: 1 process x micro-batch 4 x grad_accum 2 against 2 ranks x micro-batch 4 x
grad_accum 1 (8 sequences per optimizer step either way), each a fresh `phi3local train` process, in
alternating order over the rounds so that drift of the machine hits all alike. torchrun gives each rank one
thread (OMP_NUM_THREADS=1); the single process runs with torch's default (one thread per core) and, as a
third layout, with one thread, to tell the threads' effect from the ranks'.

Trained tokens/s = the job's trained tokens (summed over ranks) over the timed steps / their seconds, from
metrics.jsonl (the first `skip` steps warm up and are not timed). The per-step losses of both are compared
too: the run is a correctness check of the distributed path.

On the 2-core development machine both ranks share the two cores that one process already uses (torch
gives each rank one thread under torchrun, the single process two), so this is NOT a speed-up measurement:
expect a ratio near or below 1. On a multi-GPU machine (one rank per GPU, NCCL) it is the scaling figure;
none was available when this was written, so no GPU row exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kernels_bench.common import REPO_ROOT, RESULTS_DIR, make_console
from kernels_bench.report import Column, fmt_num, fmt_ratio, print_table, save_result

NAME = "ddp_throughput"
RECIPE = REPO_ROOT / "recipes" / "tiny-cpu.yaml"


LAYOUTS = {  # name -> (ranks, OMP_NUM_THREADS or None for torch's default)
    "1 process, default threads, accum 2": (1, None),
    "1 process, 1 thread, accum 2": (1, "1"),
    "2 ranks, 1 thread each, accum 1": (2, "1"),
}


def launch(ranks: int, threads: str | None, run_dir: Path, steps: int) -> None:
    common = [f"output_dir={run_dir}", f"training.max_steps={steps}", "training.log_every=1", "eval.every=0",
              "eval.generate_samples=0", "training.display=none", "training.checkpoint_every=0",
              "training.trackers=[]", "--overwrite"]
    if ranks == 1:
        command = [sys.executable, "-m", "phi3local", "train", str(RECIPE), "training.grad_accum=2", *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   "-m", "phi3local", "train", str(RECIPE), "training.grad_accum=1", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:8])} ... failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def measure(run_dir: Path, skip: int) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    timed = steps[skip:]
    tokens = timed[-1]["trained_tokens"] - steps[skip - 1]["trained_tokens"]
    seconds = sum(r["step_seconds"] for r in timed)
    return {"tokens_per_second": tokens / seconds, "step_seconds": seconds / len(timed),
            "losses": [r["loss"] for r in steps]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps not timed")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    console = make_console()
    started = time.perf_counter()
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="phi3local-ddp-bench-") as work:
        for round_index in range(args.rounds):
            order = list(LAYOUTS) if round_index % 2 == 0 else list(reversed(LAYOUTS))
            for index, name in enumerate(order):
                run_dir = Path(work) / f"r{round_index}-{index}"
                launch(*LAYOUTS[name], run_dir, args.steps)
                results[name].append(measure(run_dir, args.skip))
    rows = []
    for name, runs in results.items():
        best = max(runs, key=lambda r: r["tokens_per_second"])
        rows.append({"layout": name, "ranks": LAYOUTS[name][0], "omp_num_threads": LAYOUTS[name][1],
                     "tokens_per_second": best["tokens_per_second"], "step_seconds": best["step_seconds"],
                     "tokens_per_second_rounds": [r["tokens_per_second"] for r in runs]})
    for row in rows[1:]:
        row["ratio_vs_one"] = row["tokens_per_second"] / rows[0]["tokens_per_second"]
    ratio = rows[2]["tokens_per_second"] / rows[1]["tokens_per_second"]
    one, two = (results[name][0]["losses"] for name in (list(LAYOUTS)[0], list(LAYOUTS)[2]))
    max_loss_diff = max(abs(a - b) for a, b in zip(one, two))
    notes = ["2 CPU ranks on a 2-core machine: a correctness check of the distributed path, not a speed-up",
             "GPU: not measured (no multi-GPU machine was available)",
             f"max |loss difference| per step, 2 ranks vs 1 process: {max_loss_diff:.3g}"]
    print_table(f"{NAME}: tiny-cpu, global batch 8 sequences, best of {args.rounds} rounds", rows, [
        Column("layout", "layout", justify="left"), Column("tokens_per_second", "trained tok/s", fmt_num),
        Column("step_seconds", "s/step", lambda x: f"{x:.4f}"), Column("ratio_vs_one", "vs first", fmt_ratio),
    ], console=console, caption="; ".join(notes))
    config = {"recipe": "recipes/tiny-cpu.yaml", "steps": args.steps, "skip": args.skip, "rounds": args.rounds,
              "global_batch_sequences": 8}
    summary = {"ratio_two_ranks_vs_one_process_one_thread": ratio, "max_loss_difference": max_loss_diff}
    path = save_result(RESULTS_DIR, NAME, "small", "cpu", config, rows, summary=summary, notes=notes,
                       wall_s=time.perf_counter() - started)
    console.print(f"saved {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
