"""Benchmarks of phi3local: kernels and the training loop against TRL (see README.md; run with run_all).

Besides one module per benchmark, the helpers they share (benchmark-only; the product never imports them):
- `common`: sizes, device and dtype, the shared data folder, synthetic packed rows.
- `timing`: warm-up + timed iterations + repeats, median and spread, CUDA-synchronised.
- `memory`: peak memory without tracemalloc (CUDA stats, profiler events, RSS).
- `isolate`: run one function in its own process (per-contender peak RSS).
- `report`: environment/versions, `<name>.json`, rich tables, PNG charts.
"""
