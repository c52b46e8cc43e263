"""What a generator returns and how many tokens it may write.

Shared by every generator and task: `Answer` (a text that says whether it was cut off at its
token limit), `GenerationStats` (running totals for the manifest's requests/s and tokens/s),
the per-request limits (`per_request`) and the budget rule (`budget_for`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["ANSWER_MARGIN", "ANSWER_SLACK", "BUDGET_VERSION", "CHARS_PER_TOKEN", "Answer",
           "GenerationStats", "Generator", "budget_for", "context_length", "estimate_tokens",
           "is_truncated", "per_request"]


class Answer(str):
    """A generated text that also says whether it was cut off at its token limit.

    vLLM reports ``finish_reason == "length"``; for transformers ``generate`` it is an answer
    that reached its `max_new_tokens` without writing EOS. A plain ``str`` (e.g. from a
    scripted test generator) counts as not truncated: see `is_truncated`.
    """

    truncated: bool

    def __new__(cls, text: str = "", truncated: bool = False) -> Answer:
        obj = super().__new__(cls, text)
        obj.truncated = bool(truncated)
        return obj


def is_truncated(text: str) -> bool:
    """Was this answer cut off at its token limit (an `Answer` that says so)?"""
    return bool(getattr(text, "truncated", False))


class Generator(Protocol):
    """What the request loop needs: one answer per request, in order.

    A request is whatever the task builds (an ``(image, prompt)`` pair for a VLM, a prompt
    for a text model). `max_new_tokens` is one limit for all requests or one per request;
    answers may be `Answer`s that say whether they were cut off at that limit. A generator
    with ``supports_schema = True`` also takes ``schema=`` (one JSON schema per request) for
    structured decoding; one with ``count_tokens(text)`` has budgets counted with its own
    tokenizer. `batch_size` is the most requests per model call; None (``auto``) lets the
    generator choose (the transformers one fits its batches to its memory).
    """

    def generate(self, requests: list[Any], max_new_tokens: int | Sequence[int] = 256,
                 batch_size: int | None = 8) -> list[str]: ...


@dataclass
class GenerationStats:
    """Running totals, for the stage's log line, its manifest and its benchmark (tokens/s).

    `batch_sizes`: how many `generate` calls ran with each batch size; `oom_retries`: how
    many calls ran out of memory and were retried with half the batch (their time is in
    `seconds`).
    """

    requests: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    truncated: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    oom_retries: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def per_request(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """One limit per request, from one limit for all or a list of `n`."""
    if isinstance(max_new_tokens, int):
        return [int(max_new_tokens)] * n
    budgets = [int(b) for b in max_new_tokens]
    if len(budgets) != n:
        raise ValueError(f"{len(budgets)} max_new_tokens for {n} requests")
    return budgets


def context_length(model: Any) -> int | None:
    """The model's context (positions) from its config (LLaVA: its text model's), or None."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


# -- token budget of an answer ---------------------------------------------------------------
# A request's max_new_tokens follows what it asks for: the tokens of a reference answer of
# the same size (views: the template backend's views of a worst-case instance, written as the
# JSON the prompt asks for; distractors: the sentence with a three-word edit), counted with the
# tokenizer in use, times ANSWER_MARGIN, plus ANSWER_SLACK. Measured with the tiny BPE and the
# character estimate, a view entry is 60-75 tokens; LLaVA's expressions run longer than the
# template's (the worked examples' appearance is 42 characters against the template's 25) and
# an answer may be pretty-printed (newlines and indentation), so 1.5x; the slack covers a code
# fence, a short preamble and EOS. Without a tokenizer, CHARS_PER_TOKEN estimates: Llama's
# tokenizer writes this JSON at about 3.3 characters per token, 3 errs on the long side. The
# model's context (minus the prompt) and a configured max_new_tokens cap it; nothing else does.
ANSWER_MARGIN = 1.5
ANSWER_SLACK = 32
CHARS_PER_TOKEN = 3.0
BUDGET_VERSION = 1  # bump when the budget rule changes: part of the request-cache keys


def estimate_tokens(text: str) -> int:
    """Tokens of `text` without a tokenizer: one per CHARS_PER_TOKEN characters, rounded up."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def budget_for(reference: str, count_tokens: Callable[[str], int] | None = None,
               cap: int | None = None) -> int:
    """max_new_tokens for an answer like `reference`: its tokens (`count_tokens`, else
    `estimate_tokens`) x ANSWER_MARGIN + ANSWER_SLACK, at most `cap` when given.
    Shared by the view and the distractor tasks."""
    count = count_tokens or estimate_tokens
    budget = math.ceil(ANSWER_MARGIN * count(reference)) + ANSWER_SLACK
    return min(budget, int(cap)) if cap is not None else budget
