# Two self-sufficient commands (each creates .venv with the pinned
# requirements if it is missing or stale):
#   make run WORKDIR=/tmp/ncjax [ARGS="--config=configs/x.py --config.a=b"]
#   make test
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/synthetic
ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: run test lint format venv

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m ncjax.main --workdir=$(WORKDIR) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/python -m ruff check ncjax tests configs launch benchmarks
	$(VENV)/bin/python -m pyink --check ncjax tests configs launch benchmarks

format: $(STAMP)
	$(VENV)/bin/python -m pyink ncjax tests configs launch benchmarks
