# Benchmarks against diffusers (see benchmarks/README.md). `make bench ARGS=--quick` for a smoke run.
PYTHON ?= .venv/bin/python
ARGS ?=

.PHONY: bench bench-quick
bench:
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.run $(ARGS)

bench-quick:
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.run --quick $(ARGS)
