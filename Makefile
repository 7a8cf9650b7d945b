# phi3local — common tasks. `make demo` and `make test` work on a fresh CPU-only machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXTRAS ?= export,serve,mlflow,dev
# azure-ai-ml and azureml-inference-server-http pin clashing opentelemetry versions: the Azure side gets a venv of its own.
VENV_AZURE ?= .venv-azure
AZURITE_VERSION ?= 3.35.0
AZURITE := .tools/node_modules/.bin/azurite-blob
# CPU machines get the CPU torch wheel (the default PyPI torch is a multi-GB CUDA build).
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_CUDA),torch,torch==2.13.0)
SIZE ?= small

.PHONY: install install-azure azurite demo test lint bench bench-kernels bench-train bench-serve bench-gpu bench-gpu-train bench-ddp clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$(EXTRAS)$(if $(HAS_CUDA),$(comma)cuda)]" || $(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

comma := ,

install: $(VENV)/.installed

# Light on purpose: the Azure commands import no torch, so phi3local goes in without its training dependencies.
$(VENV_AZURE)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_AZURE)
	$(VENV_AZURE)/bin/pip install -q --upgrade pip
	$(VENV_AZURE)/bin/pip install -q "azure-ai-ml==1.35.2" "azure-identity>=1.15" "azure-storage-blob==12.31.1" \
		"pyyaml>=6" "rich>=13" "pytest>=8"
	$(VENV_AZURE)/bin/pip install -q --no-deps -e .
	touch $@

install-azure: $(VENV_AZURE)/.installed

# Azurite, the Azure Storage emulator the upload tests run against (pinned: the last release for Node 20).
$(AZURITE): tools/install-azurite.sh
	AZURITE_VERSION=$(AZURITE_VERSION) tools/install-azurite.sh

azurite: $(AZURITE)

# The whole pipeline on the embedded default: tiny Phi-3 model, sample chat data, CPU.
DEMO_ENV := PHI3LOCAL_CACHE=.demo/cache HF_HUB_OFFLINE=1
demo: install
	$(DEMO_ENV) $(VENV)/bin/phi3local train recipes/tiny-cpu.yaml output_dir=.demo/run --overwrite
	$(DEMO_ENV) $(VENV)/bin/phi3local merge .demo/run --out .demo/merged --overwrite
	$(DEMO_ENV) $(VENV)/bin/phi3local export .demo/merged --out .demo/onnx --precision fp32 --target cpu --overwrite
	$(DEMO_ENV) $(PY) -m phi3local.demo_report .demo/run .demo/onnx

# Every test runs (no -x): both suites run and the target fails if either did, so CI reports every failure.
test: install install-azure azurite
	@status=0; \
	$(PY) -m pytest tests --ignore=tests/azure -q --durations=15 || status=1; \
	$(VENV_AZURE)/bin/python -m pytest tests/azure -q --durations=5 || status=1; \
	exit $$status

lint: install
	$(VENV)/bin/ruff check phi3local tests kernels_bench

bench: install
	$(PY) -m kernels_bench.run_all --size $(SIZE)

bench-kernels: install
	$(PY) -m kernels_bench.run_all --size $(SIZE) --only kernels

bench-train: install
	$(PY) -m kernels_bench.run_all --size $(SIZE) --only train

bench-serve: install
	$(PY) -m kernels_bench.serve_speed

bench-gpu: install
	$(PY) -m kernels_bench.run_all --size full

# The end-to-end GPU comparison alone, one round: what fits a short loan of a GPU machine.
bench-gpu-train: install
	$(PY) -m kernels_bench.run_all --size full --bench train_e2e --repeats 1

bench-ddp: install
	$(PY) -m kernels_bench.ddp_throughput

clean:
	rm -rf .demo runs exports .pytest_cache .ruff_cache kernels_bench/results/*.png
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
