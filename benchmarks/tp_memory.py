"""Peak memory per rank and bytes communicated per step, vocab-parallel (TP) on the CPU.

One fwd+bwd step of the sigmoid DPO loss from hidden states ``[N, T, H]`` and an lm_head
``[V, H]`` sharded over 1, 2 and 4 gloo ranks (one process: no DTensor), on both paths:

- logits: each rank projects its rows (``ColwiseParallel``'s local logits, a ``Shard(-1)``
  DTensor), then :func:`pyfastpo.fused_preference_loss`;
- linear: :func:`pyfastpo.linear_preference_loss` with the ``Shard(0)`` weight.

Peak: :func:`pyfastpo.memory.peak_memory` (the CPU allocator's events) of the step, beyond
its inputs. Bytes: every ``all_reduce`` the step issues, summed (a wrapper counts them).
Run: ``python benchmarks/tp_memory.py --out benchmarks/results/<dir>`` (writes results.json
and README-ready table lines to stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPE = dict(n=4, t=512, h=256, v=32000)


def _count_all_reduce(log: list):
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        log.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting


def _step(path: str, world: int, rank: int, mesh):
    import pyfastpo

    n, t, h, v = SHAPE["n"], SHAPE["t"], SHAPE["h"], SHAPE["v"]
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, t, h, generator=g) * 0.5).requires_grad_()
    weight_full = torch.randn(v, h, generator=g) * 0.05
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[:, : t // 4] = -100
    if world == 1:
        weight = weight_full.requires_grad_()
    else:
        from torch.distributed.tensor import Shard, distribute_tensor

        weight = distribute_tensor(weight_full, mesh, [Shard(0)]).requires_grad_()

    def run():
        if path == "linear":
            out = pyfastpo.linear_preference_loss(hidden, weight, labels, backend="cpp")
        else:
            if world == 1:
                logits = hidden @ weight.t()
            else:
                from torch.distributed.tensor import DTensor, Shard

                local = hidden @ weight.to_local().t()
                logits = DTensor.from_local(local, mesh, [Shard(2)], shape=(n, t, v), stride=(t * v, v, 1))
            out = pyfastpo.fused_preference_loss(logits, labels, backend="cpp")
        out.loss.backward()
        return out.loss.item()

    return run


def _rank(rank: int, world: int, store: str, path: str, results: str) -> None:
    from pyfastpo.memory import peak_memory

    torch.set_num_threads(1)
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
    log: list = []
    _count_all_reduce(log)
    run = _step(path, world, rank, mesh)
    run()  # warm up (first-call allocations), then measure
    log.clear()
    loss, peak = peak_memory(run)
    with open(os.path.join(results, f"{path}-{world}-{rank}.json"), "w") as f:
        json.dump(dict(path=path, world=world, rank=rank, loss=loss, peak_bytes=peak, all_reduce_bytes=sum(log)), f)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("logits", "linear"):
            for world in (1, 2, 4):
                store = os.path.join(tmp, f"store-{path}-{world}")
                mp.start_processes(_rank, args=(world, store, path, tmp), nprocs=world, start_method="spawn")
                for rank in range(world):
                    with open(os.path.join(tmp, f"{path}-{world}-{rank}.json")) as f:
                        rows.append(json.load(f))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(shape=SHAPE, rows=rows), f, indent=1)
    print("| path | ranks | loss (rank 0) | peak per rank, MiB (max over ranks) | all-reduce bytes per rank |")
    print("|---|---|---|---|---|")
    for path in ("logits", "linear"):
        for world in (1, 2, 4):
            rs = [r for r in rows if r["path"] == path and r["world"] == world]
            peak = max(r["peak_bytes"] for r in rs) / 2**20
            print(f"| {path} | {world} | {rs[0]['loss']:.6f} | {peak:.1f} | {rs[0]['all_reduce_bytes']:,} |")


if __name__ == "__main__":
    main()
