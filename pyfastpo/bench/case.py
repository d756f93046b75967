"""One benchmark case: the inputs of a (path, size, prompt fraction) and the three callables every measurement takes.

``prepare()`` makes a run's inputs (untimed): on the logits path a fresh
non-leaf copy of the logits, like a model's output, so that in-place backwards
may reuse its storage; on the linear path the hidden states and lm_head weight
(leaves). ``forward(inputs)`` runs a contender's op; ``backward(inputs, out)``
returns the gradient(s): w.r.t. the logits for a fixed random ``dL/dlogps``, or
w.r.t. hidden and weight for the loss.
"""

from __future__ import annotations

import math

import torch

from .data import IGNORE, Size, make_labels, random_tensor


class Case:
    """Inputs of one (path, size, prompt fraction) and the three callables the measurements take."""

    def __init__(
        self,
        path: str,
        size: Size,
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
        prompt_fraction: float = 0.25,
    ):
        self.path, self.size, self.prompt_fraction = path, size, prompt_fraction
        g = torch.Generator().manual_seed(seed)
        self.labels = make_labels(size.n, size.t, size.v, g, prompt_fraction).to(device)
        self.valid = int((self.labels != IGNORE).sum())
        if path == "logits":
            self.base = random_tensor((size.n, size.t, size.v), dtype, device, seed, 2.0).requires_grad_()
            self.grad_out = torch.randn(size.n, generator=g).to(device=device, dtype=torch.float32)
            self.element_size = self.base.element_size()
        else:
            self.hidden = random_tensor((size.n, size.t, size.h), dtype, device, seed).requires_grad_()
            w_scale = 2.0 / math.sqrt(size.h)  # logits of std 2, as on the logits path
            self.weight = random_tensor((size.v, size.h), dtype, device, seed + 1, w_scale).requires_grad_()

    def callables(self, op):
        if self.path == "logits":
            # A fresh non-leaf copy each run, like a model's output: in-place backwards may reuse it.
            def prepare():
                return self.base.clone()

            def forward(x):
                return op(x, self.labels)

            def backward(x, logps):
                return torch.autograd.grad(logps, x, grad_outputs=self.grad_out.to(logps.dtype))[0]

        else:

            def prepare():
                return self.hidden, self.weight

            def forward(hw):
                return op(hw[0], hw[1], self.labels)

            def backward(hw, out):
                return torch.autograd.grad(out[0], hw)

        return prepare, forward, backward

    def first_call(self, op):
        """(logps, gradient(s), loss) of one fwd+bwd, for the correctness check (loss: None
        on the logits path)."""
        prepare, forward, backward = self.callables(op)
        x = prepare()
        out = forward(x)
        grad = backward(x, out)
        if self.path == "logits":
            return out.detach(), grad, None
        return out[1].detach(), grad, out[0].detach()
