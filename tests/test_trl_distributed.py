"""FastDPOTrainer on two CPU processes (torchrun, gloo) against one process on the same
global batch: DDP on both paths. The launches run examples/train_distributed.py, the
example the README points to. (accelerate has no FSDP on the CPU: FSDP2 is tested through
the API in tests/test_distributed.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_distributed.py")
LOSS = ["--loss-type", "sigmoid", "mallows_dpo"]  # a streamed reference with its entropies


def _launch(tmp_path, name: str, nproc: int, *flags: str) -> dict:
    out = tmp_path / f"{name}.json"
    if nproc == 1:
        cmd = [sys.executable, SCRIPT, "--batch-size", "4"]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd = torchrun + ["--standalone", SCRIPT, "--batch-size", "2"]  # standalone: a free port of its own
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd + [*LOSS, *flags, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def _assert_same_run(got: dict, want: dict) -> None:
    assert len(got["history"]) == len(want["history"]) == 4
    for step, (g, w) in enumerate(zip(got["history"], want["history"])):
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
    assert got["param_checksum"] == pytest.approx(want["param_checksum"], rel=1e-6)


@pytest.mark.parametrize("path", ["logits", "fused-linear"])
def test_two_processes_train_as_one(path, tmp_path):
    flags = ("--fused-linear",) if path == "fused-linear" else ()
    one = _launch(tmp_path, "one", 1, *flags)
    ddp = _launch(tmp_path, "ddp", 2, *flags)
    assert (ddp["world_size"], ddp["wrapper"], ddp["sharded"]) == (2, "DistributedDataParallel", False)
    _assert_same_run(ddp, one)
