"""Input checks shared by every public entry point. Each raises ValueError that
names the argument and says how to fix it; none of them copies the logits."""

from __future__ import annotations

import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# Plain tensor types whose storage the kernels may read through a pointer.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(x) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (False where torch has none)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(x, DTensor)


def check_plain_tensor(name: str, x) -> None:
    """Raise ValueError unless ``x`` is a plain dense tensor with strided storage.

    The compiled backends read memory through raw pointers, so anything else (a
    tensor subclass such as DTensor, a meta, sparse, nested or quantized tensor)
    is refused here, before any pointer is taken, instead of crashing the process.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if type(x) not in _PLAIN_TYPES:
        hint = (
            " (a DTensor: pass x.full_tensor(), or x.to_local() for the local shard)"
            if "DTensor" in type(x).__name__
            else ""
        )
        raise ValueError(
            f"{name} is a {type(x).__module__}.{type(x).__name__}, a tensor subclass{hint}; "
            "pyfastpo takes plain torch.Tensors"
        )
    if x.is_nested or x.layout != torch.strided or x.is_quantized:
        kind = "nested" if x.is_nested else ("quantized" if x.is_quantized else str(x.layout))
        raise ValueError(f"{name} must be a dense strided tensor, got a {kind} tensor; convert it (e.g. .to_dense())")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (no data); pass a tensor with storage")
    # Lazy views: the memory holds the un-negated values. (Under torch.compile the
    # check is skipped: dynamo cannot trace it, and the ops receive functionalized tensors.)
    if not torch.compiler.is_compiling() and (x.is_neg() or x.is_conj()):
        raise ValueError(f"{name} is a lazy negated/conjugated view; pass {name}.resolve_neg().resolve_conj()")


def check_logits_labels(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, name: str = "logits", vocab: int | None = None
) -> torch.Tensor:
    """Validate ``logits [N, T, V]`` and ``labels [N, T]``; return labels as contiguous int64.

    Checks the tensor kind (:func:`check_plain_tensor`), dtype, rank, shapes,
    devices and unit last stride (label values: :func:`check_label_values`, in the
    ops). ``name`` names the logits
    in messages (e.g. ``ref_logits``). ``vocab``: the full vocabulary when ``logits`` is
    one rank's slice of it (vocab-parallel; the slice may be empty), else ``logits``' V.
    """
    check_plain_tensor(name, logits)
    check_plain_tensor("labels", labels)
    logits_name = name
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{logits_name} must be a floating tensor (float32, bfloat16, float16 or float64), got {logits.dtype}; "
            f"cast it with {logits_name}.float()"
        )
    if logits.dim() != 3:
        raise ValueError(f"{logits_name} must have shape [N, T, V], got {tuple(logits.shape)}")
    check_same_device(**{logits_name: logits, "labels": labels})
    if logits.stride(-1) != 1 and logits.numel() > 0:
        raise ValueError(
            f"{logits_name}' last dimension must have stride 1 (other strides are free); "
            f"pass {logits_name}.contiguous() if it comes from a transpose"
        )
    vocab = logits.shape[-1] if vocab is None else vocab
    return check_labels(labels, tuple(logits.shape[:2]), vocab, ignore_index, logits_name)


def check_labels(labels: torch.Tensor, shape: tuple, vocab: int, ignore_index: int, against: str) -> torch.Tensor:
    """Validate ``labels`` of ``shape`` against a vocabulary of ``vocab``; return contiguous int64.

    Metadata only (dtype, rank, shape, ``ignore_index``): the values, every label
    ``ignore_index`` or in ``[0, vocab)``, are checked by :func:`check_label_values`
    inside the ops. ``against`` names the tensor the shape comes from.
    """
    check_plain_tensor("labels", labels)
    try:
        value = operator.index(ignore_index)  # int, numpy or torch integer; not a float or a bool
        ok = not isinstance(ignore_index, bool) and -(2**63) <= value < 2**63  # the kernels compare int64
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
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
    return labels.to(torch.int64).contiguous()


def check_token_weights(token_weights, labels: torch.Tensor) -> None:
    """Optional per-token log-prob weights: a floating tensor shaped and placed like ``labels``."""
    if token_weights is None:
        return
    check_plain_tensor("token_weights", token_weights)
    if tuple(token_weights.shape) != tuple(labels.shape):
        raise ValueError(
            f"token_weights must have the labels' shape {tuple(labels.shape)}, got {tuple(token_weights.shape)}"
        )
    if not token_weights.dtype.is_floating_point:
        raise ValueError(f"token_weights must be a floating tensor, got {token_weights.dtype}")
    if token_weights.device != labels.device:
        raise ValueError(f"token_weights is on {token_weights.device} but the labels are on {labels.device}")
    if token_weights.requires_grad:
        raise ValueError("token_weights are constants (no gradient flows to them): pass token_weights.detach()")


LABEL_CHECK_MODES = ("sync", "async")
_label_check = "sync"


def set_label_check(mode: str) -> str:
    """Choose how the label values are checked; returns the previous mode.

    - ``"sync"`` (the default): a ``ValueError`` naming the first bad label, before any
      kernel runs. On a GPU that reads one bool back: one host synchronization per call.
    - ``"async"``: a device-side assertion (``torch._assert_async``, as torch's own
      ``gather`` checks its indices) queued before the kernels. No host synchronization, so
      a step can be captured in a CUDA graph (``torch.compile(mode="reduce-overhead")``).
      A bad label then stops the process with a CUDA device-side assert that names the
      check; on a CPU it raises ``RuntimeError`` at once.

    While a CUDA graph is being captured, the check is asynchronous whatever the mode,
    because a synchronization there would invalidate the capture. The kernels never read
    out of bounds in either mode, because they skip out-of-range labels.
    """
    global _label_check
    if mode not in LABEL_CHECK_MODES:
        raise ValueError(f"label check mode must be one of {LABEL_CHECK_MODES}, got {mode!r}")
    previous, _label_check = _label_check, mode
    return previous


def check_not_capturing(x: torch.Tensor, what: str) -> None:
    """Raise RuntimeError if a CUDA graph is being captured on ``x``'s device: ``what``
    needs a count of valid tokens on the host (``nonzero``), a synchronization that a
    capture forbids (CUDA would fail with an unhelpful "operation not permitted")."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what} synchronizes with the host (it counts the valid tokens), which a CUDA graph capture "
            "forbids. Under CUDA graphs use sequence_logps / fused_preference_loss with the cuda or "
            "triton backend and pyfastpo.set_label_check('async')"
        )


def _label_message(vocab: int, ignore_index: int) -> str:
    return (
        f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}. "
        "Mask padding and prompt tokens with ignore_index"
    )


def check_label_values(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise unless every label is ``ignore_index`` or in ``[0, vocab)``, in the way
    :func:`set_label_check` chose.

    It reads the labels' values, so it runs inside the custom ops (just before their
    kernels), never in the traced Python of an entry point: under ``torch.compile`` it is
    part of the opaque op, not a graph break. On CPU tensors the ``"sync"`` check costs no
    synchronization; on a GPU it costs one ``.any()`` readback per call.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    capturing = labels.is_cuda and torch.cuda.is_current_stream_capturing()
    if _label_check == "async" or capturing:
        torch._assert_async(torch.logical_not(bad.any()), _label_message(vocab, ignore_index))
        return
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"labels{first} = {int(labels[tuple(first)])}. Mask padding and prompt tokens with ignore_index"
        )


def check_reference_input(
    name: str, ref, like_name: str, like: torch.Tensor, ref_chosen_logps, ref_rejected_logps
) -> None:
    """A reference model's input ``ref`` (logits or hidden states) given with the
    policy's ``like``: of the same shape and kind (a plain tensor, or vocab-sharded DTensors
    both), and not together with precomputed reference log-probs."""
    if ref_chosen_logps is not None or ref_rejected_logps is not None:
        raise ValueError(f"give {name} or ref_chosen_logps/ref_rejected_logps, not both")
    if is_dtensor(like) and not is_dtensor(ref):
        raise ValueError(f"{like_name} is a vocab-sharded DTensor, so {name} must be one too (same mesh)")
    if not is_dtensor(like):
        check_plain_tensor(name, ref)
    if tuple(ref.shape) != tuple(like.shape):
        raise ValueError(f"{name} shape {tuple(ref.shape)} must equal {like_name} shape {tuple(like.shape)}")


def check_flags(**flags) -> None:
    """Raise ValueError unless every flag is a bool (``"no"`` would be truthy and switch it on)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


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
