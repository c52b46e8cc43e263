"""The augment stage's LLM task: the distractor prompt, its answer format, parsing, budget.

The rules backend (``stages.text.distractor_rules``) edits one slot with lexicons; the llm
backend asks a causal LM for the same thing -- minimal edits that make a referring expression
WRONG for its target -- one request per (sentence, kind):

* `build_kind_prompt`: one few-shot prompt per (sentence, kind), three short examples per kind,
  asking for STRICT JSON ``{"distractors": ["...", ...]}`` with at most ``per_kind`` items;
  `build_repair_prompt` repeats it with the rejected answer and why it was rejected;
* `parse_distractors`: the answer's list, validated with pydantic; code fences and prose around
  the JSON are tolerated; anything else raises `DistractorParseError` (its message is written
  for the repair prompt);
* `distractor_schema` (vLLM's structured decoding) and `distractor_budget` (the request's
  max_new_tokens);
* `DistractorTask`: those pieces as the task of the shared request loop
  (`stages.models.generation.loop`), the same loop the multiview stage's views go through.

How an answer's texts become validated distractors is `stages.text.distractor_answers`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from stages.models.generation.answers import budget_for
from stages.models.generation.loop import Request
from stages.text.distractor_rules import KINDS
from stages.text.llm_output import (
    clean_text,
    json_error_message,
    repair_prompt,
    scan_json,
    validation_problems,
)

__all__ = ["PROMPT_VERSION", "DistractorAnswer", "DistractorJob", "DistractorParseError",
           "DistractorTask", "build_kind_prompt", "build_repair_prompt", "check_kind",
           "distractor_budget", "distractor_schema", "parse_distractors"]

PROMPT_VERSION = 1  # bump when the prompt text or answer handling changes (part of cache keys)

# --------------------------------------------------------------------------------------------
# prompts

_KIND_TASK = {
    "swap_color": (
        "replace one colour word with a different colour. Never use a shade or near-synonym of "
        "the original (gray/grey/silver, tan/beige/brown and gold/yellow count as the same "
        "colour)"
    ),
    "swap_spatial": (
        "replace one position word or phrase with its opposite (left/right, top/bottom, "
        "front/back, in front of/behind, near/far from, closest/farthest, above/below)"
    ),
    "swap_count": (
        "change one number or ordinal to a nearby different one (two -> three, second -> "
        "third), keeping the noun in agreement (one person -> two people)"
    ),
    "negation": (
        "negate one verb or preposition (holding -> not holding, with -> without, is sitting "
        "-> is not sitting, on the couch -> not on the couch), or remove an existing negation"
    ),
    "role_reversal": (
        "swap the two noun phrases around the verb, so that the object does the action to the "
        "subject (big dog chasing small cat -> small cat chasing big dog)"
    ),
}

_KIND_EXAMPLES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "swap_color": (
        ("the man in red", ("the man in blue", "the man in green")),
        ("white car on the left", ("black car on the left", "red car on the left")),
        ("girl with a pink umbrella", ("girl with a yellow umbrella",
                                       "girl with a blue umbrella")),
    ),
    "swap_spatial": (
        ("the man on the left", ("the man on the right",)),
        ("top left donut", ("bottom left donut", "top right donut")),
        ("dog in front of the couch", ("dog behind the couch",)),
    ),
    "swap_count": (
        ("two people on the bench", ("three people on the bench", "one person on the bench")),
        ("second bottle from left", ("third bottle from left", "first bottle from left")),
        ("the 3 zebras in back", ("the 4 zebras in back", "the 2 zebras in back")),
    ),
    "negation": (
        ("man holding an umbrella", ("man not holding an umbrella",)),
        ("woman with a hat", ("woman without a hat",)),
        ("the boy who is sitting on the bed", ("the boy who is not sitting on the bed",
                                               "the boy who is sitting not on the bed")),
    ),
    "role_reversal": (
        ("big dog chasing small cat", ("small cat chasing big dog",)),
        ("man holding the child", ("child holding the man",)),
        ("woman feeding a giraffe", ("giraffe feeding a woman",)),
    ),
}

_INTRO = (
    "You write hard negative captions for referring image segmentation. A referring expression "
    "describes one target object in an image. Write minimal edits of the sentence that make it "
    "WRONG for its target."
)
_RULES = (
    "Change only that one slot: keep every other word, the word order and the object being "
    "described (the head noun) exactly as they are. Write lowercase words without punctuation, "
    "like the input."
)
# The repair prompt's own parts (see `stages.text.llm_output.repair_prompt`).
ECHO_CHARS = 2000
CLOSING = 'Answer again with the corrected JSON object {"distractors": [...]} only.'


def check_kind(kind: str) -> None:
    """A ValueError naming the kinds, for an unknown distractor kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown distractor kind {kind!r}; use one of {', '.join(KINDS)}")


def answer_json(items: Sequence[str]) -> str:
    """An answer in the prompt's format: ``{"distractors": [...]}``."""
    return json.dumps({"distractors": list(items)}, ensure_ascii=False)


def build_kind_prompt(kind: str, sentence: str, per_kind: int) -> str:
    """The few-shot prompt asking for at most `per_kind` distractors of one kind, as JSON.

    Task text, the edit of this kind, three worked examples (their answers cut to `per_kind`
    items, so they never show more than is asked for), the strict answer format, then the
    sentence. Deterministic: its hash is part of the request-cache key.
    """
    check_kind(kind)
    if per_kind < 1:
        raise ValueError("per_kind must be >= 1")
    examples = []
    for source, answers in _KIND_EXAMPLES[kind]:
        examples.append(f"Sentence: {json.dumps(source)}\n"
                        f"Answer: {answer_json(answers[:per_kind])}")
    fmt = (
        "Answer with STRICT JSON only: a single JSON object "
        '{"distractors": ["...", ...]} holding at most '
        f"{per_kind} different edited sentence{'s' if per_kind > 1 else ''}, with no text "
        "before or after it, no code fences and no comments. If the sentence has nothing to "
        'edit for this kind, answer {"distractors": []}.'
    )
    return "\n\n".join([
        _INTRO,
        f"Edit kind {kind}: {_KIND_TASK[kind]}. {_RULES}",
        "Examples:\n\n" + "\n\n".join(examples),
        fmt,
        f"Kind: {kind}\nSentence: {json.dumps(clean_text(sentence), ensure_ascii=False)}"
        "\nAnswer:",
    ])


def build_repair_prompt(kind: str, sentence: str, per_kind: int, previous_output: str,
                        error_message: str) -> str:
    """The prompt again, plus the unusable answer (truncated) and why it was unusable: what
    the request loop sends after an unusable answer."""
    return repair_prompt(build_kind_prompt(kind, sentence, per_kind), previous_output,
                         error_message, echo_chars=ECHO_CHARS, closing=CLOSING)


# --------------------------------------------------------------------------------------------
# parsing


class DistractorParseError(ValueError):
    """The model's answer cannot be used; the message is written for the repair prompt."""


class DistractorAnswer(BaseModel):
    """The answer format: ``{"distractors": [str, ...]}`` (other keys are ignored)."""

    model_config = ConfigDict(extra="ignore")

    distractors: list[str]

    @field_validator("distractors", mode="before")
    @classmethod
    def _strings_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            bad = [v for v in value if not isinstance(v, str)]
            if bad:
                raise ValueError("every item must be a string (an edited sentence), got "
                                 + ", ".join(json.dumps(b) for b in bad[:3]))
        return value

    @field_validator("distractors")
    @classmethod
    def _clean(cls, value: list[str]) -> list[str]:
        return [t for t in (" ".join(v.split()) for v in value) if t]


def parse_distractors(text: str) -> list[str]:
    """The edited sentences of a model answer (whitespace collapsed, empty strings dropped).

    The first JSON object with a ``"distractors"`` key wins, wherever it is in the text (code
    fences, prose before or after it are fine). Raises `DistractorParseError` when there is no
    such object, the JSON is broken, or the value is not a list of strings.
    """
    hit, first_obj, first_err = scan_json(text, ("distractors",))
    if hit is None and first_err is not None:
        raise DistractorParseError(json_error_message(
            first_err, "write one complete JSON object with double-quoted strings and no "
                       "trailing commas"))
    answer = hit if hit is not None else first_obj
    if answer is None:
        raise DistractorParseError('no JSON object found in the answer; answer with '
                                   '{"distractors": ["...", ...]}')
    try:
        return DistractorAnswer.model_validate(answer).distractors
    except ValidationError as exc:
        problems = validation_problems(
            exc, missing='is missing: the object needs the key "distractors"')
        raise DistractorParseError("; ".join(problems)) from None


def distractor_schema(per_kind: int) -> dict[str, Any]:
    """JSON schema of an answer, for vLLM's structured decoding."""
    return {"type": "object", "additionalProperties": False, "required": ["distractors"],
            "properties": {"distractors": {"type": "array", "maxItems": int(per_kind),
                                           "items": {"type": "string", "minLength": 1}}}}


def distractor_budget(sentence: str, per_kind: int,
                      count_tokens: Callable[[str], int] | None = None,
                      cap: int | None = None) -> int:
    """max_new_tokens of one (sentence, kind) request: `budget_for` a reference answer of
    `per_kind` edits of `sentence`, each the sentence plus a three-word edit ("in front of"),
    written as the JSON the prompt asks for; at most `cap` when given."""
    edited = f"{clean_text(sentence)} in front of"
    return budget_for(answer_json([edited] * per_kind), count_tokens, cap)


# --------------------------------------------------------------------------------------------
# the task of the request loop

TARGET = "distractors"  # a request's one target: the answer's list


@dataclass(eq=False)
class DistractorJob:
    """One (sentence, kind) request: one job of the request loop (one request-cache entry)."""

    sentence: str
    kind: str


@dataclass(frozen=True)
class DistractorTask:
    """The augment llm task for `stages.models.generation.loop`: one request per (sentence,
    kind), its answer parsed as a whole (one target), a budget from the sentence, the JSON
    schema when the generator decodes with one."""

    per_kind: int
    echo_chars: int = ECHO_CHARS
    closing: str = CLOSING
    names_budget: bool = False  # "cut off at its token limit"

    def requests(self, job: DistractorJob) -> list[Request]:
        return [Request([TARGET])]

    def prompt(self, job: DistractorJob, request: Request) -> str:
        return build_kind_prompt(job.kind, job.sentence, self.per_kind)

    def model_input(self, job: DistractorJob, text: str) -> str:
        return text

    def budget(self, job: DistractorJob, request: Request,
               count_tokens: Callable[[str], int] | None, cap: int | None) -> int:
        return distractor_budget(job.sentence, self.per_kind, count_tokens, cap)

    def schema(self, job: DistractorJob, request: Request) -> dict[str, Any]:
        return distractor_schema(self.per_kind)

    def parse(self, job: DistractorJob, request: Request,
              text: str) -> tuple[dict[str, list[str]], dict[str, str]]:
        try:
            return {TARGET: parse_distractors(text)}, {}
        except DistractorParseError as exc:
            return {}, {TARGET: str(exc)}
