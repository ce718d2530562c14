# Two commands for a new user (see README.md):
#   make pipeline   runs the whole DVC pipeline on the embedded default (dvc repro)
#   make test       runs the test suite
# Both create .venv from uv.lock first (installing uv if needed).

PY := .venv/bin/python

.PHONY: setup pipeline test test-fast bench mlflow-ui

setup:
	@bash scripts/bootstrap.sh

pipeline: setup
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "make pipeline: run it in a git clone (DVC needs git)"; exit 2; }
	PATH="$(CURDIR)/.venv/bin:$$PATH" dvc repro

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(PY) bench/run_all.py

mlflow-ui: setup
	.venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
