"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only``.

Small CPU sizes by default, real ones on a GPU. Override with environment
variables: ``PYFASTPO_BENCH_SIZES`` ("NxTxV[xH],..."), ``PYFASTPO_BENCH_DTYPE``
(float32, bfloat16, float16), ``PYFASTPO_BENCH_DEVICE`` (cpu, cuda). The full
sweep with peak memory, bandwidth, correctness, tables and plots is
``python -m pyfastpo.bench``; these suites reuse its contenders and inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from pyfastpo.bench.data import parse_sizes

DEVICE = torch.device(os.environ.get("PYFASTPO_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
_GPU = DEVICE.type == "cuda"
SIZES = parse_sizes(
    os.environ.get("PYFASTPO_BENCH_SIZES", "8x1024x128256,8x2048x151936" if _GPU else "2x64x32000,2x64x128256"),
    default_h=4096 if _GPU else 256,
)
DTYPE = getattr(torch, os.environ.get("PYFASTPO_BENCH_DTYPE", "bfloat16" if _GPU else "float32"))
ROUNDS = 20 if _GPU else 5


@pytest.fixture
def bench_setup():
    """(device, dtype, rounds) for the suites."""
    return DEVICE, DTYPE, ROUNDS
