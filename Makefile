# The two commands of README.md. Both set everything up on a fresh machine and are fast on a second run.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
PORT ?= 9997
PYTEST_ARGS ?=

.PHONY: setup serve test

setup:
	@bash build_scripts/setup_env.sh

## make serve [MODEL=/path/to/checkpoint] [PORT=9997]: tritonserver + OpenAI frontend until Ctrl-C
serve: setup
	@$(PY) -m vlm_triton.cli serve --port $(PORT) $(if $(MODEL),--checkpoint $(MODEL))

## make test: the whole suite (unit tiers, then e2e on a real tritonserver)
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)
