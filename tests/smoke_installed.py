"""Smoke test of an INSTALLED pyfastpo: run as a script (``python tests/smoke_installed.py``)
by an interpreter that has the wheel installed, from a directory outside the repository.
tests/test_packaging.py runs it in a fresh venv and cibuildwheel's test-command
(pyproject.toml) in each wheel's test environment, so it needs only what the wheel's
users have (pyfastpo, torch, numpy) and imports nothing else from tests/. Not collected
by pytest (its name is not test_*.py).

Checks: pyfastpo comes from the install, not from a checkout; the compiled ``cpp``
backend loads; one forward + backward of ``sequence_logps`` on it matches ``reference``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import pyfastpo
from pyfastpo.backends import backend_reasons

REPO = Path(__file__).resolve().parents[1]


def logps_and_grad(backend: str, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """The per-sequence log-probs and d(weighted sum)/d(logits) on ``backend``. The logits
    pass through one op first, as a model's output would: the backward then takes the
    in-place path that writes the gradient into their storage."""
    leaf = logits.clone().requires_grad_()
    out = pyfastpo.sequence_logps(leaf * 1.0, labels, backend=backend)
    (out.logps * weights).sum().backward()
    return out.logps.detach(), leaf.grad


def main() -> int:
    where = Path(pyfastpo.__file__).resolve()
    if REPO in where.parents:
        raise SystemExit(f"pyfastpo was imported from the source tree ({where}), not from the installed wheel")
    backends = pyfastpo.available_backends()
    if "cpp" not in backends:
        raise SystemExit(f"the compiled 'cpp' backend is missing from this install: {backend_reasons('cpu')}")

    torch.manual_seed(0)
    n, t, v = 4, 24, 1000
    logits = torch.randn(n, t, v) * 3
    labels = torch.randint(0, v, (n, t))
    labels[:, :6] = -100  # a prompt: ignored tokens
    labels[1, -5:] = -100  # padding
    weights = torch.randn(n)
    got, got_grad = logps_and_grad("cpp", logits, labels, weights)
    want, want_grad = logps_and_grad("reference", logits, labels, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-4, msg="cpp logps differ from reference")
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6, msg="cpp gradient differs from reference")
    print(
        f"pyfastpo {pyfastpo.__version__} from {where.parent} (torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}): backends {backends}; cpp forward+backward matches reference"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
