# anpi-call-scheduler: every entry point creates or reuses its virtualenvs first,
# so `make demo` and `make test` work on a fresh clone with nothing else run before.
PYTHON ?= python3
VENV := .venv
EMULATOR_VENV := .venv-emulator
PY := $(VENV)/bin/python

.PHONY: help venv test lint pytest demo bench clean

help:
	@echo "make demo   run the job end to end on a local stack (MariaDB, Cloud Tasks emulator, webhook)"
	@echo "make test   lint and run the whole test suite"
	@echo "make venv   create .venv only (for a run of your own: the README's \"A run of your own\")"
	@echo "make bench  measure throughput and memory (the tables of docs/performance.md)"
	@echo "make clean  remove the virtualenvs and caches"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "python3 cannot create virtualenvs; fix with: sudo apt-get install -y python3-venv" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

$(EMULATOR_VENV)/.installed: requirements-emulator.txt
	$(PYTHON) -m venv $(EMULATOR_VENV)
	$(EMULATOR_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-emulator.txt
	@touch $@

venv: $(VENV)/.installed

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check main.py
	$(PY) -m mypy main.py

# One worker per core; a file's tests stay on one worker (--dist loadfile).
pytest: $(VENV)/.installed $(EMULATOR_VENV)/.installed
	$(PY) -m pytest -n auto --dist loadfile

test: lint pytest

demo: $(VENV)/.installed $(EMULATOR_VENV)/.installed
	$(PY) demo.py $(DEMO_FLAGS)

bench: $(VENV)/.installed
	$(PY) bench.py

clean:
	rm -rf $(VENV) $(EMULATOR_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
