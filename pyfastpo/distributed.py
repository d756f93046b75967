"""The fused linear path under data-parallel wrappers (FSDP2 ``fully_shard``, DDP).

The logits path needs nothing here: its loss is local to each rank and its gradient
flows into the model's logits like any loss's. The fused linear path reads the lm_head's
weight directly, outside the lm_head's own ``forward``; under FSDP2 that weight is a
sharded DTensor except while FSDP has gathered it around a call of the module. So
:func:`lm_head_preference_loss` runs the loss *inside* a call of the lm_head module:
FSDP's pre-forward hook gathers the weight, the loss reads it unsharded, the post-forward
hook frees it, the pre-backward hook gathers it again for the backward, and the weight's
gradient goes through FSDP's reduce-scatter like any other. DDP needs no help (its
reducer watches the parameters' gradients wherever they are computed), and the same call
works there and on one process.
"""

from __future__ import annotations

import contextlib

import torch

from .linear import linear_preference_loss
from .pairs import FusedPreferenceLossOutput


@contextlib.contextmanager
def forward_replaced(module: torch.nn.Module, forward):
    """Inside the block ``module.forward`` is ``forward`` (an instance attribute over the
    class's method; the module's hooks stay): calling the module, or a wrapper around it
    (DDP, FSDP2, PEFT), runs ``forward`` with every wrapper hook around it."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


@contextlib.contextmanager
def gathered(module: torch.nn.Module | None):
    """Inside the block ``module``'s parameters are whole: an FSDP2 module is unsharded
    (``unshard()``, then ``reshard()``); anything else is left as it is. For weights read
    without gradient (a reference model's lm_head)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        FSDPModule = ()  # noqa: N806
    if module is None or not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def lm_head_preference_loss(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_lm_head: torch.nn.Module | None = None,
    **kwargs,
) -> FusedPreferenceLossOutput:
    """:func:`pyfastpo.linear_preference_loss` with ``lm_head``'s weight and bias, run inside
    a call of ``lm_head`` so that wrappers hooked on it (FSDP2's ``fully_shard``) gather and
    free its weight and reduce its gradient as for ``lm_head(hidden)``.

    Args:
        lm_head: the policy's output layer (``model.get_output_embeddings()``): any module
            with ``weight`` ``[V, H]`` and ``bias`` (None or ``[V]``); plain, or an FSDP2
            unit of its own (``fully_shard(model.lm_head)`` before ``fully_shard(model)``).
        hidden: ``[N, T, H]`` the policy's last hidden states, labels ``[N, T]``: as in
            :func:`pyfastpo.linear_preference_loss`.
        ref_hidden: ``[N, T, H]`` the reference's hidden states (no gradient), with
        ref_lm_head: the reference's output layer (default: the policy's, read inside the
            same call); an FSDP2 unit is unsharded for the read (:func:`gathered`).
        **kwargs: every other argument of :func:`pyfastpo.linear_preference_loss`.

    Returns:
        :class:`pyfastpo.pairs.FusedPreferenceLossOutput`, as
        :func:`pyfastpo.linear_preference_loss`.
    """
    if not isinstance(lm_head, torch.nn.Module) or not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        raise ValueError(f"lm_head must be a module with a weight (an nn.Linear), got {type(lm_head).__name__}")
    other_ref = ref_lm_head is not None and ref_lm_head is not lm_head
    if ref_lm_head is not None and ref_hidden is None:
        raise ValueError("ref_lm_head is used only with ref_hidden; pass ref_hidden too, or drop it")
    if ref_hidden is not None and ({"ref_weight", "ref_bias"} & kwargs.keys()):
        raise ValueError("give the reference's lm_head as ref_lm_head, not ref_weight / ref_bias")

    def forward(h):
        # Inside the call: the wrapper's hooks have run, the parameters are whole here.
        ref = {}
        if ref_hidden is not None:
            head = ref_lm_head if other_ref else lm_head
            ref = dict(ref_hidden=ref_hidden, ref_weight=head.weight.detach(), ref_bias=_detached(head.bias))
        return linear_preference_loss(h, lm_head.weight, labels, bias=lm_head.bias, **ref, **kwargs)

    with gathered(ref_lm_head if other_ref and ref_hidden is not None else None), forward_replaced(lm_head, forward):
        return lm_head(hidden)


def _detached(x):
    return None if x is None else x.detach()
