# The README's two commands: `make demo` (set up + main job), `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU-only machines take the CPU build of torch that pip finds locally; a machine
# with an NVIDIA GPU takes the default (CUDA) build.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP  := $(VENV)/.pyfastpo-installed
# The package is installed (with the dev and bench extras: the bench extra brings
# Liger-Kernel and Cut Cross-Entropy, which `make demo`'s bench runs beside pyfastpo)
# under a constraint that keeps that torch: otherwise a dependency (trl, peft,
# liger-kernel, ...) could pull a multi-GB CUDA build.

.PHONY: setup lint test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" triton==3.8.0 numpy
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev,bench]"
	touch $(STAMP)

# Lint and format (ruff, configured in pyproject.toml; the same hooks run from
# .pre-commit-config.yaml). `ruff format .` fixes the layout.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Triton kernels run on the CPU under the interpreter when no GPU is present
# (tests/conftest.py sets TRITON_INTERPRET=1 in that case).
test: setup lint
	$(PY) -m pytest -q tests

# OMP_WAIT_POLICY=passive: idle OpenMP threads sleep instead of spinning, which
# keeps CPU timings stable on a small shared machine.
demo: setup
	OMP_WAIT_POLICY=passive $(PY) -m pyfastpo.bench --quick
	OMP_WAIT_POLICY=passive $(PY) -m pyfastpo.demo
	OMP_WAIT_POLICY=passive $(PY) examples/train_tiny_dpo.py --out out/tiny_dpo

bench: setup
	$(PY) -m pyfastpo.bench

clean:
	rm -rf build *.egg-info pyfastpo/*.so pyfastpo/backends/*.so $(VENV)
