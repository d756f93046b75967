"""Tiny, download-free building blocks shared by the examples and the tests.

- :func:`make_tokenizer`: a word-level tokenizer trained locally with the
  ``tokenizers`` library, wrapped as a ``PreTrainedTokenizerFast`` with
  ``<pad>``/``<eos>`` tokens.
- :func:`make_model`: a 2-layer Llama built from a ``LlamaConfig`` (random init).
- :func:`make_preference_dataset`: a synthetic preference data set with a
  learnable preference. Each prompt asks for an object of some colour
  (``"give me a red cat :"``); the chosen answer names that colour
  (``" here is a red cat"``), the rejected answer another one
  (``" here is a blue cat"``). The preferred token is the colour word in the
  prompt, so a policy can learn it with one attention hop (copying), and the
  chosen and rejected completions differ in one token only.

Everything is seeded: the same arguments give the same tokenizer, model and data.
"""

from __future__ import annotations

import random

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray", "gold"]
TEMPLATES = [
    ("give me a {c} {n} :", " here is a {c} {n}"),
    ("i want a {c} {n} please :", " take this {c} {n}"),
    ("show a {c} {n} :", " look , a {c} {n}"),
]
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def nouns(count: int = 200) -> list[str]:
    """Made-up object names (``obj0`` ...), one vocabulary word each: they set the vocabulary size."""
    base = ["cat", "dog", "car", "house", "tree", "bird", "boat", "hat", "cup", "ball", "shoe", "book"]
    return base + [f"obj{i}" for i in range(max(0, count - len(base)))]


def corpus(num_nouns: int = 200) -> list[str]:
    """Every word the tokenizer must know, as training text."""
    words = set()
    for prompt, answer in TEMPLATES:
        words.update((prompt + answer).replace("{c}", "").replace("{n}", "").split())
    return [" ".join(sorted(words)), " ".join(COLORS), " ".join(nouns(num_nouns))]


def make_tokenizer(num_nouns: int = 200):
    """A word-level ``PreTrainedTokenizerFast`` trained on :func:`corpus` (vocabulary ~ num_nouns + 40)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus(num_nouns), trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A randomly initialised tiny ``LlamaForCausalLM`` (float32, eager attention) for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def make_pairs(num_pairs: int = 256, *, num_nouns: int = 200, seed: int = 0) -> dict[str, list[str]]:
    """``{"prompt": [...], "chosen": [...], "rejected": [...]}`` as plain strings."""
    rng = random.Random(seed)
    names = nouns(num_nouns)
    out = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(num_pairs):
        prompt, answer = rng.choice(TEMPLATES)
        color, other = rng.sample(COLORS, 2)
        noun = rng.choice(names)
        out["prompt"].append(prompt.format(c=color, n=noun))
        out["chosen"].append(answer.format(c=color, n=noun))
        out["rejected"].append(answer.format(c=other, n=noun))
    return out


def make_preference_dataset(num_pairs: int = 256, *, num_nouns: int = 200, seed: int = 0):
    """A ``datasets.Dataset`` in TRL's standard prompt/chosen/rejected format."""
    from datasets import Dataset

    return Dataset.from_dict(make_pairs(num_pairs, num_nouns=num_nouns, seed=seed))


def tokenize_pairs(tokenizer, pairs: dict[str, list[str]]):
    """Batched tensors for a plain PyTorch loop, in the TRL/pyfastpo layout.

    Returns ``input_ids``, ``attention_mask`` ``[2B, T]`` (rows ``[:B]`` prompt +
    chosen, rows ``[B:]`` prompt + rejected, right-padded) and ``labels``
    ``[2B, T-1]`` already shifted (``labels[:, t]`` is the token at ``t + 1``),
    with prompt and padding set to -100.
    """
    import torch

    eos = tokenizer.eos_token
    seqs, masks = [], []
    for key in ("chosen", "rejected"):
        for prompt, completion in zip(pairs["prompt"], pairs[key]):
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            c = tokenizer(completion + eos, add_special_tokens=False)["input_ids"]
            seqs.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    completion = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    labels = input_ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)
    return input_ids, attention_mask, labels


def dpo_config_kwargs(**overrides) -> dict:
    """``DPOConfig`` keyword arguments for a quick, deterministic, offline CPU run."""
    kwargs = dict(
        output_dir="/tmp/pyfastpo-tiny-dpo",
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_steps=20,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=64,
    )
    kwargs.update(overrides)
    return kwargs


def sft_warmup(
    model,
    tokenizer,
    pairs: dict[str, list[str]],
    *,
    steps: int = 60,
    batch_pairs: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
):
    """Supervised warm-up on both completions of every pair (plain PyTorch, in place; returns ``model``).

    DPO starts from an SFT model in practice. Training on chosen *and* rejected
    completions teaches the template while leaving the reference indifferent
    between the colours (about half its mass on the asked colour), so DPO has
    a real preference to learn. It also gives the reference realistic token
    entropies: a random model is near-uniform (entropy ~ log V), where
    MallowsPO's dispersion is ~1 and its loss has almost no gradient.
    """
    import torch

    input_ids, attention_mask, labels = tokenize_pairs(tokenizer, pairs)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, input_ids.shape[0], (2 * batch_pairs,), generator=generator)
        logits = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[rows].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


def make_sft_model(tokenizer, *, pairs: int = 512, steps: int = 60, seed: int = 0, **model_kwargs):
    """:func:`make_model` followed by :func:`sft_warmup` on :func:`make_pairs` (a separate seed from the DPO data)."""
    model = make_model(tokenizer, seed=seed, **model_kwargs)
    return sft_warmup(model, tokenizer, make_pairs(pairs, seed=seed + 1000), steps=steps, seed=seed)
