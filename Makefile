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

.PHONY: install install-azure install-gguf azurite demo test lint bench bench-kernels bench-train bench-serve bench-gpu bench-gpu-train bench-ddp bench-real-size gpu-check gpu-check-dry gpu-wheels clean

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

# GGUF/Ollama export: llama-cpp-python built from its sdist (PyPI has no Linux wheel; 13.6 min measured on 2 busy cores, then
# pip's wheel cache makes it seconds: keep ~/.cache/pip between CI runs), and llama.cpp's converter
# (convert_hf_to_gguf.py, conversion/, gguf-py/), which the wheel does not ship, taken from the same sdist.
# Not part of `install`, so never in `make demo`'s path.
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
GGUF_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF
LLAMA_CPP_DIR := $(VENV)/share/phi3local/llama.cpp
LLAMA_CPP_SDIST := llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)

$(VENV)/.installed-gguf: $(VENV)/.installed
	CMAKE_ARGS="$(GGUF_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install -q "llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)" "gguf==0.19.0"
	rm -rf $(VENV)/share/phi3local/sdist $(LLAMA_CPP_DIR) && mkdir -p $(LLAMA_CPP_DIR)
	$(PIP) download -q --no-deps --no-binary :all: -d $(VENV)/share/phi3local/sdist \
		"llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)"
	tar -xzf $(VENV)/share/phi3local/sdist/$(LLAMA_CPP_SDIST).tar.gz -C $(LLAMA_CPP_DIR) --strip-components=3 \
		$(LLAMA_CPP_SDIST)/vendor/llama.cpp/convert_hf_to_gguf.py $(LLAMA_CPP_SDIST)/vendor/llama.cpp/conversion \
		$(LLAMA_CPP_SDIST)/vendor/llama.cpp/gguf-py $(LLAMA_CPP_SDIST)/vendor/llama.cpp/LICENSE
	rm -rf $(VENV)/share/phi3local/sdist
	$(PY) -c "import llama_cpp, gguf; print('llama-cpp-python', llama_cpp.__version__)"
	touch $@

install-gguf: $(VENV)/.installed-gguf

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
test: install install-azure azurite install-gguf
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

# Phi-3-mini and Phi-4-mini at their real 3.8B size (seeded random weights at the real shapes), every stage through
# the CLI, against TRL: about 1.5 hours on 2 CPU cores, 16 GB of disk, up to ~20 GB of RAM. Not part of make test.
bench-real-size: install
	$(PY) -m kernels_bench.real_size

# On a lent GPU machine (no package index there): Phi-3-mini at real size against TRL and Unsloth, the plan against
# CUDA's max allocated, the int4 CUDA export; at most 8 minutes on one H100. See kernels_bench/gpu_check.py.
# It runs with the machine's own Python (a venv would not fit what can be carried there) and this checkout on the path.
# On a lent GPU machine (no package index; torch, transformers, peft, accelerate preinstalled): the wheels that
# `make gpu-wheels` put in runs/gpu-wheels here (carry them), then the check (<= 8 min; results/gpu_check.json).
gpu-check:
	if ls runs/gpu-wheels/*.whl >/dev/null 2>&1; then $(PYTHON) -m pip install -q --no-index --no-deps runs/gpu-wheels/*.whl; fi
	PYTHONPATH=$(CURDIR) $(PYTHON) -m kernels_bench.gpu_check

gpu-check-dry: install
	$(PY) -m kernels_bench.gpu_check --dry-run

gpu-wheels: install
	$(PY) -m kernels_bench.gpu_check --wheels

clean:
	rm -rf .demo runs exports .pytest_cache .ruff_cache kernels_bench/results/*.png
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
