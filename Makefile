# apet-bench. `make run` and `make test` install what they need first (into .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.apet-bench-installed

.PHONY: install lock run test lint clean-runs tables table1 table2 table3 table4 table5 table6 table7

install: $(STAMP)

## Regenerate requirements/lock-{cpu,cuda}.txt from pyproject.toml (uv) and print what changed.
lock:
	@if [ -x $(VENV)/bin/uv ]; then UV=$(VENV)/bin/uv bash scripts/lock.sh; else bash scripts/lock.sh; fi

$(STAMP): pyproject.toml requirements/lock-cpu.txt requirements/lock-cuda.txt scripts/install.sh
	bash scripts/install.sh $(VENV)

## The main job on the embedded default (tiny random-weight LLaVA-1.5, methods none + random, demo photos).
run: $(STAMP)
	$(PY) run.py

## The test suite (offline; uses ../shared/benchmarks when present).
test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

## Paper tables. `make table1 ARGS="model=tiny_llava15 data_root=../shared/benchmarks"`: run the
## experiment's sweep (finished runs are skipped), then aggregate results/runs/ into the table.
## ARGS are extra Hydra overrides for the sweep; TABLE_ARGS extra options for the aggregator.
ARGS ?=
TABLE_ARGS ?=
## The sweep runs through apet_bench.sweep (same config as run.py; a cell that cannot run is recorded as
## missing with its reason instead of ending the sweep); table5/table6 also run their Qwen2.5-VL half.
## The table is printed even when some evaluation failed; the target then exits with the sweep's code.
table1 table2 table3 table4 table5 table6: $(STAMP)
	@rc=0; \
	$(PY) -m apet_bench.sweep experiment=$@ $(ARGS) || rc=$$?; \
	if [ -f configs/experiment/$@_qwen.yaml ]; then $(PY) -m apet_bench.sweep experiment=$@_qwen $(ARGS) || rc=$$?; fi; \
	$(PY) -m apet_bench.tables $@ $(ARGS) $(TABLE_ARGS) || exit $$?; \
	exit $$rc

## Table 7 (efficiency): meta-device TFLOPs everywhere, GPU timing where a GPU is present.
table7: $(STAMP)
	$(PY) -m apet_bench.tables.table7 $(TABLE_ARGS)

## Aggregate only (every table from results/runs/, plus the accuracy-efficiency plots).
tables: $(STAMP)
	$(PY) -m apet_bench.tables all $(TABLE_ARGS)
	$(PY) -m apet_bench.plots $(TABLE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src baselines tests run.py

## Remove generated runs (results/runs is git-ignored).
clean-runs:
	rm -rf results/runs results/hydra
