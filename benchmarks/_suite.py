"""What both suites share: build a contender (or skip the test with its reason) and time
one forward+backward per round with pytest-benchmark, fresh inputs prepared untimed."""

from __future__ import annotations

import pytest
import torch

from pyfastpo.bench import contenders as C
from pyfastpo.bench.case import Case

ALL_BASELINES = C.Options(frozenset(C.BASELINE_GROUPS))


def contenders(path: str) -> list:
    return [pytest.param(c, id=c.name) for c in C.registry() if c.path == path]


def run(benchmark, contender, path, size, device, dtype, rounds) -> None:
    try:
        op, source = contender.build(device, dtype, ALL_BASELINES)
    except C.Skip as why:
        pytest.skip(str(why))
    case = Case(path, size, dtype, device, seed=0)
    prepare, forward, backward = case.callables(op)

    def setup():
        inputs = prepare()
        if device.type == "cuda":  # the untimed copy must be finished before the timer starts
            torch.cuda.synchronize(device)
        return (inputs,), {}

    def step(inputs):
        backward(inputs, forward(inputs))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.extra_info.update(source=source, size=size.label(path), dtype=str(dtype), valid_tokens=case.valid)
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=1)
