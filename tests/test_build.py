"""The compiled extensions match the sources: a build older than csrc/ would test (or,
on a GPU machine, benchmark) the old kernels without a word. setup.py bakes a hash of
csrc/ into each extension as ``source_hash``; rebuild with ``pip install -e .`` (or
``make test``, which does) when this fails."""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def source_hash() -> str:
    """setup.py's source_hash: sha256 over csrc/'s sorted file names and contents."""
    h = hashlib.sha256()
    for path in sorted(p for p in CSRC.iterdir() if not p.name.startswith(".")):  # as glob("csrc/*")
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", ["_C", "_cuda"])
def test_extension_is_built_from_the_current_sources(name):
    if name == "_cuda" and os.environ.get("PYFASTPO_NO_CUDA"):
        pytest.skip("PYFASTPO_NO_CUDA is set: the CUDA extension was skipped on purpose")
    try:
        module = importlib.import_module(f"pyfastpo.backends.{name}")
    except ImportError:
        if name == "_C":
            raise
        pytest.skip("pyfastpo.backends._cuda is not built (no nvcc at install time)")
    assert module.source_hash == source_hash(), (
        f"pyfastpo.backends.{name} was built from other sources than csrc/ holds now: rebuild (pip install -e .)"
    )
