# Two commands do all set-up on a fresh machine (Python 3.10+):
#   make demo   trains on the embedded demo data set, then captions a held-out demo image
#   make test   runs the test suite (CPU, offline)
# Each creates .venv and installs requirements.txt on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip -q
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) main.py --mode train

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/bench_decoder.py --json
	$(PY) bench/bench_scst.py
