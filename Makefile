# apet-bench. `make run` and `make test` install what they need first (into .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.apet-bench-installed

.PHONY: install run test lint clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml scripts/constraints.txt scripts/install.sh
	bash scripts/install.sh $(VENV)

## The main job on the embedded default (tiny random-weight LLaVA-1.5, methods none + random, demo photos).
run: $(STAMP)
	$(PY) run.py

## The test suite (offline; uses ../shared/benchmarks when present).
test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src baselines tests run.py

## Remove generated runs (results/runs is git-ignored).
clean-runs:
	rm -rf results/runs results/hydra
