"""Past one process, on the CPU with gloo: vocab-parallel (TP) logits and lm_head, DDP and
FSDP2 on both paths, each against one process on the same batch (loss, every metric,
gradients). Ranks run in processes spawned by :mod:`gloo_ranks`; each case batches many
checks into one spawn (starting processes is the slow part)."""

from __future__ import annotations

import copy

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
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{what} {k}: {m}")


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
        scale = torch.randn(6, generator=g)
        for name, kwargs in {
            "plain": {},
            "weighted": dict(token_weights=weights),
        }.items():
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
            torch.testing.assert_close(r["grad"], r["want_grad"], **tol, msg=lambda m, k=key: f"{k} grad: {m}")
