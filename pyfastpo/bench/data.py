"""Benchmark inputs: random logits / hidden states, DPO-shaped labels, and sweep sizes.

Labels look like a DPO batch: the first quarter of every row is prompt
(``IGNORE``), then the completion, then right padding of random length (up to a
quarter of the row). ``trl_way_logps`` is the plain float32 ``log_softmax`` +
``gather`` that ``pyfastpo.demo`` also compares against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pyfastpo.sequence_logps import IGNORE_INDEX

IGNORE = IGNORE_INDEX  # the label of prompt and padding tokens


@dataclass(frozen=True)
class Size:
    """One point of a sweep: ``n`` sequences x ``t`` positions x ``v`` vocabulary (and
    ``h`` hidden width for the linear path)."""

    n: int
    t: int
    v: int
    h: int | None = None

    def label(self, path: str = "logits") -> str:
        base = f"{self.n}x{self.t}x{self.v}"
        return f"{base}x{self.h}" if path == "linear" and self.h else base


def parse_sizes(text: str, default_h: int) -> list[Size]:
    """``"NxTxV[xH],..."`` (comma- or space-separated) to sizes; H defaults to
    ``default_h``. N must be even (chosen rows first, then their rejected partners)."""
    sizes = []
    for item in filter(None, re.split(r"[,\s]+", text)):
        if not re.fullmatch(r"\d+(x\d+){2,3}", item):
            raise ValueError(f"size {item!r} is not NxTxV or NxTxVxH (e.g. 4x128x32000 or 4x128x32000x512)")
        parts = [int(p) for p in item.split("x")]
        n, t, v = parts[:3]
        h = parts[3] if len(parts) == 4 else default_h
        if min(n, t, v, h) < 1:
            raise ValueError(f"size {item!r}: every dimension must be at least 1")
        if n % 2:
            raise ValueError(f"size {item!r}: N must be even (the rows are chosen/rejected pairs)")
        sizes.append(Size(n, t, v, h))
    if not sizes:
        raise ValueError("no size given")
    return sizes


def make_labels(n: int, seq_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, seq_len]`` int64 labels on the CPU: a prompt (first quarter ignored), the
    completion, and right padding of random length up to a quarter of the row."""
    labels = torch.randint(0, vocab, (n, seq_len), generator=generator)
    labels[:, : seq_len // 4] = IGNORE
    for row in range(n):
        labels[row, seq_len - int(torch.randint(0, seq_len // 4 + 1, (1,), generator=generator)) :] = IGNORE
    return labels


def make_batch(pairs: int, seq_len: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random ``[2*pairs, seq_len, vocab]`` policy and reference logits and labels with a
    prompt (first quarter ignored) and right padding of random length."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    logits = (torch.randn(n, seq_len, vocab, generator=g) * 2).to(device=device, dtype=dtype)
    ref_logits = (logits.float() + 0.1 * torch.randn(n, seq_len, vocab, generator=g).to(device)).to(dtype)
    return logits, ref_logits, make_labels(n, seq_len, vocab, g).to(device)


def random_tensor(shape, dtype: torch.dtype, device: torch.device, seed: int, scale: float = 1.0) -> torch.Tensor:
    """``scale * randn(shape)`` generated on ``device`` itself (a GPU-sized tensor never
    passes through host memory)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.normal_(0.0, scale, generator=g)


def trl_way_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence log-probs as trainers compute them today: a full float32
    log_softmax, a gather and a masked sum."""
    valid = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return (tok * valid).sum(-1)
