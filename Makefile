# Quick start: `make demo` (set up, write the trained demo checkpoint, export and build it, draw a grid) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SDTRT := $(VENV)/bin/sdtrt
STAMP := $(VENV)/.sdtrt-installed
# The CPU build is enough for the demo and the tests; on GPU servers install the CUDA build you want first
# (any torch already in the venv is kept).
TORCH_SPEC ?= torch==2.13.0
DEMO ?= demo

.PHONY: setup demo serve test lint trt-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'open-clip-torch>=2.20'  # CLIP's BPE vocabulary file only (see pyproject.toml)
	touch $@

# The demo: a trained toy checkpoint (sdtrt init-demo; tools/train_demo_model.py made it) exported, built with
# TensorRT-RTX ahead of time for Ada GPUs where it is installed (a real build; on a machine without that GPU,
# generate then takes ONNX Runtime), and a grid of prompts with their captions in $(DEMO)/demo.png.
DEMO_PROMPTS := "a red circle on a blue background" "a yellow triangle on a black background" \
	"a white square on a green background" "a blue circle on a yellow background" \
	"a green triangle on a white background" "a black square on a red background"
demo: setup
	$(SDTRT) init-demo $(DEMO)/checkpoint --overwrite
	$(SDTRT) export $(DEMO)/checkpoint $(DEMO)/workdir
	@if $(PY) -c "import tensorrt_rtx" 2>/dev/null; then \
		echo "$(SDTRT) build $(DEMO)/workdir --tensorrt rtx --target sm89"; \
		$(SDTRT) build $(DEMO)/workdir --tensorrt rtx --target sm89; \
	else echo "demo: tensorrt_rtx is not installed: no engines built"; fi
	@i=0; for p in $(DEMO_PROMPTS); do i=$$((i + 1)); \
		echo "$(SDTRT) generate $(DEMO)/workdir \"$$p\" --seed $$i -o $(DEMO)/demo-$$i.png"; \
		$(SDTRT) -q generate $(DEMO)/workdir "$$p" --seed $$i -o $(DEMO)/demo-$$i.png || exit 1; done
	$(PY) -m sdtrt.demo.grid $(DEMO)/demo.png $(DEMO)/demo-[0-9]*.png
	@echo "demo: wrote $(DEMO)/demo.png (64x64 pictures, enlarged, each under its prompt)"

serve: demo
	$(SDTRT) serve $(DEMO)/workdir --backend onnxruntime

lint: setup
	$(VENV)/bin/ruff check sdtrt tests benchmarks

trt-check:
	@if [ -f ../shared/trt-api/check.py ]; then $(PYTHON) ../shared/trt-api/check.py sdtrt; else echo "trt-check: ../shared/trt-api/check.py not found, skipped"; fi

test: setup lint trt-check
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache

# Mutation testing of the core modules (mutmut, each group with its own tests; not part of CI or `make test`).
# Score and survivors: benchmarks/results/mutation-<date>.md. MUTATION_GROUPS="img2img batcher" for some groups,
# "schedulers" for every scheduler module (hours on 2 cores); `$(PY) benchmarks/mutation.py --list` lists them.
MUTATION_GROUPS ?=
.PHONY: mutation
mutation: setup
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q "mutmut>=3.8,<4"
	$(PY) benchmarks/mutation.py $(MUTATION_GROUPS)
