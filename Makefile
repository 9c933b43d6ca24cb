# The README's commands. `make setup` builds .venv (CPU torch pin first, then the project editable
# with its test extras); every other target sets up first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a plain unpinned `torch` pulls several GB of CUDA packages.
# Override for a GPU machine, e.g. `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test test-fast demo app screenshots bench bench-full clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: setup  ## the whole suite, slow end-to-end tests included (what CI runs)
	$(PY) -m pytest

test-fast: setup  ## everything but the tests marked slow
	$(PY) -m pytest -m "not slow"

demo: setup  ## build the tiny model, train LoRA and DoRA on the sample subject, write outputs/demo/
	$(VENV)/bin/dora-diffusion demo --output outputs/demo --overwrite

app: setup  ## the Gradio app on http://127.0.0.1:7860 (after `make demo`, its LoRA and DoRA are preselected)
	$(VENV)/bin/dora-diffusion app --outputs outputs

screenshots: setup  ## README screenshots of the app (needs chromium)
	$(PY) app/screenshots.py --out docs/screenshots

bench: setup  ## CPU benchmark: training step time and peak memory, medium SDXL-shaped UNet
	$(PY) benchmarks/bench_adapters.py --size medium --out benchmarks/results/cpu-medium.json

bench-full: setup  ## the full-size SDXL UNet (needs a CUDA GPU)
	$(PY) benchmarks/bench_adapters.py --size full --device cuda --dtype bfloat16 --resolution 1024 --out benchmarks/results/gpu-full.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
