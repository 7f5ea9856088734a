# Quick start: `make demo` (set up, make the tiny random checkpoint, export it, generate an image) and `make test`.
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

demo: setup
	$(SDTRT) init-random $(DEMO)/checkpoint --arch tiny-sd1 --seed 0 --overwrite
	$(SDTRT) export $(DEMO)/checkpoint $(DEMO)/workdir
	$(SDTRT) generate $(DEMO)/workdir "a photo of an astronaut riding a horse" --steps 30 --seed 0 -o $(DEMO)/demo.png
	@echo "demo: wrote $(DEMO)/demo.png (random weights: expect colourful noise, not a picture)"

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
