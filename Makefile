# Benchmarks against diffusers (see benchmarks/README.md). `make bench ARGS=--quick` for a smoke run.
PYTHON ?= .venv/bin/python
ARGS ?=

.PHONY: bench bench-quick bench-caching bench-quant bench-gpu
bench:
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.run $(ARGS)

bench-quick:
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.run --quick $(ARGS)

# cache-dit vs diffcore step caching (needs `bash scripts/setup.sh --bench`), quantized / GGUF weights, the GPU script
bench-caching:
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.caching $(ARGS)

bench-quant:
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.quant $(ARGS)

bench-gpu:
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.gpu $(ARGS)
