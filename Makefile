# `make demo` renders the default prompt on the embedded default checkpoint; `make test` runs the tests.
# Both do the whole set-up first (scripts/setup.sh), so they work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	OMNIREEL_VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/omnireel render -o out.mp4

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/render.py
	$(PY) benchmarks/backbone.py
