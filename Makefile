# The two commands of the README. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC stages call `python` and `metarec-audit`: take them from the project's environment.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: audit test install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# dvc.lock is one of the signed subjects and DVC rewrites it after every stage, so signing runs
# after `dvc repro`, not inside it. `metarec-audit repro` is `dvc repro` with the stale cells of the
# models x seeds matrix run concurrently (docs/DESIGN.md, "The matrix").
audit: $(STAMP)
	$(BIN)/metarec-audit repro
	$(BIN)/metarec-audit sign
	@$(BIN)/metarec-audit summary

test: $(STAMP)
	$(BIN)/python -m pytest -q
