# The two entry points of the README. Both create .venv from pyproject.toml on first use.
# The first Python of 3.11 (what CI runs), 3.12 and 3.13 that starts here; PYTHON=... overrides.
PYTHON ?= $(firstword $(foreach p,python3.11 python3.12 python3.13,\
            $(shell $(p) -c '' >/dev/null 2>&1 && echo $(p))))
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: search test

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: need python3.11, python3.12 or python3.13" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job on its embedded default: local Ray, synthetic demo data, MLflow in ./mlflow.db.
search: $(STAMP)
	$(VENV)/bin/python search/run.py --num-samples 40

# Lint and format check (ruff), then the whole test suite on CPU (slow end-to-end tests included).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest
