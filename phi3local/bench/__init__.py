"""Small reusable helpers for the benchmarks in `kernels_bench/`: timing, peak memory, reports.

- `phi3local.bench.timing`: warm-up + timed iterations + repeats, median and spread, CUDA-synchronised.
- `phi3local.bench.memory`: peak memory without tracemalloc (CUDA stats, profiler events, RSS).
- `phi3local.bench.isolate`: run one function in its own process (per-contender peak RSS).
- `phi3local.bench.report`: environment/versions, `<name>.json`, rich tables, PNG charts.
"""
