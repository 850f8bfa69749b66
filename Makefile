# specserve developer entry points. `make test` is what CI runs (via .ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the ONNX Runtime build: cpu (onnxruntime) or gpu (onnxruntime-gpu); never both in one venv
ORT    ?= cpu
OTHER_ORT := $(if $(filter gpu,$(ORT)),onnxruntime,onnxruntime-gpu)
STAMP  := $(VENV)/.specserve-installed-$(ORT)
export ORT_DISABLE_TELEMETRY := 1

.PHONY: install test serve models data inspect bench gpu-check bench-preprocess bench-mc clean

PORT ?= 8001

# Create or reuse .venv and install the project (editable) with the ONNX Runtime build $(ORT) and
# the serve, train and dev extras. The other ONNX Runtime build is removed first: both provide
# the module onnxruntime, and pip would keep both.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip uninstall --quiet --yes $(OTHER_ORT) 2>/dev/null || true
	$(BIN)/python -m pip install --quiet --editable '.[$(ORT),serve,train,dev]'
	$(BIN)/python -m pip check
	rm -f $(VENV)/.specserve-installed-*
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# Main job: make sure the default model repository exists (built from the data kit on first run,
# about 25 minutes on 2 cores), then serve it on localhost:$(PORT) until Ctrl-C.
serve: $(STAMP)
	$(BIN)/specserve models build --if-missing
	$(BIN)/specserve serve --port $(PORT)

# (Re)build the default model repository: train, evaluate and export every default model.
models: $(STAMP)
	$(BIN)/specserve models build

# Read every file of the data kit, then build the three benchmark sets into the cache.
data: $(STAMP)
	$(BIN)/specserve data inspect
	$(BIN)/specserve data build giants stars cv

inspect: $(STAMP)
	$(BIN)/specserve data inspect

# Every serving benchmark, side by side, into BENCHMARKS.md (builds the default repository first if
# it is missing). About 5 minutes on 2 cores once the models exist.
bench: $(STAMP)
	$(BIN)/specserve models build --if-missing
	$(BIN)/specserve bench all --out BENCHMARKS.md

# On a machine with a CUDA GPU (`make gpu-check ORT=gpu`, which installs onnxruntime-gpu in place of
# onnxruntime): parity on the CUDA provider (MC randomness included) and the benchmarks there;
# rewrites the CUDA section of BENCHMARKS.md. Exit 1 if a check fails.
gpu-check: $(STAMP)
	$(BIN)/specserve models build --if-missing
	$(BIN)/specserve bench gpu --device cuda --out BENCHMARKS.md

bench-preprocess: $(STAMP)
	$(BIN)/specserve bench preprocess

# One in-graph MC run (T = 64) against 64 separate runs; needs the default repository (make models).
bench-mc: $(STAMP)
	$(BIN)/specserve bench mc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
