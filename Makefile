# specserve developer entry points. `make test` is what CI runs (via .ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the ONNX Runtime build: cpu (onnxruntime) or gpu (onnxruntime-gpu); never both in one venv
ORT    ?= cpu
OTHER_ORT := $(if $(filter gpu,$(ORT)),onnxruntime,onnxruntime-gpu)
# Two installs, each marked by a stamp: serving (the ONNX Runtime build and the [serve] extra: no
# torch) and everything (plus [train], [archive] and [dev]: training, reprocessing, tests, benchmarks). The full install
# also satisfies serving.
SERVE_STAMP := $(VENV)/.specserve-serve-$(ORT)
FULL_STAMP  := $(VENV)/.specserve-full-$(ORT)
FULL_EXTRAS := serve,train,archive,dev
# where `make ship-models` builds the models it ships (emptied first)
SHIP_CACHE ?= build/ship-cache
export ORT_DISABLE_TELEMETRY := 1

.PHONY: install install-serve test serve models ship-models data inspect bench bench-embedded gpu-check \
	bench-preprocess bench-mc clean

PORT ?= 8001

# Create or reuse .venv and install the project (editable) with the ONNX Runtime build $(ORT) and
# the extras $(1). The other ONNX Runtime build is removed first: both provide the module
# onnxruntime, and pip would keep both.
define install_project
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip uninstall --quiet --yes $(OTHER_ORT) 2>/dev/null || true
	$(BIN)/python -m pip install --quiet --editable '.[$(ORT),$(1)]'
	$(BIN)/python -m pip check
	rm -f $(VENV)/.specserve-installed-* $(VENV)/.specserve-*-$(filter-out $(ORT),cpu gpu)
endef

$(SERVE_STAMP): pyproject.toml
	$(call install_project,serve)
	touch $@

$(FULL_STAMP): pyproject.toml
	$(call install_project,$(FULL_EXTRAS))
	touch $@ $(SERVE_STAMP)

install-serve: $(SERVE_STAMP)
install: $(FULL_STAMP)

test: $(FULL_STAMP)
	$(BIN)/python -m pytest

# Main job: serve the default models on localhost:$(PORT) until Ctrl-C. They ship in the package
# (runtime/models), so nothing is trained and serving installs no torch; a newer `make models`
# build in the cache is served instead (the server says which repository it serves, and why).
serve: $(SERVE_STAMP)
	$(BIN)/specserve serve --port $(PORT)

# (Re)train, evaluate and export every default model into the cache (<cache>/models), as a new version.
models: $(FULL_STAMP)
	$(BIN)/specserve models build

# Rebuild the shipped models from scratch (sets, training, export, variants: about 35 minutes on
# 2 cores) and copy them into runtime/models with their manifest; then commit runtime/models.
ship-models: $(FULL_STAMP)
	rm -rf $(SHIP_CACHE)
	$(BIN)/specserve models build --cache $(SHIP_CACHE)
	$(BIN)/specserve models ship --from $(SHIP_CACHE)/models

# Read every file of the data kit, then build the three benchmark sets into the cache.
data: $(FULL_STAMP)
	$(BIN)/specserve data inspect
	$(BIN)/specserve data build giants stars cv

inspect: $(SERVE_STAMP)
	$(BIN)/specserve data inspect

# Every serving benchmark, side by side, into BENCHMARKS.md (on the default repository: the shipped
# models, or a newer cache build). About 5 minutes on 2 cores.
bench: $(FULL_STAMP)
	$(BIN)/specserve bench all --out BENCHMARKS.md

# Every default model and variant embedded (one thread, one process each) into BENCHMARKS.md.
bench-embedded: $(FULL_STAMP)
	$(BIN)/specserve bench embedded --out BENCHMARKS.md

# On a machine with a CUDA GPU (`make gpu-check ORT=gpu`, which installs onnxruntime-gpu in place of
# onnxruntime): parity on the CUDA provider (MC randomness included) and the benchmarks there;
# rewrites the CUDA section of BENCHMARKS.md. Exit 1 if a check fails.
gpu-check: $(FULL_STAMP)
	$(BIN)/specserve bench gpu --device cuda --out BENCHMARKS.md

bench-preprocess: $(SERVE_STAMP)
	$(BIN)/specserve bench preprocess

# One in-graph MC run (T = 64) against 64 separate runs, on the default repository's SPT.
bench-mc: $(SERVE_STAMP)
	$(BIN)/specserve bench mc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
