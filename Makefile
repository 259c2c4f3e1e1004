# TransferLab: `make run` opens the app on the built-in digits data, `make test` runs the tests.
# `make demo` runs the offline transfer experiment (scripts/demo.py: digits 0-4 -> 5-9).
# All create .venv with Python 3.10 and install everything first (scripts/setup.sh).
.PHONY: setup run test bench bench-train screenshots demo

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/transferlab $(ARGS)

# Tests in 2 processes (CI has 2 cores), a test file to each (its module fixtures are built once).
PYTEST_WORKERS ?= 2
test: setup
	.venv/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	.venv/bin/python benchmarks/ui_latency.py

bench-train: setup
	.venv/bin/python benchmarks/train_speed.py $(ARGS)

screenshots: setup
	.venv/bin/python scripts/screenshots.py

demo: setup
	.venv/bin/python scripts/demo.py $(ARGS)
