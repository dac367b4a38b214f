# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The pinned versions (make lock): the venv gets exactly these, then the project itself, editable.
LOCK := requirements/dev.txt

.PHONY: venv test serve bench lock clean

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

# The engine in the foreground: trains default models if none exist, starts a Ray head on
# MLE_RAY_PORT (6380), deploys the Serve graph on MLE_HTTP_PORT (8000), replays the sample.
# Ctrl-C / SIGTERM stops what it started. See README "make serve".
serve: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m deployments.launcher

bench: $(STAMP)
	$(PY) bench/features.py
	$(PY) bench/log_writer.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
