"""The linear path, hidden states + lm_head to a sigmoid DPO loss, forward + backward, for every contender."""

import pytest
from _suite import contenders, run
from conftest import SIZES


@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.label("linear"))
@pytest.mark.parametrize("contender", contenders("linear"))
def test_linear_fwd_bwd(benchmark, bench_setup, contender, size):
    benchmark.group = f"linear {size.label('linear')}"
    run(benchmark, contender, "linear", size, *bench_setup)
