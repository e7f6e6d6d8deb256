# The two commands the README leads with. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned builds that pip takes from the local wheel cache on the dev/CI machines; override for other setups,
# e.g. `make test TORCH_SPEC="torch==2.11.0"` on a GPU box.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.kfac-installed

.PHONY: demo demo-digits test bench clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

demo-digits: $(STAMP)
	$(PY) examples/digits_demo.py

test: $(STAMP)
	$(PY) -m ruff check kfac tests benchmarks examples
	$(PY) -m mypy
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/cpu/step_overhead.py --profile

clean:
	rm -rf $(VENV) build *.egg-info
