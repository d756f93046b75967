"""Benchmark inputs: random logits / hidden states, DPO-shaped labels, and sweep sizes.

Labels look like a DPO batch: the first ``prompt_fraction`` of every row is
prompt (``IGNORE``; a quarter unless a sweep asks for others), then the
completion, then right padding of random length (up to a quarter of the row;
every row keeps at least one completion token). ``trl_way_logps`` is the plain float32 ``log_softmax`` +
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


def parse_prompt_fractions(text: str) -> list[float]:
    """``"0,0.25,0.5"`` (comma- or space-separated) to prompt fractions, each in [0, 1), no repeats."""
    fractions = []
    for item in filter(None, re.split(r"[,\s]+", text)):
        try:
            f = float(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a number (give fractions such as 0,0.25,0.5)") from None
        if not 0.0 <= f < 1.0:  # NaN fails too
            raise ValueError(f"{item!r} is not in [0, 1): it is the fraction of each row that is prompt")
        if f in fractions:
            raise ValueError(f"{item!r} is given twice")
        fractions.append(f)
    if not fractions:
        raise ValueError("no fraction given")
    return fractions


def prompt_length(seq_len: int, prompt_fraction: float) -> int:
    """Prompt positions of a row: ``floor(seq_len * prompt_fraction)``, at most ``seq_len - 1``."""
    return min(int(seq_len * prompt_fraction), max(seq_len - 1, 0))


def make_labels(
    n: int, seq_len: int, vocab: int, generator: torch.Generator, prompt_fraction: float = 0.25
) -> torch.Tensor:
    """``[n, seq_len]`` int64 labels on the CPU: a prompt (the first ``prompt_fraction`` of
    the row ignored), the completion, and right padding of random length up to a quarter
    of the row, cut so that every row keeps at least one completion token."""
    labels = torch.randint(0, vocab, (n, seq_len), generator=generator)
    prompt = prompt_length(seq_len, prompt_fraction)
    labels[:, :prompt] = IGNORE
    for row in range(n):
        pad = int(torch.randint(0, seq_len // 4 + 1, (1,), generator=generator))
        labels[row, seq_len - min(pad, seq_len - prompt - 1) :] = IGNORE
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
