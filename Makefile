# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The pinned versions (make lock): the venv gets exactly these, then the project itself, editable.
LOCK := requirements/dev.txt

.PHONY: venv test serve bench lock clean shipped-models

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Re-resolve requirements/{dev,train,serve}.txt from pyproject.toml (after changing a dependency,
# or to take newer releases); commit the result. scripts/lock.sh says what each file is for.
lock: $(STAMP)
	UV=$(VENV)/bin/uv bash scripts/lock.sh

test: $(STAMP)
	bash scripts/services.sh
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest $(PYTEST_ARGS)

# The engine in the foreground: installs the shipped models (data/models) if models/ has none, starts a Ray head on
# MLE_RAY_PORT (6380), deploys the Serve graph on MLE_HTTP_PORT (8000), replays the sample.
# Ctrl-C / SIGTERM stops what it started. See README "make serve".
serve: $(STAMP)
	exec env RAY_USAGE_STATS_ENABLED=0 $(PY) -m deployments.launcher

# The model set committed in data/models (what make serve installs when models/ has none): retrained
# from scratch on the full history (~5 min on 2 cores). Run it after changing features, labels or
# model parameters -- tests/test_shipped_models.py fails until the shipped set matches the code.
SHIPPED_DATA ?= ../shared/data
shipped-models: $(STAMP)
	test -f $(SHIPPED_DATA)/BTCUSDT_5m.parquet -a -f $(SHIPPED_DATA)/ETHUSDT_5m.parquet
	rm -rf data/models
	$(PY) -m training.train --candles $(SHIPPED_DATA)/BTCUSDT_5m.parquet $(SHIPPED_DATA)/ETHUSDT_5m.parquet \
	    --out data/models --json > data/models-train.json.tmp
	mv data/models-train.json.tmp data/models/train.json   # the run's figures (walk-forward, timings)

bench: $(STAMP)
	$(PY) bench/features.py
	$(PY) bench/log_writer.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
