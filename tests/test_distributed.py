"""Past one process, on the CPU with gloo: vocab-parallel (TP) logits and lm_head, DDP and
FSDP2 on both paths, each against one process on the same batch (loss, every metric,
gradients). Ranks run in processes spawned by :mod:`gloo_ranks`; each case batches many
checks into one spawn (starting processes is the slow part)."""

from __future__ import annotations

import functools

import pytest
import torch
from gloo_ranks import run_ranks

import pyfastpo

IGNORE = -100
RTOL, ATOL = 1e-6, 1e-6  # float32, the bar


def _batch(seed: int, n: int, t: int, v: int, *, all_ignored_row: bool = True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[:, : t // 3] = IGNORE  # a prompt
    labels[1, -2:] = IGNORE  # padding
    if all_ignored_row:
        labels[n // 2 - 1] = IGNORE  # a chosen completion with no valid token
    return labels


def _fields(stats) -> dict:
    return {k: v.detach() for k, v in stats._asdict().items() if isinstance(v, torch.Tensor)}


def _loss_summary(out) -> dict:
    summary = {"loss": out.loss.detach(), "losses": out.losses.detach(), "chosen": out.chosen_rewards.detach()}
    summary.update({f"metric/{k}": torch.as_tensor(v).detach() for k, v in out.metrics.items()})
    summary.update({f"policy/{k}": v for k, v in _fields(out.policy).items()})
    if out.reference is not None:
        summary.update({f"reference/{k}": v for k, v in _fields(out.reference).items()})
    return summary


def _assert_same(got: dict, want: dict, what: str, rtol=RTOL, atol=ATOL):
    assert got.keys() == want.keys(), (what, got.keys() ^ want.keys())
    for key in want:
        torch.testing.assert_close(
            got[key], want[key], rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, k=key: f"{what} {k}: {m}"
        )


# ------------------------------------------------------------------ vocab-parallel logits


def _sharded(full: torch.Tensor, mesh, rank: int, world: int):
    """``full`` [N, T, V] as a Shard(-1) DTensor produced by autograd, and the leaf whose
    gradient is this rank's slice of the logits' gradient."""
    from torch.distributed.tensor import DTensor, Shard

    size, offset = Shard.local_shard_size_and_offset(full.shape[-1], world, rank)
    leaf = full[..., offset : offset + size].clone().requires_grad_()
    dt = DTensor.from_local(leaf * 1.0, mesh, [Shard(2)], shape=full.shape, stride=full.stride(), run_check=False)
    return dt, leaf, slice(offset, offset + size)


def _tp_logits_case(rank: int, world: int, vocab: int, backend: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(1)
        full = (torch.randn(6, 9, vocab, generator=g) * 4).to(dtype)
        full[0, 5, : vocab // 2] = -float("inf")  # a token whose low slices hold no mass
        labels = _batch(2, 6, 9, vocab)
        labels[0, 5] = vocab - 1  # its label has a finite logit
        weights = torch.rand(6, 9, generator=g) + 0.5
        positions = torch.cat((torch.arange(4), torch.arange(5))).repeat(6, 1)  # two sequences per row
        for name, kwargs in {
            "plain": {},
            "weighted": dict(token_weights=weights),
            "packed": dict(position_ids=positions, token_weights=weights),
        }.items():
            scale = torch.randn(12 if name == "packed" else 6, generator=g)
            dt, leaf, cols = _sharded(full, mesh, rank, world)
            out = pyfastpo.sequence_logps(
                dt, labels, return_entropy=True, return_log_sum_sq=True, backend=backend, **kwargs
            )
            (out.logps * scale).sum().backward()
            one = full.clone().requires_grad_()
            ref = pyfastpo.sequence_logps(
                one * 1.0, labels, return_entropy=True, return_log_sum_sq=True, backend=backend, **kwargs
            )
            (ref.logps * scale).sum().backward()
            key = f"{dtype}/{name}"
            results[key] = dict(got=_fields(out), want=_fields(ref), grad=leaf.grad, want_grad=one.grad[..., cols])

        # Undefined rows, as on one process: a NaN logit (in the label's slice, or another),
        # a +inf logit, only -inf logits. NaN log-prob, entropy and gradient on every rank.
        special = full.clone()
        special[1, 4, vocab - 1] = float("nan")
        special[2, 5, 0] = float("inf")
        special[3, 6] = -float("inf")
        special[4, 7, : max(1, vocab // 4)] = float("nan")  # a NaN slice, the label elsewhere
        special_labels = _batch(4, 6, 9, vocab, all_ignored_row=False)
        special_labels[1:5, 4:8] = vocab // 2
        dt, leaf, cols = _sharded(special, mesh, rank, world)
        out = pyfastpo.sequence_logps(dt, special_labels, return_entropy=True, return_log_sum_sq=True, backend=backend)
        out.logps.sum().backward()
        one = special.clone().requires_grad_()
        ref = pyfastpo.sequence_logps(
            one * 1.0, special_labels, return_entropy=True, return_log_sum_sq=True, backend=backend
        )
        ref.logps.sum().backward()
        results[f"{dtype}/undefined rows"] = dict(
            got=_fields(out), want=_fields(ref), grad=leaf.grad, want_grad=one.grad[..., cols]
        )

        # The whole loss: a Mallows type (reference entropies), LD-DPO, WPO, NLL.
        # (No all-ignored completion: WPO's per-token mean is 0/0 there, NaN on one process too.)
        labels = _batch(3, 6, 9, vocab, all_ignored_row=False)
        labels[0, 5] = vocab - 1
        ref_full = full + torch.randn(full.shape, generator=g).to(dtype)
        loss_kwargs = dict(
            loss_type=["sigmoid", "mallows_dpo"], ld_alpha=0.5, use_weighting=True, nll_weight=0.3, backend=backend
        )
        dt, leaf, cols = _sharded(full, mesh, rank, world)
        ref_dt = _sharded(ref_full, mesh, rank, world)[0].detach()
        out = pyfastpo.fused_preference_loss(dt, labels, ref_logits=ref_dt, **loss_kwargs)
        out.loss.backward()
        one = full.clone().requires_grad_()
        want = pyfastpo.fused_preference_loss(one * 1.0, labels, ref_logits=ref_full, **loss_kwargs)
        want.loss.backward()
        results[f"{dtype}/loss"] = dict(
            got=_loss_summary(out), want=_loss_summary(want), grad=leaf.grad, want_grad=one.grad[..., cols]
        )
    return results


@pytest.mark.parametrize(
    "world, vocab",
    [(2, 64), (4, 101), (4, 3)],  # even shards; uneven; a rank with an empty slice (3 over 4)
)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_vocab_parallel_logits_match_one_process(world, vocab, backend, tmp_path):
    for rank, results in enumerate(run_ranks(_tp_logits_case, world, tmp_path, vocab, backend)):
        for key, r in results.items():
            bf16 = "bfloat16" in key
            # bf16: the same logits, so the same float32 math; only the gradient rounds to bf16.
            _assert_same(r["got"], r["want"], f"rank {rank} {key}")
            tol = dict(rtol=1e-2, atol=1e-2) if bf16 else dict(rtol=RTOL, atol=1e-7)
            torch.testing.assert_close(
                r["grad"], r["want_grad"], **tol, equal_nan=True, msg=lambda m, k=key: f"{k} grad: {m}"
            )


# ------------------------------------------------------- a tiny model for the wrapped runs


class TinyLM(torch.nn.Module):
    """Embedding, one tanh layer, an lm_head: ``forward(ids)`` gives logits, ``backbone(ids)``
    the last hidden states."""

    def __init__(self, vocab: int, hidden: int = 12, bias: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.body = torch.nn.Linear(hidden, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=bias)

    def backbone(self, ids):
        return torch.tanh(self.body(self.embed(ids)))

    def forward(self, ids, head: bool = True):
        h = self.backbone(ids)
        return self.lm_head(h) if head else h


def _model(vocab: int, bias: bool = False) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM(vocab, bias=bias)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.5)  # larger logits than the default init
    return model


def _rank_batch(rank: int, vocab: int):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, vocab, (4, 10), generator=g)
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=IGNORE)
    labels[:, :3] = IGNORE
    return ids, labels


LOSS = dict(loss_type="mallows_dpo", beta=0.2, backend="cpp")


def _logits_loss(model, ref_model, ids, labels):
    with torch.no_grad():
        ref_logits = ref_model(ids)
    return pyfastpo.fused_preference_loss(model(ids), labels, ref_logits=ref_logits, **LOSS)


def _linear_loss(model, ref_model, ids, labels, *, lm_head=None, ref_lm_head=None, ref_backbone=None):
    from pyfastpo.distributed import lm_head_preference_loss

    with torch.no_grad():
        ref_hidden = (ref_backbone or ref_model.backbone)(ids)
    hidden = model(ids, head=False)
    return lm_head_preference_loss(
        lm_head or model.lm_head, hidden, labels, ref_hidden=ref_hidden, ref_lm_head=ref_lm_head, **LOSS
    )


def _one_process(vocab: int, world: int, path: str, bias: bool = False) -> dict:
    """Per-rank loss summaries and the gradient every data-parallel rank should hold: the mean
    over ranks of one process's gradients (DDP and FSDP average)."""
    summaries, grads = [], []
    for rank in range(world):
        model, ref_model = _model(vocab, bias), _model(vocab, bias)
        ids, labels = _rank_batch(rank, vocab)
        out = (_logits_loss if path == "logits" else _linear_loss)(model, ref_model, ids, labels)
        out.loss.backward()
        summaries.append(_loss_summary(out))
        grads.append({k: p.grad for k, p in model.named_parameters()})
    mean = {k: torch.stack([g[k] for g in grads]).mean(0) for k in grads[0]}
    return dict(summaries=summaries, grads=mean)


def _ddp_case(rank: int, world: int, vocab: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for path in ("logits", "linear"):
        model, ref_model = _model(vocab), _model(vocab)
        ddp = DistributedDataParallel(model)
        ids, labels = _rank_batch(rank, vocab)
        if path == "logits":
            out = _logits_loss(ddp, ref_model, ids, labels)
        else:  # the backbone through DDP's forward; the lm_head read directly
            out = _linear_loss(ddp, ref_model, ids, labels, lm_head=model.lm_head)
        out.loss.backward()
        results[path] = dict(summary=_loss_summary(out), grads={k: p.grad for k, p in model.named_parameters()})
    return results


def _fsdp_case(rank: int, world: int, vocab: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for path in ("logits", "linear"):
        model, ref_model = _model(vocab), _model(vocab)
        for m in (model, ref_model):  # the lm_head its own unit, then the root
            fully_shard(m.lm_head, mesh=mesh)
            fully_shard(m, mesh=mesh)
        ids, labels = _rank_batch(rank, vocab)
        if path == "logits":
            out = _logits_loss(model, ref_model, ids, labels)
        else:
            ref_backbone = functools.partial(ref_model, head=False)  # the root's forward: FSDP gathers
            out = _linear_loss(model, ref_model, ids, labels, ref_lm_head=ref_model.lm_head, ref_backbone=ref_backbone)
        out.loss.backward()
        grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
        results[path] = dict(summary=_loss_summary(out), grads=grads)
    # FSDP's sharded weight (a Shard(0) DTensor) read outside the lm_head's forward looks like
    # a vocab-parallel one: the ranks' different batches give it away, before any kernel.
    with pytest.raises(ValueError, match="hidden, labels differ across.*lm_head_preference_loss"):
        pyfastpo.linear_preference_loss(model(ids, head=False), model.lm_head.weight, labels, backend="cpp")
    return results


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_both_paths_match_one_process(wrapper, tmp_path):
    vocab, world = 37, 2
    case = _ddp_case if wrapper == "ddp" else _fsdp_case
    for rank, results in enumerate(run_ranks(case, world, tmp_path, vocab)):
        for path, r in results.items():
            want = _one_process(vocab, world, path)
            _assert_same(r["summary"], want["summaries"][rank], f"{wrapper} {path} rank {rank}")
            _assert_same(r["grads"], want["grads"], f"{wrapper} {path} grads", atol=1e-7)


def _tp_module_case(rank: int, world: int, vocab: int, bias: bool) -> dict:
    """The lm_head tensor-parallel as torchtitan/Megatron shard it: ColwiseParallel, logits
    left as a DTensor sharded on V; every rank holds the same batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    ids, labels = _rank_batch(0, vocab)
    for path in ("logits", "linear"):
        model, ref_model = _model(vocab, bias), _model(vocab, bias)
        for m in (model, ref_model):
            parallelize_module(m, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
        if path == "logits":
            out = _logits_loss(model, ref_model, ids, labels)
        else:
            with torch.no_grad():
                ref_hidden = ref_model.backbone(ids)
            out = pyfastpo.linear_preference_loss(
                model.backbone(ids),
                model.lm_head.weight,
                labels,
                bias=model.lm_head.bias,
                ref_hidden=ref_hidden,
                ref_weight=ref_model.lm_head.weight,
                ref_bias=ref_model.lm_head.bias,
                chunk_tokens=5,  # several chunks
                **LOSS,
            )
        out.loss.backward()
        grads = {k: getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for k, p in model.named_parameters()}
        results[path] = dict(summary=_loss_summary(out), grads=grads)
    results["packed"] = _packed_linear(model, ids, labels)
    return results


PACKED_POSITIONS = torch.cat((torch.arange(3), torch.arange(7))).repeat(4, 1)  # two sequences per row


def _packed_linear(model, ids, labels) -> dict:
    """Packed rows through the linear path: per-sequence stats and the hidden states' gradient."""
    hidden = model.backbone(ids).detach().requires_grad_()
    stats = pyfastpo.linear_sequence_logps(
        hidden,
        model.lm_head.weight,
        labels,
        bias=model.lm_head.bias,
        return_entropy=True,
        position_ids=PACKED_POSITIONS,
        chunk_tokens=7,
        backend="cpp",
    )
    (stats.logps * torch.arange(1.0, 9.0)).sum().backward()
    return dict(fields=_fields(stats), grad=hidden.grad)


@pytest.mark.parametrize("world, vocab, bias", [(2, 38, False), (4, 37, True)])
def test_tensor_parallel_lm_head_matches_one_process(world, vocab, bias, tmp_path):
    for rank, results in enumerate(run_ranks(_tp_module_case, world, tmp_path, vocab, bias)):
        packed, want_packed = results.pop("packed"), _packed_linear(_model(vocab, bias), *_rank_batch(0, vocab))
        _assert_same(packed["fields"], want_packed["fields"], f"tp{world} packed rank {rank}")
        torch.testing.assert_close(packed["grad"], want_packed["grad"], rtol=RTOL, atol=ATOL)
        for path, r in results.items():
            want = _one_process(vocab, 1, path, bias)
            _assert_same(r["summary"], want["summaries"][0], f"tp{world} {path} rank {rank}")
            _assert_same(r["grads"], want["grads"], f"tp{world} {path} grads", atol=1e-7)


def test_lm_head_preference_loss_refuses_mismatched_reference_arguments():
    from pyfastpo.distributed import lm_head_preference_loss

    model = _model(11)
    ids, labels = _rank_batch(0, 11)
    hidden = model.backbone(ids)
    with pytest.raises(ValueError, match="ref_lm_head is used only with ref_hidden"):
        lm_head_preference_loss(model.lm_head, hidden, labels, ref_lm_head=model.lm_head)
    with pytest.raises(ValueError, match="as ref_lm_head, not ref_weight"):
        lm_head_preference_loss(model.lm_head, hidden, labels, ref_hidden=hidden, ref_weight=model.lm_head.weight)
    # On one process it is linear_preference_loss itself, the module's own forward restored after.
    out = lm_head_preference_loss(model.lm_head, hidden, labels, ref_hidden=hidden.detach(), backend="cpp")
    want = pyfastpo.linear_preference_loss(
        hidden, model.lm_head.weight, labels, ref_hidden=hidden.detach(), backend="cpp"
    )
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    assert "forward" not in model.lm_head.__dict__
