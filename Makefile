# The two entry points of the README. Both create .venv from pyproject.toml on first use.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: search test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job on its embedded default: local Ray, synthetic demo data, MLflow in ./mlflow.db.
search: $(STAMP)
	$(VENV)/bin/python search/run.py --num-samples 40

# The whole test suite on CPU (slow end-to-end tests included).
test: $(STAMP)
	$(VENV)/bin/python -m pytest
