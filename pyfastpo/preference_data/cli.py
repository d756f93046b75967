"""``python -m pyfastpo.preference_data`` / ``pyfastpo-pairs``: prompts -> ranked completions -> preference pairs.

::

    pyfastpo-pairs prompts.jsonl --policy ./sft --k 8 --judge-lm ./judge --pairs best_worst --out out/pairs

Input: a JSONL file (one object per line with ``prompt`` and optionally
``completions``, a list of >= 2 strings) or a dataset saved with
``save_to_disk`` (same columns). Prompts without completions get ``--k``
sampled from ``--policy``. The judge is ``--judge-lm`` (a causal LM:
:class:`~.judges.CausalLMJudge`) or ``--judge-reward`` (a sequence-classification
reward model: :class:`~.judges.RewardModelJudge`), local paths.

Output in ``--out``: ``ranked.jsonl``, one line per finished prompt (appended,
flushed and fsynced after each batch of ``--batch-prompts`` prompts), then
``pairs/`` (``save_to_disk``) and ``pairs.jsonl``. Resumable: a rerun with the
same ``--out`` skips the prompts already in ``ranked.jsonl`` (a crash loses at
most the batch in flight). Input errors are reported before any model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .builders import STRATEGIES, build_pairs
from .ranking import Ranking, rank_completions

RANKED = "ranked.jsonl"


class InputError(ValueError):
    """Bad input or arguments, found before any model is loaded."""


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``argv`` defaults to ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(prog="pyfastpo-pairs", description=__doc__.split("\n\n")[0].strip("`: "))
    p.add_argument("input", help="JSONL file (prompt, optional completions) or a datasets.save_to_disk folder")
    p.add_argument("--out", required=True, help="output folder (ranked.jsonl, pairs/, pairs.jsonl); resumed if present")
    p.add_argument("--policy", help="local causal LM to sample completions for prompts without them")
    p.add_argument("--k", type=int, default=8, help="completions to sample per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed and the ranking's insertion-order seed")
    judge = p.add_mutually_exclusive_group()
    judge.add_argument("--judge-lm", help="local causal LM judge (next-token log-probs of the two labels)")
    judge.add_argument("--judge-reward", help="local sequence-classification reward model (scoring baseline)")
    p.add_argument("--judge-template", help="comparison prompt with {prompt}, {first}, {second} (causal LM judge)")
    p.add_argument("--judge-labels", default="A,B", help="the two single-token answers, comma-separated (default A,B)")
    p.add_argument("--chat-template", action="store_true", help="format prompts with the tokenizers' chat templates")
    p.add_argument("--one-order", action="store_true", help="ask each comparison in one presentation order only")
    p.add_argument("--pairs", choices=sorted(STRATEGIES), default="best_worst")
    p.add_argument("--judge-missing", action="store_true", help="judge built pairs the ranking did not, for confidence")
    p.add_argument("--keep-ties", action="store_true", help="keep pairs judged a tie or with identical texts")
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts per step (sampled, ranked, then saved)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass of the judge / policy")
    p.add_argument("--device", help="device of the models (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def read_records(path: str) -> list[dict]:
    """The input records: ``[{"prompt": str, "completions": list[str] | None}]``, checked (:class:`InputError`)."""
    source = Path(path)
    if not source.exists():
        raise InputError(f"input {path} does not exist")
    if source.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(source))
        if hasattr(data, "keys") and not hasattr(data, "column_names"):
            raise InputError(f"{path} is a DatasetDict ({list(data.keys())}); pass one split's folder")
        rows = [dict(row) for row in data]
    else:
        rows = []
        with open(source) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{number}: not JSON ({e})") from None
    if not rows:
        raise InputError(f"{path} holds no records")
    records = []
    for number, row in enumerate(rows):
        where = f"{path}: record {number}"
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise InputError(f"{where}: needs a string field 'prompt'")
        completions = row.get("completions")
        if completions is not None:
            if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
                raise InputError(f"{where}: 'completions' must be a list of strings")
            if len(completions) < 2:
                raise InputError(f"{where}: {len(completions)} completion(s); ranking needs at least 2")
        records.append({"prompt": row["prompt"], "completions": completions})
    return records


def check_args(args: argparse.Namespace, records: list[dict]) -> None:
    """Argument checks that need no model (:class:`InputError`)."""
    if (args.judge_lm is None) == (args.judge_reward is None):
        raise InputError("pass exactly one judge: --judge-lm PATH or --judge-reward PATH")
    for flag, value in (
        ("--judge-lm", args.judge_lm),
        ("--judge-reward", args.judge_reward),
        ("--policy", args.policy),
    ):
        if value is not None and not Path(value).exists():
            raise InputError(f"{flag} {value}: no such local path")
    if any(r["completions"] is None for r in records):
        if args.policy is None:
            raise InputError("some prompts have no 'completions': pass --policy PATH to sample them")
        if args.k < 2:
            raise InputError(f"--k {args.k}: ranking needs at least 2 completions per prompt")
        if args.max_new_tokens < 1 or args.temperature <= 0:
            raise InputError("--max-new-tokens must be >= 1 and --temperature > 0")
    if args.batch_prompts < 1 or args.batch_size < 1:
        raise InputError("--batch-prompts and --batch-size must be >= 1")
    labels = args.judge_labels.split(",")
    if len(labels) != 2 or not all(labels):
        raise InputError(f"--judge-labels {args.judge_labels!r}: two comma-separated labels")
    if args.judge_template is not None:
        for field in ("{prompt}", "{first}", "{second}"):
            if field not in args.judge_template:
                raise InputError(f"--judge-template lacks {field}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} exists and is not a folder")


def read_done(path: Path, records: list[dict]) -> dict[int, dict]:
    """``{prompt index: line}`` already in ``ranked.jsonl``. A torn last line (a crash mid-write) is cut off;
    a line whose prompt differs from the input's raises :class:`InputError` (another input in the same --out)."""
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    keep = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                break
            if not raw.endswith(b"\n"):
                break
            index = line["index"]
            if index >= len(records) or records[index]["prompt"] != line["prompt"]:
                raise InputError(f"{path}: record {index} is not this input's (another input in the same --out?)")
            done[index] = line
            keep += len(raw)
    if keep != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return done


def load_model(path: str, kind: str, device, dtype: str):
    """A ``transformers`` model and tokenizer from a local path (``kind``: ``causal`` or ``reward``), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = cls.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if kind == "reward" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None
    return model, tokenizer


def make_judge(args: argparse.Namespace, device):
    """The judge the flags name, loaded."""
    from .judges import DEFAULT_TEMPLATE, CausalLMJudge, RewardModelJudge

    if args.judge_lm is not None:
        model, tokenizer = load_model(args.judge_lm, "causal", device, args.dtype)
        return CausalLMJudge(
            model,
            tokenizer,
            template=args.judge_template or DEFAULT_TEMPLATE,
            labels=tuple(args.judge_labels.split(",")),
            batch_size=args.batch_size,
            chat_template=args.chat_template,
        )
    model, tokenizer = load_model(args.judge_reward, "reward", device, args.dtype)
    return RewardModelJudge(model, tokenizer, batch_size=args.batch_size, chat_template=args.chat_template)


def append_lines(path: Path, lines: list[dict]) -> None:
    """Append JSON lines, flushed and fsynced."""
    with open(path, "a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv=None) -> int:
    """Runs the command line; returns the exit status (2 for input errors)."""
    args = parse_args(argv)
    try:
        records = read_records(args.input)
        check_args(args, records)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        done = read_done(out / RANKED, records)
    except InputError as e:
        print(f"pyfastpo-pairs: error: {e}", file=sys.stderr)
        return 2
    todo = [i for i in range(len(records)) if i not in done]
    progress = not args.no_progress
    print(f"{len(records)} prompts, {len(done)} already ranked in {out / RANKED}, {len(todo)} to go", file=sys.stderr)
    judge = None
    if todo or args.judge_missing:
        import torch

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        judge = make_judge(args, device)
        policy = None
        if any(records[i]["completions"] is None for i in todo):
            policy = load_model(args.policy, "causal", device, args.dtype)
        from tqdm.auto import tqdm

        # Batches on a fixed grid of the input (a crash loses whole batches), so a resumed run
        # samples and ranks exactly what an uninterrupted one would.
        with tqdm(total=len(records), initial=len(done), disable=not progress, desc="prompts", unit="prompt") as bar:
            for start in range(0, len(records), args.batch_prompts):
                batch = [i for i in range(start, min(start + args.batch_prompts, len(records))) if i not in done]
                if batch:
                    rank_batch(args, records, batch, judge, policy, out / RANKED, done, seed=args.seed + start)
                    bar.update(len(batch))
    return write_pairs(args, records, done, judge, out)


def rank_batch(args, records, batch: list[int], judge, policy, ranked_path: Path, done: dict, *, seed: int) -> None:
    """Sample (where needed, seeded with ``seed``), rank and append one batch of prompts to ``ranked.jsonl``."""
    from .sampling import sample_completions

    prompts = [records[i]["prompt"] for i in batch]
    completions = [records[i]["completions"] for i in batch]
    need = [n for n, c in enumerate(completions) if c is None]
    if need:
        model, tokenizer = policy
        sampled = sample_completions(
            model,
            tokenizer,
            [prompts[n] for n in need],
            args.k,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=max(1, args.batch_size // args.k),
            seed=seed,
            chat_template=args.chat_template,
            progress=False,
        )
        for n, group in zip(need, sampled):
            completions[n] = group
    rankings = rank_completions(
        judge, prompts, completions, both_orders=not args.one_order, seed=args.seed, progress=False
    )
    lines = [
        {"index": i, "prompt": p, "completions": c, **r.to_json()}
        for i, p, c, r in zip(batch, prompts, completions, rankings)
    ]
    append_lines(ranked_path, lines)
    done.update(zip(batch, lines))


def write_pairs(args, records, done: dict, judge, out: Path) -> int:
    """Builds the pairs from every ranked prompt; writes ``pairs/`` and ``pairs.jsonl``."""
    indices = sorted(done)
    rankings = [Ranking.from_json(done[i]) for i in indices]
    data = build_pairs(
        [done[i]["prompt"] for i in indices],
        [done[i]["completions"] for i in indices],
        rankings,
        args.pairs,
        judge=judge if args.judge_missing else None,
        both_orders=not args.one_order,
        drop_ties=not args.keep_ties,
    )
    data.save_to_disk(str(out / "pairs"))
    with open(out / "pairs.jsonl", "w") as f:  # by hand: Dataset.to_json fails on an empty dataset
        for row in data:
            f.write(json.dumps(row) + "\n")
    comparisons = sum(r.comparisons for r in rankings)
    ties = sum(r.ties for r in rankings)
    print(
        f"{len(data)} pairs ({args.pairs}) from {len(indices)} prompts; {comparisons} comparisons, {ties} ties; "
        f"written to {out / 'pairs'} and {out / 'pairs.jsonl'}",
        file=sys.stderr,
    )
    return 0
