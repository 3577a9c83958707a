# Two commands do all the set-up: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: install serve test lint bench-step-cost clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so no multi-GB CUDA build is pulled on a CPU machine
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
	$(PIP) install -q -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

serve: install
	PORT=$(PORT) $(VENV)/bin/das-service serve

test: install
	$(PY) -m pytest -q -rs

lint: install
	$(VENV)/bin/ruff check .

bench-step-cost: install
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) var .pytest_cache
