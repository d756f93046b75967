"""benchmarks/gpu_check.sh, checked without a GPU: its --dry-run runs every step's CPU
stand-in (the same commands at tiny sizes), so a broken flag, path or summary shows up
here and not in the few minutes a GPU machine is lent. Takes about a minute and a half."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["device", "wheels", "build", "tests", "memcheck", "logits", "linear", "triton"]


def test_dry_run_runs_every_step(tmp_path):
    archive = tmp_path.parent / f"{tmp_path.name}.tar.gz"
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, ARCHIVE=str(archive))
    env.pop("TRITON_INTERPRET", None)  # the script's own processes decide (no GPU: the interpreter)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == STEPS
    failed = {
        name: (rc, (tmp_path / f"{name}.log").read_text()[-1500:]) for name, rc, _ in steps if rc not in ("0", "skip")
    }
    assert not failed, failed
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("| step | status | seconds | result |")
    assert "| tests | ok |" in summary and "fastest: BLOCK_V=" in summary
    assert (tmp_path / "logits" / "results.md").exists() and (tmp_path / "linear" / "results.md").exists()
    with tarfile.open(archive) as tar:  # everything in one file for the device tool
        assert {"./summary.md", "./steps.tsv", "./logits/results.md"} <= set(tar.getnames())
