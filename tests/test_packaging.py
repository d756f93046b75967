"""Packaging, end to end as a user meets it: ``python -m build`` makes the sdist and then
the wheel FROM that sdist (a source missing from MANIFEST.in fails the build), the wheel
goes into a fresh venv that holds only torch and numpy (pyfastpo itself with --no-deps),
and tests/smoke_installed.py runs there from a directory outside the repository.

Slow, hence the ``packaging`` marker (``-m "not packaging"`` leaves it out): 3-5 min on
CI's 2 cores, spent compiling the C++ extension once and installing torch into the new
venv (docs/packaging.md has the measured times). The build sets PYFASTPO_NO_CUDA=1 even
where nvcc is present: the smoke test needs only the ``cpp`` backend, and nvcc would add
about a minute (the CUDA build is checked in the development install by test_build.py
and test_cuda_backend.py). Needs ``build`` (the dev extra) and the package index, for
the build's isolated environment (setuptools, wheel, pybind11), exactly as ``pip install``
of the sdist would."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TAIL = 60  # lines of a failed step's log shown in the failure
BUILD_TIMEOUT_S = 900  # sdist + wheel: two isolated environments and one C++ compile
VENV_TIMEOUT_S = 600  # a fresh venv and torch (several hundred MB) into it
SMOKE_TIMEOUT_S = 180

pytestmark = pytest.mark.packaging


def clean_env(**extra: str) -> dict:
    """The environment without anything that would put the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


def run(what: str, cmd: list, log: Path, timeout: float, **kwargs) -> float:
    """Run ``cmd`` with its output in ``log``; its duration in seconds. On a failure or a
    timeout (the whole process group is killed: pip and the build spawn children) the
    test fails with the command and the tail of its log."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    took = time.monotonic() - start
    if code != 0:
        status = f"timed out after {timeout:.0f} s" if code is None else f"failed (exit {code}) after {took:.0f} s"
        lines = log.read_text(errors="replace").splitlines()[-TAIL:]
        pytest.fail(
            f"{what} {status}: {shlex.join(map(str, cmd))}\nlast {len(lines)} lines of {log}:\n" + "\n".join(lines),
            pytrace=False,
        )
    print(f"{what}: {took:.0f} s")
    return took


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist, then the wheel built from that sdist (``python -m build``'s default), in a
    temporary folder; run from there so that a ``build/`` folder in the checkout cannot
    stand in for the ``build`` package."""
    out = tmp_path_factory.mktemp("packaging")
    probe = subprocess.run([sys.executable, "-c", "import build.__main__"], cwd=out, capture_output=True)
    if probe.returncode != 0:
        pytest.fail(f"{sys.executable} lacks the `build` package (the dev extra): run `make setup`", pytrace=False)
    cmd = [sys.executable, "-m", "build", "--outdir", out / "dist", REPO]
    run("sdist -> wheel", cmd, out / "build.log", BUILD_TIMEOUT_S, cwd=out, env=clean_env(PYFASTPO_NO_CUDA="1"))
    return out / "dist"


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {[p.name for p in found]}"
    return found[0]


def test_sdist_carries_every_build_source_and_no_junk(dist):
    with tarfile.open(only(dist, "pyfastpo-*.tar.gz")) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    # setup.py compiles csrc/ and hashes every file there (source_hash): all of it must travel.
    needed = {p.relative_to(REPO).as_posix() for p in (REPO / "csrc").iterdir()}
    needed |= {p.relative_to(REPO).as_posix() for p in REPO.glob("pyfastpo/**/*.py")}
    needed |= {p.relative_to(REPO).as_posix() for p in REPO.glob("kernels/*.py")}
    needed |= {p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md")}
    needed |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    junk = (".so", ".o", ".pyc", ".whl")
    junk_dirs = ("__pycache__/", ".venv/", "out/", "build/", "dist/", "tests/", "benchmarks/", "examples/", ".git/")
    bad = sorted(n for n in names if n.endswith(junk) or any(n.startswith(d) or f"/{d}" in n for d in junk_dirs))
    assert not bad, f"the sdist carries files no build needs: {bad}"


def test_wheel_from_sdist_installs_and_runs_in_a_fresh_venv(dist, tmp_path):
    wheel = only(dist, "pyfastpo-*.whl")
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    # The torch and numpy this suite runs with: torch 2.13.0's CPU build from local disk on CI.
    deps = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}"]
    env = clean_env()
    try:
        run("fresh venv", [sys.executable, "-m", "venv", venv], tmp_path / "venv.log", VENV_TIMEOUT_S, env=env)
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
        run("torch + numpy into it", [*pip, *deps], tmp_path / "deps.log", VENV_TIMEOUT_S, env=env)
        run("the wheel into it", [*pip, "--no-deps", wheel], tmp_path / "wheel.log", VENV_TIMEOUT_S, env=env)
        smoke = [python, REPO / "tests" / "smoke_installed.py"]
        run("smoke test", smoke, tmp_path / "smoke.log", SMOKE_TIMEOUT_S, cwd=tmp_path, env=env)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # a venv with torch is ~1 GB; the logs stay
