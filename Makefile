# Set-up on a fresh machine: `make demo` or `make test` (each creates .venv and installs first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,tflite,executorch,npu
STAMP  := $(VENV)/.installed-$(EXTRAS)
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: install emulator emulator-arm64 demo demo-full test test-fast docs clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

# QEMU user mode, for the tests that run ONNX Runtime on an emulated AVX2 CPU from any x86 host. Installed
# where apt-get runs as root; elsewhere those tests skip and say why.
emulator:
	@command -v qemu-x86_64 >/dev/null 2>&1 || [ "$$(uname -m)" != x86_64 ] || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q qemu-user >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q qemu-user >/dev/null 2>&1; }; }; } || \
	echo "qemu-user could not be installed: the emulated-CPU tests will skip"

# ARM64 for `check --emulate cortex-a76` and its tests: a static qemu-aarch64 10 (Debian trixie) and an arm64
# sysroot (bookworm's Python 3.11, the aarch64 wheels of numpy, ONNX Runtime and LiteRT), built once into
# ~/.cache/ulsam-deploy/arm64 (about 150 MB fetched, 240 MB on disk); nothing on the system is installed or
# changed. Where it cannot be built (no apt-get, no network) those tests skip and say why.
emulator-arm64: install
	@$(BIN)/python scripts/emulator-arm64.py || \
	echo "the ARM64 emulation environment could not be built: the emulated ARM64 tests will skip"

# the headline: Fashion-MNIST at 112 px, and its MV2 baseline trained with the same recipe
MODEL  ?= models/mv2-ulsam-13-14-16-17-g4-fashion-112
VS     ?= models/mv2-fashion-112

# `make demo` is a first look sized for about 5 minutes on 2 cores after install: the gate on the first
# DEMO_IMAGES of the 10,000 test images, the benchmark of ONNX Runtime (fp32, INT8) without parity columns
# (the gate has them). `make demo-full` runs the same steps on everything: all images, every backend.
DEMO_IMAGES ?= 1000

demo: install
	$(BIN)/ulsam-deploy profile --paper
	$(BIN)/ulsam-deploy profile --model $(MODEL)
	$(BIN)/ulsam-deploy evaluate --model $(MODEL)
	$(BIN)/ulsam-deploy export --model $(MODEL) --formats cpu
	$(BIN)/ulsam-deploy check --model $(MODEL) --formats cpu --threads 2 --images $(DEMO_IMAGES)
	$(BIN)/ulsam-deploy inspect --model $(MODEL) --formats onnx-int8,tflite-int8 --images 256 --plot runs/inspect.png
	$(BIN)/ulsam-deploy bench --model $(MODEL) --vs $(VS) --backend onnxruntime --runs 50 --no-parity
	@echo "demo: the gate ran on the first $(DEMO_IMAGES) of the 10,000 test images, the benchmark on ONNX Runtime; 'make demo-full' runs all of it"

demo-full: install
	$(BIN)/ulsam-deploy profile --paper
	$(BIN)/ulsam-deploy profile --model $(MODEL)
	$(BIN)/ulsam-deploy evaluate --model $(MODEL)
	$(BIN)/ulsam-deploy export --model $(MODEL) --formats cpu
	$(BIN)/ulsam-deploy check --model $(MODEL) --formats cpu --threads 2
	$(BIN)/ulsam-deploy inspect --model $(MODEL) --formats onnx-int8,tflite-int8 --images 256 --plot runs/inspect.png
	$(BIN)/ulsam-deploy bench --model $(MODEL) --vs $(VS) --backend all --runs 50

# pytest exits 5 when it collects nothing; that is reported, not treated as a crash. The suite runs in
# TEST_WORKERS processes (pytest-xdist, one test file per process at a time), then the tests marked `serial`
# (they time something) alone. The 30 slowest tests are listed at the end of each part, to keep the suite short.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q
define run_pytest
$(PYTEST) $(1); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; [ $$rc -eq 0 ]
endef

test: install emulator emulator-arm64
	@$(call run_pytest,-n $(TEST_WORKERS) --dist loadfile -m "not serial" --durations=30)
	@$(call run_pytest,-m serial --durations=30)

test-fast: install
	@$(call run_pytest,-n $(TEST_WORKERS) --dist loadfile -m "not slow and not serial")

# The documentation site (README.md is its front page): mkdocs.yml, docs/; built into site/.
$(DOCS_STAMP): pyproject.toml constraints.txt | $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS),docs]'
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs site .pytest_cache

# On a machine with an NVIDIA GPU and TensorRT (pip install 'ulsam-deploy[tensorrt]'): engines, check, bench.
gpu-check: install
	bash scripts/gpu-check.sh
