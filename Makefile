# The README's contract: `make test` and `make demo` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch's CPU wheel first, so the test/convert extras' `torch>=2.4` is already met
# (an unpinned torch would pull a multi-GB CUDA build).
TORCH_CPU := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e ".[test,demo]"
	touch $@

setup: $(VENV)/.installed

test: setup
	JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 $(VENV)/bin/pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# The demo is a CPU job by design; the test extra's libtpu would otherwise make JAX probe for TPUs.
demo: setup
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(VENV)/bin/radfm-jax demo

bench: setup
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info
