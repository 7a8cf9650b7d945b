"""What batching concurrent requests could ever give on this machine: og.Generator decode steps, batch 8 vs 1.

    python -m kernels_bench.batch_ceiling [--shapes 256x4x1024,1024x8x2816,3072x4x8192 --precisions int4,int4:0,fp32]

For each Phi-3-shaped random model (hidden x layers x intermediate, the real Phi-3 vocabulary and
tokenizer) exported with the project's `export_onnx` at each precision (int4:0 = int4 with the builder's
accuracy_level 0, float activations, instead of the CPU default 4, int8 activations): the median time of one greedy
decode step of og.Generator with batch_size 1 and with batch_size 8 (one prompt repeated, as
serve_speed's `batched_decode_cost` measures it). A server that decoded 8 concurrent requests as one
batched forward, with nothing else costing anything, would answer at most
    ceiling = 8 x step(batch 1) / step(batch 8)
times the requests/s of one client: this is the upper bound `make bench-serve`'s 8-client / 1-client
ratio could reach with any batching engine on this machine, for that model and precision. Writes
kernels_bench/results/batch_ceiling.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


def _shape(text: str) -> tuple[int, int, int]:
    hidden, layers, intermediate = (int(part) for part in text.split("x"))
    return hidden, layers, intermediate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernels_bench.batch_ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")],
                   default=[(256, 4, 1024), (1024, 8, 2816), (3072, 4, 8192)],
                   help="models as hidden x layers x intermediate, comma-separated (3072x4x8192: Phi-3-mini's "
                        "width, 4 of its 32 layers)")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["int4", "int4:0", "fp32"],
                   help="int4, int4:LEVEL (int4 with that accuracy_level), fp32; comma-separated")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=REPO / "kernels_bench" / "results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from kernels_bench.common import make_console
    from kernels_bench.generate_speed import build_model
    from kernels_bench.report import Column, print_table, save_result
    from kernels_bench.serve_speed import batched_decode_cost
    from phi3local.export.onnx import export_onnx

    console = make_console()
    started = time.perf_counter()
    load_at_start = list(os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, layers, intermediate in args.shapes:
            folder = Path(tmp) / f"h{hidden}_L{layers}"
            hf_dir = build_model(folder / "hf", hidden, layers, max(4, hidden // 64), intermediate)
            for precision in args.precisions:
                kind, _, level = precision.partition(":")
                out = folder / precision.replace(":", "-acc")
                export_onnx(hf_dir, out, precision=kind, target="cpu", parity="none", show=False,
                            extra_options={"accuracy_level": int(level)} if level else None)
                one, batched = batched_decode_cost(out, args.new_tokens, batches=(1, BATCH))
                rows.append({"model": f"h{hidden} L{layers} i{intermediate}", "precision": precision,
                             "step_1_s": one["step_s"], f"step_{BATCH}_s": batched["step_s"],
                             "step_ratio": batched["step_s"] / one["step_s"],
                             "per_sequence_batched_s": batched["step_s"] / BATCH,
                             "ceiling": BATCH * one["step_s"] / batched["step_s"]})
                console.print(f"h{hidden} L{layers} {precision}: step {one['step_s'] * 1e3:.2f} ms (1 row), "
                              f"{batched['step_s'] * 1e3:.2f} ms ({BATCH} rows): ceiling {rows[-1]['ceiling']:.2f}x")
    summary = {"load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg()),
               "ceiling": {f"{r['model']} {r['precision']}": r["ceiling"] for r in rows}}
    notes = [f"ceiling = {BATCH} x step(batch 1) / step(batch {BATCH}): the most requests/s {BATCH} concurrent "
             "clients could get over one client if their decodes ran as one batched forward and nothing else "
             "(HTTP, prefill, tokenizer, Python) cost anything.",
             "og.Generator greedy decode, one prompt repeated batch_size times (no padding), median step of "
             f"{args.new_tokens - 2} steps x 4 repeats, in this process; models: random weights, Phi-3 vocabulary."]
    config = {"shapes": [list(s) for s in args.shapes], "precisions": args.precisions, "batch": BATCH,
              "new_tokens": args.new_tokens}
    path = save_result(args.out, "batch_ceiling", "small", "cpu", config, rows, summary, notes,
                       wall_s=time.perf_counter() - started)
    print_table(f"decode step, og.Generator batch 1 vs {BATCH}", rows,
                [Column("model", "model", justify="left"), Column("precision", "precision", justify="left"),
                 Column("step_1_s", "1 row", lambda x: f"{x * 1e3:.2f} ms"),
                 Column(f"step_{BATCH}_s", f"{BATCH} rows", lambda x: f"{x * 1e3:.2f} ms"),
                 Column("per_sequence_batched_s", "per row", lambda x: f"{x * 1e3:.2f} ms"),
                 Column("ceiling", "ceiling", lambda x: f"{x:.2f}x")], console=console)
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
