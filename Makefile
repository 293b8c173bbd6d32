PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT := flask_durable tests $(wildcard benchmarks examples)

.PHONY: demo test lint bench docs clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,postgres]'
	touch $(STAMP)

demo: $(STAMP)
	cd examples/trip_booking && ../../$(BIN)/flask --app app run --port $${PORT:-5000}

test: $(STAMP)
	$(BIN)/ruff check $(LINT)
	$(BIN)/ruff format --check $(LINT)
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check $(LINT)
	$(BIN)/ruff format --check $(LINT)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q matplotlib
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

docs: $(STAMP)
	$(BIN)/pip install -q -r docs/requirements.txt
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
