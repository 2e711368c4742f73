# disc_pl — every target installs what it needs first (a fresh clone needs nothing else).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: install lint run test test-fast bench sweep clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default dataset (trains the models it needs on first use).
run: $(STAMP)
	$(PY) -m disc_pl.run $(ARGS)

## ruff (pyproject [tool.ruff]), then the whole test suite (slow tests included, as in CI).
## DISC_PL_TEST_SEED=1 make test shifts the seed of every model the suite trains.
lint: $(STAMP)
	$(PY) -m ruff check src tests

test: lint
	$(PY) -m pytest -q $(ARGS)

test-fast: lint
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) -m disc_pl.bench $(ARGS)

## The paper's Table 1 ablation as a Hydra multirun on the synthetic dataset.
sweep: $(STAMP)
	$(PY) -m disc_pl.evaluate -m experiment=table1 $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
