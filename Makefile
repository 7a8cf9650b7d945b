# phi3local — common tasks. `make demo` and `make test` work on a fresh CPU-only machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXTRAS ?= export,dev
# CPU machines get the CPU torch wheel (the default PyPI torch is a multi-GB CUDA build).
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_CUDA),torch,torch==2.13.0)
SIZE ?= small

.PHONY: install demo test test-fast lint bench bench-kernels bench-train bench-gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$(EXTRAS)$(if $(HAS_CUDA),$(comma)cuda)]" || $(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

comma := ,

install: $(VENV)/.installed

# The whole pipeline on the embedded default: tiny Phi-3 model, sample chat data, CPU.
DEMO_ENV := PHI3LOCAL_CACHE=.demo/cache HF_HUB_OFFLINE=1
demo: install
	$(DEMO_ENV) $(VENV)/bin/phi3local train recipes/tiny-cpu.yaml output_dir=.demo/run --overwrite
	$(DEMO_ENV) $(VENV)/bin/phi3local merge .demo/run --out .demo/merged --overwrite
	$(DEMO_ENV) $(VENV)/bin/phi3local export .demo/merged --out .demo/onnx --precision fp32 --target cpu --overwrite
	$(DEMO_ENV) $(VENV)/bin/phi3local chat .demo/onnx --prompt "What is 12 plus 7?" --max-new-tokens 24

test: install
	$(PY) -m pytest tests -q -x --durations=15

lint: install
	$(VENV)/bin/ruff check phi3local tests kernels_bench

bench: install
	$(PY) -m kernels_bench.run_all --size $(SIZE)

bench-kernels: install
	$(PY) -m kernels_bench.run_all --size $(SIZE) --only kernels

bench-train: install
	$(PY) -m kernels_bench.run_all --size $(SIZE) --only train

bench-gpu: install
	$(PY) -m kernels_bench.run_all --size full

clean:
	rm -rf .demo runs exports .pytest_cache .ruff_cache kernels_bench/results/*.png
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
