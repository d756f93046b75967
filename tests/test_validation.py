"""Every bad input raises a ValueError that names the problem."""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, make_labels, make_logits

import pyfastpo


def logits_labels(n=2, t=3, v=11):
    return make_logits(n, t, v), make_labels(n, t, v)


def test_label_out_of_range():
    logits, labels = logits_labels()
    labels[1, 2] = 11
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\).*labels\[1, 2\] = 11"):
        pyfastpo.sequence_logps(logits, labels)


def test_negative_label_other_than_ignore_index():
    logits, labels = logits_labels()
    labels[0, 0] = -1
    with pytest.raises(ValueError, match="ignore_index=-100"):
        pyfastpo.sequence_logps(logits, labels)


def test_shape_mismatch():
    logits, labels = logits_labels()
    with pytest.raises(ValueError, match="does not match logits"):
        pyfastpo.sequence_logps(logits, labels[:, :-1])


def test_wrong_rank():
    logits, labels = logits_labels()
    with pytest.raises(ValueError, match=r"\[N, T, V\]"):
        pyfastpo.sequence_logps(logits[0], labels)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        pyfastpo.sequence_logps(logits, labels[0])


def test_integer_logits():
    _, labels = logits_labels()
    with pytest.raises(ValueError, match="floating"):
        pyfastpo.sequence_logps(torch.randint(0, 5, (2, 3, 11)), labels)


def test_float_labels():
    logits, labels = logits_labels()
    with pytest.raises(ValueError, match="integer"):
        pyfastpo.sequence_logps(logits, labels.float())


def test_non_unit_last_stride():
    logits, labels = logits_labels()
    with pytest.raises(ValueError, match="stride 1"):
        pyfastpo.sequence_logps(logits.transpose(1, 2).contiguous().transpose(1, 2), labels)


def test_mismatched_devices():
    logits, labels = logits_labels()
    with pytest.raises(ValueError, match="meta device"):
        pyfastpo.sequence_logps(logits, labels.to("meta"))
    with pytest.raises(ValueError, match="meta device"):
        pyfastpo.sequence_logps(logits.to("meta"), labels)


def test_unknown_backend():
    logits, labels = logits_labels()
    with pytest.raises(ValueError, match="unknown"):
        pyfastpo.sequence_logps(logits, labels, backend="fast")


def test_unavailable_backend_says_how_to_get_it():
    logits, labels = logits_labels()
    with pytest.raises(ValueError, match="not available for cpu tensors.*To get it"):
        pyfastpo.sequence_logps(logits, labels, backend="cuda")


def test_kernel_backend_rejects_float64():
    logits, labels = logits_labels()
    with pytest.raises(ValueError, match="use backend='reference'"):
        pyfastpo.sequence_logps(logits.double(), labels, backend="cpp")


def test_all_ignored_batch_gives_zero_not_nan():
    logits, _ = logits_labels()
    labels = torch.full((2, 3), IGNORE)
    out = pyfastpo.sequence_logps(logits, labels, return_entropy=True)
    assert torch.equal(out.logps, torch.zeros(2)) and torch.equal(out.mean_logits, torch.zeros(2))
    assert torch.equal(out.num_tokens, torch.zeros(2, dtype=torch.int64))
