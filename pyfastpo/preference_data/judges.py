"""Pairwise judges: ``judge.compare(prompts, firsts, seconds) -> list[float]``.

A judge answers, for each ``(prompt, first, second)``, the probability that
``first`` is the better completion of ``prompt`` (hard choices are ``0.0`` or
``1.0``; ``0.5`` is "cannot tell"). It sees one presentation order per query:
:mod:`.ranking` asks both orders and combines them. :func:`as_judge` turns any
supported object into a judge:

- an object with ``compare`` (the protocol, :class:`Judge`): used as is;
- an object with TRL's pairwise ``judge(prompts, completions, shuffle_order=...)``
  (``BasePairwiseJudge`` of older trl, ``PairRMJudge``, your own): :class:`TRLPairwiseJudge`;
- any callable ``f(prompts, firsts, seconds) -> probabilities``: :class:`CallableJudge`.

:class:`CausalLMJudge` (a local causal LM read at the next token, no sampling)
and :class:`RewardModelJudge` (a sequence-classification reward model, the
scoring baseline) run transformers models. torch is imported by those only.
"""

from __future__ import annotations

import inspect
import math
from typing import Protocol, runtime_checkable

DEFAULT_TEMPLATE = (
    "Which response answers the prompt better?\n\n"
    "Prompt: {prompt}\n\n"
    "Response A: {first}\n\n"
    "Response B: {second}\n\n"
    "Answer with A or B only. The better response is:"
)


@runtime_checkable
class Judge(Protocol):
    """The judge protocol."""

    def compare(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[float]:
        """``[P(firsts[i] is better than seconds[i] as a completion of prompts[i])]``, one per query, in [0, 1]."""
        ...


def sigmoid(x: float) -> float:
    """``1 / (1 + exp(-x))`` without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def check_queries(prompts, firsts, seconds) -> int:
    """Raises ``ValueError`` unless the three lists have one length; returns it."""
    if not (len(prompts) == len(firsts) == len(seconds)):
        raise ValueError(f"prompts, firsts and seconds differ in length: {len(prompts)}, {len(firsts)}, {len(seconds)}")
    return len(prompts)


def check_probabilities(values, count: int, who: str) -> list[float]:
    """``values`` as floats, checked: ``count`` of them, each finite and in [0, 1]."""
    out = [float(v) for v in values]
    if len(out) != count:
        raise ValueError(f"{who} returned {len(out)} probabilities for {count} comparisons")
    bad = [v for v in out if not (0.0 <= v <= 1.0)]
    if bad:
        raise ValueError(f"{who} returned values outside [0, 1] (not probabilities): {bad[:5]}")
    return out


class CallableJudge:
    """A judge from a callable ``f(prompts, firsts, seconds) -> list[float]`` (probability that first is better)."""

    def __init__(self, fn):
        self.fn = fn

    def compare(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[float]:
        """See :class:`Judge`; the callable's answer, checked (length, each in [0, 1])."""
        count = check_queries(prompts, firsts, seconds)
        return check_probabilities(self.fn(list(prompts), list(firsts), list(seconds)), count, repr(self.fn))


class TRLPairwiseJudge:
    """TRL's pairwise judge interface, duck-typed (trl 1.13 no longer ships ``BasePairwiseJudge``).

    Wraps any object with ``judge(prompts: list[str], completions: list[list[str]],
    shuffle_order=True) -> list[int]`` (the index, 0 or 1, of the better of the two
    completions). It is called with ``shuffle_order=False`` (the order is ours to
    control: :mod:`.ranking` asks both) and, when its signature has
    ``return_scores`` (``PairRMJudge``), with ``return_scores=True``: the returned
    values are then the probability that the first completion is better. Indices
    map to 1.0 (index 0) and 0.0 (index 1); index ``-1`` (TRL's "could not
    decide", e.g. an unparsable LLM answer) is a tie, 0.5. Any other value raises
    ``ValueError``.
    """

    def __init__(self, judge):
        if not callable(getattr(judge, "judge", None)):
            raise TypeError(f"{type(judge).__name__} has no judge(prompts, completions, ...) method")
        self.inner = judge
        try:
            params = inspect.signature(judge.judge).parameters
        except (TypeError, ValueError):  # builtins without a signature
            params = {}
        self.kwargs = {}
        if "shuffle_order" in params:
            self.kwargs["shuffle_order"] = False
        self.scores = "return_scores" in params
        if self.scores:
            self.kwargs["return_scores"] = True

    def compare(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[float]:
        """See :class:`Judge`."""
        count = check_queries(prompts, firsts, seconds)
        who = f"{type(self.inner).__name__}.judge"
        values = list(self.inner.judge(list(prompts), [[a, b] for a, b in zip(firsts, seconds)], **self.kwargs))
        if self.scores:
            return check_probabilities(values, count, who)
        if len(values) != count:
            raise ValueError(f"{who} returned {len(values)} answers for {count} comparisons")
        out = []
        for value in values:
            if value not in (0, 1, -1) or isinstance(value, float) and not float(value).is_integer():
                raise ValueError(f"{who} returned {value!r}: expected the index 0 or 1 of the better completion, or -1")
            out.append({0: 1.0, 1: 0.0, -1: 0.5}[int(value)])
        return out


def as_judge(obj) -> Judge:
    """A :class:`Judge` from ``obj``: a judge (has ``compare``) as is; an object with TRL's
    ``judge`` method in a :class:`TRLPairwiseJudge`; a callable in a :class:`CallableJudge`.
    Raises ``TypeError`` for anything else."""
    if callable(getattr(obj, "compare", None)):
        return obj
    if callable(getattr(obj, "judge", None)):
        return TRLPairwiseJudge(obj)
    if callable(obj):
        return CallableJudge(obj)
    raise TypeError(
        f"cannot judge with {type(obj).__name__}: expected an object with compare(prompts, firsts, seconds), "
        "a TRL pairwise judge (judge(prompts, completions, shuffle_order)) or a callable"
    )


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        import torch

        return torch.device("cpu")


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    return pad


def left_padded(tokenizer, texts: list[str], device):
    """``input_ids``, ``attention_mask``, ``position_ids`` ``[B, T]`` for ``texts``, left-padded.

    Position ids count real tokens only (0 at each row's first token), as ``generate`` does."""
    import torch

    ids = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    width = max(map(len, ids))
    pad = _pad_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _chat(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


class CausalLMJudge:
    """A local causal LM as a pairwise judge, read at the next token (no sampling).

    Each query becomes ``template.format(prompt=..., first=..., second=...)``
    (wrapped as a user turn by the tokenizer's chat template when
    ``chat_template=True``); the model's next-token log-probabilities of the two
    label tokens ``labels[0]`` (first is better) and ``labels[1]``, softmaxed
    over the two, give P(first is better) = sigmoid(logp[A] - logp[B]).

    Args:
        model: a ``transformers`` causal LM (``model(input_ids, attention_mask).logits``
            ``[B, T, V]``), in eval mode (``from_pretrained`` gives that); run on its own device.
        tokenizer: its tokenizer; each label must encode to exactly one token
            (for BPE tokenizers that is often the label with a leading space, ``" A"``).
        template: a ``str.format`` template with ``{prompt}``, ``{first}``, ``{second}``.
        labels: the two answer strings (first better, second better).
        batch_size: queries per forward pass (left-padded, position ids from the mask).
        chat_template: wrap the comparison prompt with the tokenizer's chat template.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: str = DEFAULT_TEMPLATE,
        labels: tuple[str, str] = ("A", "B"),
        batch_size: int = 8,
        chat_template: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for field in ("{prompt}", "{first}", "{second}"):
            if field not in template:
                raise ValueError(f"the judge template lacks {field}")
        if len(labels) != 2:
            raise ValueError(f"labels must be two strings, got {labels!r}")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size, self.chat_template = batch_size, chat_template
        self.label_ids = tuple(self._label_id(label) for label in labels)
        if self.label_ids[0] == self.label_ids[1]:
            raise ValueError(f"labels {labels!r} encode to the same token {self.label_ids[0]}")
        try:
            self._positions = "position_ids" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self._positions = False

    def _label_id(self, label: str) -> int:
        ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"label {label!r} encodes to {len(ids)} tokens {ids}; pass single-token labels")
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is not None and ids[0] == unk:
            raise ValueError(f"label {label!r} is not in the tokenizer's vocabulary (encodes to the unknown token)")
        return ids[0]

    def text(self, prompt: str, first: str, second: str) -> str:
        """The comparison prompt the model reads for one query."""
        text = self.template.format(prompt=prompt, first=first, second=second)
        if self.chat_template:
            text = _chat(self.tokenizer, [{"role": "user", "content": text}], generation_prompt=True)
        return text

    def compare(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[float]:
        """See :class:`Judge`: ``sigmoid(logp[labels[0]] - logp[labels[1]])`` at the next token."""
        import torch

        check_queries(prompts, firsts, seconds)
        texts = [self.text(p, a, b) for p, a, b in zip(prompts, firsts, seconds)]
        device = _model_device(self.model)
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                input_ids, attention_mask, position_ids = left_padded(
                    self.tokenizer, texts[start : start + self.batch_size], device
                )
                extra = {"position_ids": position_ids} if self._positions else {}
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, -1]
                pair = logits.float().log_softmax(-1)[:, list(self.label_ids)]
                out.extend(torch.sigmoid(pair[:, 0] - pair[:, 1]).tolist())
        return out


class RewardModelJudge:
    """A sequence-classification reward model: one scalar score per (prompt, completion).

    P(first is better) = sigmoid(score(first) - score(second)) (Bradley-Terry), so
    both presentation orders agree by construction. :meth:`scores` gives the
    scores themselves, for the scoring-based baseline (rank by score). Scores are
    cached per ``(prompt, completion)``: each text is scored once.

    Args:
        model: a ``transformers`` ``...ForSequenceClassification`` with ``num_labels=1``
            (its ``config.pad_token_id`` set when ``batch_size > 1``: the score is read
            at the last non-pad token); run on its own device.
        tokenizer: its tokenizer.
        batch_size: texts per forward pass (right-padded).
        chat_template: score ``[user: prompt, assistant: completion]`` through the
            tokenizer's chat template instead of ``prompt + completion``.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, chat_template: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"a reward model gives one score per text; this model has num_labels={num_labels}")
        if batch_size > 1 and getattr(getattr(model, "config", None), "pad_token_id", 0) is None:
            raise ValueError("model.config.pad_token_id is None: set it (or use batch_size=1) to score padded batches")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.chat_template = batch_size, chat_template
        self.cache: dict[tuple[str, str], float] = {}

    def text(self, prompt: str, completion: str) -> str:
        """The text the model scores for one (prompt, completion)."""
        if self.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return _chat(self.tokenizer, messages, generation_prompt=False)
        return prompt + completion

    def scores(self, prompts: list[str], completions: list[str]) -> list[float]:
        """``[score(prompts[i], completions[i])]`` (floats; higher is better), cached."""
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions differ in length: {len(prompts)}, {len(completions)}")
        keys = list(zip(prompts, completions))
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        device = _model_device(self.model)
        pad = _pad_id(self.tokenizer)
        with torch.no_grad():
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                ids = [self.tokenizer(self.text(p, c), add_special_tokens=True)["input_ids"] for p, c in chunk]
                width = max(map(len, ids))
                input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], device=device)
                mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=device)
                values = self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
                self.cache.update(zip(chunk, values))
        return [self.cache[k] for k in keys]

    def compare(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[float]:
        """See :class:`Judge`: ``sigmoid(score(first) - score(second))``."""
        count = check_queries(prompts, firsts, seconds)
        values = self.scores(list(prompts) * 2, list(firsts) + list(seconds))
        return [sigmoid(values[i] - values[count + i]) for i in range(count)]
