# Two commands do everything (README): `make demo` (CDG pre-training + evaluation + report on real
# CIFAR-10, sized for a 2-core CPU) and `make test`. Both create or reuse the venv in $(VENV).
PYTHON ?= python3
VENV ?= .venv
# The install pins torch for reproducibility; the package itself needs only torch>=2.1.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Data: $CDG_DATA if set, else ./data (as the CLI resolves it); the demo downloads CIFAR-10 there if absent.
CDG_DATA ?= $(CURDIR)/data
EPOCHS ?= 3
RUN ?= runs/demo-cdg
DEMO_ARGS ?=
export CDG_DATA
# glibc malloc costs a large share of a CPU training run (docs/design.md §7).
export MALLOC_MMAP_MAX_ = 0
export MALLOC_TRIM_THRESHOLD_ = 68719476736
export MALLOC_TOP_PAD_ = 1073741824
# Spinning OpenMP threads collapse throughput ~100x when the 2 cores are shared (measured in cdg.data.bench).
export OMP_WAIT_POLICY ?= PASSIVE

BIN := $(VENV)/bin

.PHONY: venv test demo bench clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: venv
	$(BIN)/python -m pytest

demo: venv
	@echo "== CDG SimCLR pre-training: ResNet-18 x0.25, G=4, CIFAR-10 (data: $(CDG_DATA)), $(EPOCHS) epochs"
	@if [ -f $(RUN)/checkpoints/last.ckpt ] && [ ! -f $(RUN)/backbone.pt ]; then \
	  $(BIN)/cdg pretrain --resume --out $(RUN); \
	elif [ ! -f $(RUN)/backbone.pt ]; then \
	  $(BIN)/cdg pretrain --config configs/cpu/simclr_cdg.yaml --out $(RUN) trainer.max_epochs=$(EPOCHS) data.download=true $(DEMO_ARGS); fi
	$(BIN)/cdg linear --fast --run $(RUN)
	$(BIN)/cdg linear --fast --random-init --run $(RUN)
	$(BIN)/cdg knn --run $(RUN)
	$(BIN)/cdg report --run $(RUN)

bench: venv
	$(BIN)/python benchmarks/bench_gated_conv.py
	$(BIN)/python benchmarks/bench_gate_kernel.py
	$(BIN)/python benchmarks/bench_framework_overhead.py
