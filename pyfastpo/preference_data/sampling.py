"""Completions sampled from a policy with ``transformers``' ``generate``."""

from __future__ import annotations


def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    k: int,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    chat_template: bool = False,
    progress: bool = True,
) -> list[list[str]]:
    """``k`` sampled completions for each prompt: ``list`` (N) of ``list[str]`` (k).

    ``generate`` with ``do_sample=True``, ``num_return_sequences=k``; prompts
    left-padded, ``batch_size`` prompts per call (``batch_size * k`` sequences);
    only the new tokens are decoded, special tokens skipped. ``torch`` is seeded
    with ``seed + batch index`` before each call, so the same arguments give the
    same completions on the same device. ``chat_template=True`` formats each prompt
    as a user turn with the tokenizer's chat template (generation prompt added). No top-k cut (``top_k=0``).
    The model runs on its own device, under ``torch.no_grad``.
    """
    import torch
    from tqdm.auto import tqdm

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling), got {temperature}")
    texts = list(prompts)
    if chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in texts
        ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    device = next(model.parameters()).device
    out: list[list[str]] = []
    with torch.no_grad(), tqdm(total=len(texts), disable=not progress, desc="sampling", unit="prompt") as bar:
        for batch, start in enumerate(range(0, len(texts), batch_size)):
            ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts[start : start + batch_size]]
            width = max(map(len, ids))
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device)
            torch.manual_seed(seed + batch)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                num_return_sequences=k,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                pad_token_id=pad,
            )
            decoded = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            out.extend(decoded[i : i + k] for i in range(0, len(decoded), k))
            bar.update(len(ids))
    return out
