# The README's commands. `make setup` builds .venv from the lock (requirements.lock: the exact versions
# the suite passed with, CPU torch pin first), then the project itself editable without dependencies;
# every other target sets up first if needed. `make lock` regenerates the lock from pyproject's ranges;
# `make test-latest` runs the suite against the newest releases in .venv-latest (not part of CI).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a plain unpinned `torch` pulls several GB of CUDA packages.
# Override for a GPU machine, e.g. `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
LOCK := requirements.lock
LATEST_VENV := .venv-latest

.PHONY: setup lock lint format test test-latest test-fast demo app screenshots bench bench-cpu-full bench-full clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

lock:  ## regenerate requirements.lock: resolve pyproject's ranges (test extras included) in a scratch venv
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[test]"
	( echo "# The exact versions the test suite passed with (make lock writes it; make setup installs it)."; \
	  echo "# Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())'), $(TORCH_SPEC) (CPU build)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^#' | sed -E 's/^(torch==[^+]*)\+cpu/\1/' ) > $(LOCK)
	rm -rf .venv-lock

test-latest:  ## the suite against the newest releases (torch at TORCH_SPEC), upper bounds lifted: the next break, early
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps -e .
	$(LATEST_VENV)/bin/python -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  reqs = [d.split(";", 1) for d in p["dependencies"] + p["optional-dependencies"]["test"] if not d.startswith("torch")]; \
	  print("\n".join(";".join([re.sub(r",?<[^,]*", "", r[0])] + r[1:]) for r in reqs))' > $(LATEST_VENV)/unbounded.txt
	$(LATEST_VENV)/bin/python -m pip install -q -U -r $(LATEST_VENV)/unbounded.txt "$(TORCH_SPEC)"  # torch stays at the pin
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(torch|diffusers|transformers|peft|accelerate|gradio|huggingface.hub)=='
	$(LATEST_VENV)/bin/python -m pytest

LINTED := dora_diffusion tests benchmarks app

lint: setup  ## ruff: the lint rules and the formatting (pyproject's [tool.ruff]); `make format` fixes what it can
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: setup  ## ruff format and the safe lint fixes, in place
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

test: setup lint  ## lint, then the whole suite, slow end-to-end tests included (what CI runs)
	$(PY) -m pytest

test-fast: setup  ## everything but the tests marked slow
	$(PY) -m pytest -m "not slow"

demo: setup  ## build the tiny model, train LoRA and DoRA on the sample subject, write outputs/demo/
	$(VENV)/bin/dora-diffusion demo --output outputs/demo --overwrite

app: setup  ## the Gradio app on http://127.0.0.1:7860 (after `make demo`, its LoRA and DoRA are preselected)
	$(VENV)/bin/dora-diffusion app --outputs outputs

screenshots: setup  ## README screenshots of the app (needs chromium; after `make demo`, of its runs)
	$(PY) app/screenshots.py --out docs/screenshots --workspace outputs

bench: setup  ## CPU benchmark: training step time and peak memory, medium SDXL-shaped UNet
	$(PY) benchmarks/bench_adapters.py --size medium --out benchmarks/results/cpu-medium.json

bench-cpu-full: setup  ## the full-size SDXL UNet on the CPU at 256 and 512 px: training step, memory, sampling (~15 min, 2 cores)
	$(PY) benchmarks/full_cpu.py --out-dir benchmarks/results

bench-full: setup  ## the full-size SDXL UNet (needs a CUDA GPU)
	$(PY) benchmarks/bench_adapters.py --size full --device cuda --dtype bfloat16 --resolution 1024 --out benchmarks/results/gpu-full.json

clean:
	rm -rf $(VENV) $(LATEST_VENV) .venv-lock .pytest_cache .hypothesis .ruff_cache
