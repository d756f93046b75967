"""The heavy op, ``logits [N,T,V] -> logps [N]`` forward + backward, for every contender."""

import pytest
from _suite import contenders, run
from conftest import SIZES


@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.label("logits"))
@pytest.mark.parametrize("contender", contenders("logits"))
def test_logps_fwd_bwd(benchmark, bench_setup, contender, size):
    benchmark.group = f"logits {size.label('logits')}"
    run(benchmark, contender, "logits", size, *bench_setup)
