"""Input checks shared by every public entry point. Each raises ValueError that
names the argument and says how to fix it; none of them copies the logits."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Validate ``logits [N, T, V]`` and ``labels [N, T]``; return labels as contiguous int64.

    Checks dtype, rank, shapes, devices, unit last stride and that every label is
    ``ignore_index`` or in ``[0, V)`` (so no kernel ever reads out of bounds).
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("logits and labels must be torch.Tensors")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"logits must be a floating tensor (float32, bfloat16, float16 or float64), got {logits.dtype}; "
            "cast it with logits.float()"
        )
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [N, T, V], got {tuple(logits.shape)}")
    check_same_device(logits=logits, labels=labels)
    if logits.stride(-1) != 1 and logits.numel() > 0:
        raise ValueError(
            "logits' last dimension must have stride 1 (other strides are free); "
            "pass logits.contiguous() if it comes from a transpose"
        )
    return check_labels(labels, tuple(logits.shape[:2]), logits.shape[-1], ignore_index, "logits")


def check_labels(labels: torch.Tensor, shape: tuple, vocab: int, ignore_index: int, against: str) -> torch.Tensor:
    """Validate ``labels`` of ``shape`` against a vocabulary of ``vocab``; return contiguous int64.

    Every label must be ``ignore_index`` or in ``[0, vocab)`` (so no kernel ever
    reads out of bounds). ``against`` names the tensor the shape comes from.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape [N, T], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}; use labels.long()")
    if tuple(labels.shape) != shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match {against}' first two dims "
            f"{shape}; shift both the same way (e.g. logits[:, :-1], labels[:, 1:])"
        )
    if vocab < 1:
        raise ValueError("the vocabulary (logits' last dimension, weight's first) must be at least 1")
    labels = labels.to(torch.int64).contiguous()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"labels{first} = {int(labels[tuple(first)])}. Mask padding and prompt tokens with ignore_index"
        )
    return labels


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise if the given (non-None) tensors are not all on one device."""
    present = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(present.values())) > 1:
        where = ", ".join(f"{k} on {d}" for k, d in present.items())
        raise ValueError(f"tensors must be on one device, got {where}; move them with .to(device)")


def check_pairs(n: int, what: str = "logits") -> None:
    """The batch layout is [chosen..., rejected...]: N must be even and positive."""
    if n == 0 or n % 2:
        raise ValueError(
            f"{what} must hold an even, non-zero number of sequences (first half chosen, "
            f"second half their rejected partners), got N={n}"
        )
