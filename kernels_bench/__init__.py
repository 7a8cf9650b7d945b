"""Benchmarks of phi3local: kernels and the training loop against TRL (see README.md; run with run_all)."""
