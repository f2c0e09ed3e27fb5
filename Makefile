# Every target installs what it needs into .venv first; all are safe to repeat.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench demo proto install clean

# requirements-schemathesis.txt includes requirements-dev.txt, which includes requirements.txt.
$(STAMP): requirements.txt requirements-dev.txt requirements-schemathesis.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-schemathesis.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) app.py

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/run.py

demo: $(STAMP)
	$(PY) demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

include proto.mk
