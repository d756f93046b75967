"""DPO with TRL + pyfastpo on several processes: DDP (or FSDP2) launched by torchrun.

The tiny download-free model and data of ``tiny_setup.py``; on a CPU the processes talk
over gloo, on GPUs over NCCL (accelerate picks). ``--batch-size`` is pairs per process, so
the global batch is ``nproc x batch-size``: one process with ``--batch-size 4`` trains on
the same pairs, step for step, as two with ``--batch-size 2``.

    torchrun --nproc_per_node 2 examples/train_distributed.py --fused-linear
    torchrun --nproc_per_node 2 examples/train_distributed.py --fused-linear --fsdp2   # GPUs only
    python examples/train_distributed.py --fused-linear --batch-size 4       # the same run on one process

accelerate runs FSDP on accelerators only (on the CPU its processes are DDP), so ``--fsdp2``
needs GPUs; on the CPU, FSDP2 with pyfastpo's fused linear path is tested at the API level
(tests/test_distributed.py). Rank 0 prints each step's loss and writes ``--out`` (JSON: the log history and a checksum
of the trained parameters), which tests/test_trl_distributed.py compares across launches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_setup  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per process and step")
    parser.add_argument("--loss-type", nargs="+", default=["sigmoid"])
    parser.add_argument("--fused-linear", action="store_true", help="use_fused_linear=True (logits never built)")
    parser.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    parser.add_argument("--backend", default="auto", help="pyfastpo backend")
    parser.add_argument("--out", default="train_distributed.json")
    return parser.parse_args(argv)


def _fsdp2_kwargs() -> dict:
    return dict(
        fsdp="full_shard",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from pyfastpo.integrations.trl import FastDPOConfig, FastDPOTrainer

    if args.fsdp2 and not torch.cuda.is_available():
        raise SystemExit("--fsdp2: accelerate runs FSDP on GPUs only (on the CPU it would silently run DDP)")
    torch.set_num_threads(1)
    tokenizer = tiny_setup.make_tokenizer(num_nouns=40)
    config = FastDPOConfig(
        **tiny_setup.dpo_config_kwargs(
            output_dir="/tmp/pyfastpo-train-distributed",
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            # CPU processes talk over gloo (set only when torchrun started several: one process has no group)
            ddp_backend="gloo"
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
            else None,
            **(_fsdp2_kwargs() if args.fsdp2 else {}),
        ),
        loss_type=args.loss_type,
        use_fused_linear=args.fused_linear,
        pyfastpo_backend=args.backend,
    )
    model = tiny_setup.make_model(tokenizer, hidden_size=32)
    trainer = FastDPOTrainer(
        model=model,
        ref_model=tiny_setup.make_model(tokenizer, hidden_size=32),
        args=config,
        train_dataset=tiny_setup.make_preference_dataset(64, num_nouns=40),
        processing_class=tokenizer,
    )
    trainer.train()
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in trainer.model.parameters()]
    checksum = float(sum(p.detach().double().sum() for p in params))
    if trainer.accelerator.is_main_process:
        history = [h for h in trainer.state.log_history if "loss" in h]
        for h in history:
            print(f"step {h['step']}: loss {h['loss']:.6f} rewards/margins {h['rewards/margins']:+.6f}", flush=True)
        result = dict(
            world_size=trainer.accelerator.num_processes,
            wrapper=type(trainer.model_wrapped).__name__,
            sharded=any(hasattr(p, "full_tensor") for p in trainer.model.parameters()),  # FSDP2's DTensors
            history=history,
            param_checksum=checksum,
        )
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
