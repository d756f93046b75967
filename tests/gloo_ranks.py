"""Run a function on several CPU processes joined by a gloo process group (no GPU, no port).

``run_ranks(fn, world_size, tmp_path, *args)`` spawns ``world_size`` processes; each
initializes torch.distributed (gloo, a file store under ``tmp_path``), calls
``fn(rank, world_size, *args)`` (a module-level function, so that spawn can import it) and
sends back what it returns (tensors, dicts, lists). Returns the results by rank; an
exception in any rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, store_dir: str, fn, args) -> None:
    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(store_dir, f"result{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, tmp_path, *args) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; their results by rank."""
    store_dir = str(tmp_path / f"ranks{world_size}-{fn.__name__}")
    os.makedirs(store_dir, exist_ok=True)
    # A fork server that imported torch and pyfastpo once (seconds each on a small machine)
    # forks every rank of every call: no re-import per process, and no fork of this process
    # (its OpenMP threads may already run, which a forked child cannot use).
    mp.set_forkserver_preload(["torch", "torch.distributed.tensor", "pyfastpo", "gloo_ranks"])
    args = (world_size, store_dir, fn, args)
    mp.start_processes(_entry, args=args, nprocs=world_size, join=True, start_method="forkserver")
    return [torch.load(os.path.join(store_dir, f"result{r}.pt"), weights_only=False) for r in range(world_size)]
