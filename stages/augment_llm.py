"""LLM backend of the augment stage: distractors written by a causal language model.

The rules backend (``stages.augment_rules``) edits one slot with lexicons; this backend asks a
Hugging Face causal LM for the same thing -- minimal edits that make a referring expression
WRONG for its target -- and then holds the answers to exactly the same validity checks
(``augment_rules.validate``), so both backends produce the same kind of data.

Pieces:

* `build_kind_prompt`: one few-shot prompt per (sentence, kind), three short examples per kind,
  asking for STRICT JSON ``{"distractors": ["...", ...]}`` with at most ``per_kind`` items;
  `build_repair_prompt` repeats it with the rejected answer and why it was rejected.
* `parse_distractors`: the answer's list, validated with pydantic; code fences and prose around
  the JSON are tolerated; anything else raises `DistractorParseError` (its message is written
  for the repair prompt).
* `CausalLMGenerator`: batched (left padding), greedy generation with any causal LM from a
  local directory or a hub id already in the local cache (``model="tiny"``: a tiny random
  Llama built by ``vlm.build_tiny_causal_lm`` and loaded back with ``from_pretrained``). Model
  resolution, devices and dtypes are those of ``stages.vlm``, offline mode that of
  ``stages.hub``: nothing is ever downloaded, and a missing model is an `InputError` at once.
  (``vlm.HFGenerator`` is an image-text-to-text generator: it cannot run a text-only model.)
* `diff_span`: the token span of the source that a model's text replaced, so each answer can be
  turned into an ``augment_rules.Distractor`` (span + slot) and validated.
* `run_llm_backend`: cache-first and resumable per request, like ``vlm.run_model_backend``.

How an answer becomes distractors (per request, i.e. per (sentence, kind)):

1. texts are normalised like REFER sentences (lowercase, whitespace-split, punctuation at word
   edges stripped) and de-duplicated;
2. a text identical to the source is rejected ("identical") and does not count;
3. like ``generate_validated``, at most ``2 * per_kind`` candidates are examined, in the model's
   order, until ``per_kind`` are accepted; the rest is ignored;
4. the span is the token diff (`diff_span`). A minimal edit may touch several places only for
   role_reversal (two noun phrases swap) or for agreement (an extra change that only
   re-inflects a word: "two little girls" -> "one little girl"); when the text makes two or more
   real edits ("red ... left" -> "green ... right" for a colour swap), the distractor's span is
   its first edit only, so ``validate`` rejects it as "edit outside slot";
5. ``validate(source, d, context)`` decides; a text that passes it but does not touch the kind's
   words at all (a "swap_color" without a colour on both sides, a "negation" without a negation
   word, ...) is rejected as ``"not a <kind> edit"``.

An answer that is still unparseable after ``max_attempts`` becomes one rejected row with text ""
and reason ``"unparseable: <last error>"``.

torch and transformers are imported inside functions only (importing this module is cheap).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from stages.text.distractor_rules import (
    COLORS,
    KINDS,
    SPATIAL_OPPOSITES,
    Distractor,
    SceneContext,
    validate,
)

__all__ = [
    "PROMPT_VERSION",
    "CausalLMGenerator",
    "DistractorAnswer",
    "DistractorParseError",
    "PromptGenerator",
    "build_distractor",
    "build_kind_prompt",
    "build_repair_prompt",
    "candidate_reason",
    "diff_span",
    "get_causal_lm",
    "llm_model_key",
    "normalize_text",
    "parse_distractors",
    "run_llm_backend",
    "tiny_causal_lm_dir",
]

log = logging.getLogger(__name__)

PROMPT_VERSION = 1  # bump when the prompt text or answer handling changes (part of cache keys)
_TINY_LM_VERSION = 1  # bump when the tiny causal LM changes, so cached copies are rebuilt

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
_MAX_ECHO_CHARS = 2000


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown distractor kind {kind!r}; use one of {', '.join(KINDS)}")


def _answer_json(items: Sequence[str]) -> str:
    return json.dumps({"distractors": list(items)}, ensure_ascii=False)


def _clean_sentence(sentence: str) -> str:
    from stages.vlm import _clean_text  # defuses <token>-like strings, collapses whitespace

    return _clean_text(sentence)


def build_kind_prompt(kind: str, sentence: str, per_kind: int) -> str:
    """The few-shot prompt asking for at most `per_kind` distractors of one kind, as JSON.

    Task text, the edit of this kind, three worked examples (their answers cut to `per_kind`
    items, so they never show more than is asked for), the strict answer format, then the
    sentence. Deterministic: its hash is part of the request-cache key.
    """
    _check_kind(kind)
    if per_kind < 1:
        raise ValueError("per_kind must be >= 1")
    examples = []
    for source, answers in _KIND_EXAMPLES[kind]:
        examples.append(f"Sentence: {json.dumps(source)}\n"
                        f"Answer: {_answer_json(answers[:per_kind])}")
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
        f"Kind: {kind}\nSentence: {json.dumps(_clean_sentence(sentence), ensure_ascii=False)}"
        "\nAnswer:",
    ])


def build_repair_prompt(kind: str, sentence: str, per_kind: int, previous_output: str,
                        error_message: str) -> str:
    """The prompt again, plus the unusable answer (truncated) and why it was unusable."""
    from stages.vlm import _clean_text_keep_lines

    previous = previous_output.strip()
    if len(previous) > _MAX_ECHO_CHARS:
        previous = previous[:_MAX_ECHO_CHARS] + " ...[truncated]"
    return "\n\n".join([
        build_kind_prompt(kind, sentence, per_kind),
        "Your previous answer was:\n<<<\n" + _clean_text_keep_lines(previous) + "\n>>>",
        f"It could not be used: {error_message}",
        'Answer again with the corrected JSON object {"distractors": [...]} only.',
    ])


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
    from stages.vlm import _json_candidates  # every JSON object that starts at a "{"

    first_obj: dict[str, Any] | None = None
    first_err: json.JSONDecodeError | None = None
    for cand in _json_candidates(text):
        if isinstance(cand, json.JSONDecodeError):
            first_err = first_err or cand
            continue
        if "distractors" in cand:
            first_obj = cand
            break
        first_obj = first_obj or cand
    if first_obj is None or ("distractors" not in first_obj and first_err is not None):
        if first_err is not None:
            raise DistractorParseError(
                f"the answer is not valid JSON ({first_err.msg} at line {first_err.lineno} "
                f"column {first_err.colno}); write one complete JSON object with double-quoted "
                "strings and no trailing commas")
        raise DistractorParseError('no JSON object found in the answer; answer with '
                                   '{"distractors": ["...", ...]}')
    try:
        return DistractorAnswer.model_validate(first_obj).distractors
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = 'is missing: the object needs the key "distractors"'
            problems.append(f'"{where}" {msg}' if where else msg)
        raise DistractorParseError("; ".join(problems)) from None


# --------------------------------------------------------------------------------------------
# from a text to a Distractor (span + slot), and the kind check

_EDGE_PUNCT = ".,;:!?\"'`()[]{}"


def normalize_text(text: str) -> list[str]:
    """REFER-style tokens of a model's text: lowercase, split, punctuation at word edges off."""
    tokens = (t.strip(_EDGE_PUNCT) for t in text.lower().split())
    return [t for t in tokens if t]


def diff_span(source_tokens: Sequence[str], new_tokens: Sequence[str]) -> tuple[int, int, str]:
    """``(start, end, slot)``: the smallest source span ``[start, end)`` whose replacement turns
    `source_tokens` into `new_tokens`, and the slot string ``"<old words>-><new words>"``.

    Common prefix, then common suffix of what is left (so prefix and suffix never overlap):
    ``"the man in red" / "the man in blue"`` -> ``(3, 4, "red->blue")``; an insertion is an
    empty span (``(1, 1, "->not")``), a deletion has no new words (``"not->"``); identical
    token lists give ``(n, n, "->")``.
    """
    src, dst = list(source_tokens), list(new_tokens)
    limit = min(len(src), len(dst))
    pre = 0
    while pre < limit and src[pre] == dst[pre]:
        pre += 1
    suf = 0
    while suf < limit - pre and src[len(src) - 1 - suf] == dst[len(dst) - 1 - suf]:
        suf += 1
    end = len(src) - suf
    new_words = dst[pre:len(dst) - suf]
    return pre, end, f"{' '.join(src[pre:end])}->{' '.join(new_words)}"


def _word_lemmas(word: str) -> set[str]:
    from stages.text.distractor_rules import lemmas as _lemmas
    from stages.text.distractor_rules import noun_lemma as _noun_lemma

    out = {word, _noun_lemma(word) or word}
    for lemmas in _lemmas(word).values():
        out.update(lemmas)
    return out


_ARTICLE_FORMS = frozenset({"a", "an"})


def _inflection_only(old: Sequence[str], new: Sequence[str]) -> bool:
    """Is this change only agreement (same lemmas word by word: girls->girl, is->are, a->an)?"""
    if len(old) != len(new) or not old:
        return False
    for o, n in zip(old, new, strict=True):
        if o == n or {o, n} <= _ARTICLE_FORMS:
            continue
        if not _word_lemmas(o) & _word_lemmas(n):
            return False
    return True


def build_distractor(kind: str, source: str, text: str) -> Distractor:
    """`text` as an ``augment_rules.Distractor`` of `source`, its span and slot from the diff.

    The span is `diff_span`'s, except when the text makes two or more separate real edits
    (edits that are not just agreement, see the module docstring) and the kind is not
    role_reversal: then it is the first edit's span, and ``validate`` reports the rest as
    "edit outside slot".
    """
    src = source.lower().split()
    dst = normalize_text(text)
    start, end, slot = diff_span(src, dst)
    if kind != "role_reversal" and src != dst:
        ops = difflib.SequenceMatcher(None, src, dst, autojunk=False).get_opcodes()
        real = [(i1, i2, j1, j2) for tag, i1, i2, j1, j2 in ops
                if tag != "equal" and not _inflection_only(src[i1:i2], dst[j1:j2])]
        if len(real) > 1:
            i1, i2, j1, j2 = real[0]
            start, end = i1, i2
            slot = f"{' '.join(src[i1:i2])}->{' '.join(dst[j1:j2])}"
    return Distractor(kind=kind, text=" ".join(dst), slot=slot, span=(start, end))


_SPATIAL_WORDS = frozenset(SPATIAL_OPPOSITES) | frozenset(SPATIAL_OPPOSITES.values()) | {
    "behind", "near", "far", "close", "nearer", "closer", "farther", "further", "beside",
    "next", "middle", "center", "centre", "between", "side",
}
_COLOR_WORDS = frozenset(COLORS)
_NEGATION_WORDS = frozenset({
    "not", "no", "without", "never", "none", "nothing", "nobody", "nor", "isnt", "arent",
    "doesnt", "dont", "didnt", "wasnt", "werent", "hasnt", "havent", "cannot", "cant",
})


def _is_count_word(word: str) -> bool:
    from stages.text.distractor_rules import NUMBERS as _NUMBERS

    return word in _NUMBERS


def candidate_reason(source: str, d: Distractor,
                     context: SceneContext | None = None) -> str | None:
    """Why `d` is not kept: ``validate``'s reason, else ``"not a <kind> edit"``, else None.

    The kind check: swap_color needs a colour word among both the replaced and the new words,
    swap_spatial a position word on both sides, swap_count a number/ordinal on both sides,
    negation a negation word (not, without, no, ...) on either side; role_reversal is fully
    checked by ``validate`` ("head noun not swapped").
    """
    reason = validate(source, d, context)
    if reason is not None:
        return reason
    src = source.lower().split()
    dst = d.text.split()
    s, e = d.span
    old, new = set(src[s:e]), set(dst[s:len(dst) - (len(src) - e)])
    if d.kind == "swap_color":
        ok = bool(old & _COLOR_WORDS) and bool(new & _COLOR_WORDS)
    elif d.kind == "swap_spatial":
        ok = bool(old & _SPATIAL_WORDS) and bool(new & _SPATIAL_WORDS)
    elif d.kind == "swap_count":
        ok = any(map(_is_count_word, old)) and any(map(_is_count_word, new))
    elif d.kind == "negation":
        ok = bool((old | new) & _NEGATION_WORDS)
    else:
        ok = True
    return None if ok else f"not a {d.kind} edit"


# --------------------------------------------------------------------------------------------
# the generator


class PromptGenerator(Protocol):
    """What `run_llm_backend` needs: one answer per prompt, in order (`max_new_tokens`: one
    limit or one per prompt; answers may be ``vlm.Answer``s that say they were cut off)."""

    def generate(self, prompts: list[str], max_new_tokens: int | Sequence[int] = 96,
                 batch_size: int = 8) -> list[str]: ...


def chat_text(tokenizer: Any, prompt: str) -> tuple[str, bool]:
    """``(text, add_special_tokens)`` of one user turn: the chat template's rendering, which
    writes its own special tokens (BOS) and so must be encoded without adding them again, or
    the prompt itself, to be encoded with them, when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt, True
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False), False


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids the model sees for `prompt` (`chat_text`, encoded once): what the HF
    engine feeds and what the vLLM engine passes as ``{"prompt_token_ids": ...}``, so a
    template that writes BOS does not get a second one from tokenization."""
    text, specials = chat_text(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=specials)["input_ids"])


def distractor_budget(sentence: str, per_kind: int,
                      count_tokens: Callable[[str], int] | None = None,
                      cap: int | None = None) -> int:
    """max_new_tokens of one (sentence, kind) request: ``vlm.budget_for`` a reference answer of
    `per_kind` edits of `sentence`, each the sentence plus a three-word edit ("in front of"),
    written as the JSON the prompt asks for; at most `cap` when given."""
    from stages.vlm import budget_for

    edited = f"{_clean_sentence(sentence)} in front of"
    return budget_for(_answer_json([edited] * per_kind), count_tokens, cap)


def tiny_causal_lm_dir(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny causal LM's directory (``vlm.build_tiny_causal_lm``), built on first use.

    Same place as the tiny LLaVA (``vlm._tiny_root``: `cache_dir`, else
    ``$NEMO_WORK_DIR/.cache/tiny-llava``, else a temp dir), under its own name.
    """
    from stages.vlm import _tiny_root, build_once, build_tiny_causal_lm

    return build_once(_tiny_root(cache_dir), f"causal-lm-v{_TINY_LM_VERSION}-seed{seed}",
                      lambda d: build_tiny_causal_lm(d, seed=seed))


def _is_tiny(model: str) -> bool:
    return str(model).strip().lower() == "tiny"


def llm_model_key(model: str, seed: int = 0) -> str:
    """The model's identity in the request cache (see ``vlm.model_key``), namespace causal-lm."""
    if _is_tiny(model):
        return f"causal-lm:tiny-v{_TINY_LM_VERSION}-seed{seed}"
    from stages.vlm import model_key

    return model_key("causal-lm", model)


class CausalLMGenerator:
    """Greedy batched text generation with a transformers causal LM.

    `model`: ``"tiny"`` (built locally, loaded back with ``from_pretrained``), a local
    directory written by ``save_pretrained``, or a hub id already in the local Hugging Face
    cache; anything else is an `InputError` before any loading (offline, no network wait).
    Batches are LEFT padded and sorted by prompt length, the tokenizer's chat template is
    applied when it has one (one user turn), and only the new tokens are decoded.
    """

    def __init__(self, model: str = "tiny", device: str = "auto", dtype: str = "auto", *,
                 cache_dir: Path | None = None, seed: int = 0) -> None:
        from stages.vlm import (
            GenerationStats,
            _resolve_device,
            _resolve_dtype,
            context_length,
            load_local_pretrained,
            resolve_model_path,
        )

        self.model_name = str(model)
        if _is_tiny(model):
            self.path, self.revision = tiny_causal_lm_dir(cache_dir, seed), None
        else:  # a missing model fails here, before torch and transformers are even imported
            self.path, self.revision = resolve_model_path(model)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cache_key = llm_model_key(model, seed)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.tokenizer, self.model = load_local_pretrained(
            "causal LM", model, self.path, AutoTokenizer, AutoModelForCausalLM, self.dtype,
            self.device)
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.stats = GenerationStats()
        self.context = context_length(self.model)
        self._torch = torch

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` with this model's tokenizer (no special tokens): answer budgets."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict[str, Any]:
        """JSON-able identity, for manifests."""
        return {"backend": "causal-lm", "model": self.model_name, "path": str(self.path),
                "revision": self.revision, "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device), "chat_template": self.has_chat_template}

    def format_prompt(self, prompt: str) -> str:
        """The text the model sees: the chat template's user turn + generation prompt, or the
        prompt itself when the tokenizer has no template."""
        return chat_text(self.tokenizer, prompt)[0]

    def _encode(self, texts: list[str]) -> Any:
        # A chat template writes its own special tokens (bos); do not add them twice.
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True,
                                add_special_tokens=not self.has_chat_template)
        return inputs.to(self.device)

    def generate(self, prompts: list[str], max_new_tokens: int | Sequence[int] = 96,
                 batch_size: int = 8) -> list[str]:
        """One greedy answer per prompt, in order; only the new text, stripped, as
        ``vlm.Answer``s (truncated: the limit was reached without EOS). `max_new_tokens` is
        one limit or one per prompt, each capped by the model's context minus the prompt."""
        from stages.vlm import _per_request, greedy_generate

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        torch = self._torch
        budgets = _per_request(max_new_tokens, len(prompts))
        texts = [self.format_prompt(p) for p in prompts]
        lengths = [len(ids) for ids in self.tokenizer(
            texts, add_special_tokens=not self.has_chat_template)["input_ids"]] if texts else []
        order = sorted(range(len(texts)), key=lambda i: lengths[i])  # less padding per batch
        pad_id = self.tokenizer.pad_token_id
        results: list[str] = [""] * len(texts)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            inputs = self._encode([texts[i] for i in idx])
            decoded = greedy_generate(self.model, self.tokenizer, inputs,
                                      [budgets[i] for i in idx], self.stats, torch, pad_id,
                                      self.context)
            for i, text in zip(idx, decoded, strict=True):
                results[i] = text
        return results


_GENERATORS: dict[tuple[str, str], CausalLMGenerator] = {}
_GENERATORS_LOCK = threading.Lock()


def get_causal_lm(model: str, device: str = "auto") -> CausalLMGenerator:
    """The process's generator for (model, device), loaded on first use (shards reuse it)."""
    key = (str(model), str(device))
    with _GENERATORS_LOCK:
        if key not in _GENERATORS:
            _GENERATORS[key] = CausalLMGenerator(model, device=device)
        return _GENERATORS[key]


# --------------------------------------------------------------------------------------------
# the backend: cache-first, resumable per (sentence, kind)


@dataclass
class _Request:
    sent_id: int
    sentence: str
    kind: str
    phash: str
    prompt: str
    attempts: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def item(self) -> str:
        return f"{self.sent_id}:{self.kind}"


def _kill_hook(done: int) -> None:
    from stages.vlm import _kill_hook as hook  # NEMO_PIPE_TEST_KILL_AFTER_REQUESTS

    hook(done)


def _candidates(source: str, kind: str, texts: Iterable[str], per_kind: int,
                context: SceneContext | None,
                ) -> tuple[list[str], list[tuple[str, str]]]:
    """(accepted texts, [(text, reason)]) for one request's parsed answer."""
    src = source.lower().split()
    seen: set[tuple[str, ...]] = set()
    accepted: list[str] = []
    rejected: list[tuple[str, str]] = []
    examined = 0
    for raw in texts:
        if len(accepted) >= per_kind or examined >= 2 * per_kind:
            break
        tokens = tuple(normalize_text(raw))
        if tokens in seen:
            continue
        seen.add(tokens)
        if list(tokens) == src:
            rejected.append((" ".join(tokens), "identical"))
            continue
        examined += 1
        d = build_distractor(kind, source, raw)
        reason = candidate_reason(source, d, context)
        if reason is None:
            accepted.append(d.text)
        else:
            rejected.append((d.text, reason))
    return accepted, rejected


def run_llm_backend(
    sentences: Sequence[tuple[int, str, SceneContext | None]],
    kinds: Sequence[str],
    per_kind: int,
    model: str,
    device: str,
    cache_path: str | os.PathLike[str],
    max_attempts: int = 2,
    batch_size: int = 8,
    *,
    generator: PromptGenerator | None = None,
    max_new_tokens: int | None = None,
    on_request: Callable[[str, dict[str, Any]], None] | None = None,
) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str, str]], dict[str, int]]:
    """Distractors of `sentences` (``(sent_id, text, scene context or None)``) by a causal LM.

    Returns ``(accepted, rejected, counts)``: accepted ``(sent_id, kind, text)``, rejected
    ``(sent_id, kind, text, reason)`` (see the module docstring for how answers are judged),
    counts ``{"generated": requests answered by the model in this call, "cached": requests
    read from the cache}``. Rows come in input order (sentence, then kind, then model order).

    One request per (sentence, kind). Requests are sent `batch_size` at a time (a request being
    repaired fills the next batch first); a request is finished when its answer parses or after
    `max_attempts` answers (each retry uses the repair prompt), and it is put in the
    `RequestCache` at `cache_path` at once, keyed by (`llm_model_key`, hash of the prompt,
    `max_attempts`, `max_new_tokens` and the budget rule, ``"<sent_id>:<kind>"``). The cached
    value is the parsed list (or None for a failure) with attempts, errors and whether the last
    answer was cut off, so a rerun never regenerates a finished request, re-judges cached
    answers with the current validation, and loads no model when everything is cached.

    Each request's max_new_tokens is `distractor_budget` of its sentence (counted with
    ``generator.count_tokens`` when it has one), at most `max_new_tokens` when given. An
    answer still unparseable after the last attempt is rejected as ``"truncated: ..."`` when
    it was cut off at that limit, else ``"unparseable: ..."``.

    `generator`: any object with ``generate(prompts, max_new_tokens=, batch_size=)`` (tests
    inject a scripted one); its ``cache_key`` attribute, if any, is the cache's model key,
    else ``f"custom:{model}"``. Without it, `get_causal_lm(model, device)` is used.
    `on_request(item_id, record)` is called after each newly finished request.
    """
    from pipeline.request_cache import RequestCache, prompt_hash

    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        _check_kind(kind)
    if generator is not None:
        key = str(getattr(generator, "cache_key", None) or f"custom:{model}")
    else:
        key = llm_model_key(model)
    from stages.vlm import BUDGET_VERSION, is_truncated

    cap = None if max_new_tokens is None else int(max_new_tokens)
    gen_params = {"prompt_version": PROMPT_VERSION, "max_attempts": int(max_attempts),
                  "max_new_tokens": cap, "budget": BUDGET_VERSION}
    counts = {"generated": 0, "cached": 0}
    records: dict[str, dict[str, Any]] = {}
    plans: list[tuple[int, str, str, SceneContext | None, str]] = []
    with RequestCache(cache_path) as cache:
        todo: deque[_Request] = deque()
        queued: set[str] = set()
        for sent_id, sentence, context in sentences:
            for kind in kinds:
                prompt = build_kind_prompt(kind, sentence, per_kind)
                req = _Request(int(sent_id), sentence, kind, prompt_hash(prompt, gen_params),
                               prompt)
                plans.append((req.sent_id, sentence, kind, context, req.item))
                if req.item in records:  # the same sentence twice: one request
                    continue
                hit = cache.get(key, req.phash, req.item)
                if hit is not None:
                    records[req.item] = hit
                    counts["cached"] += 1
                elif req.item not in queued:
                    queued.add(req.item)
                    todo.append(req)
        if todo and generator is None:
            generator = get_causal_lm(model, device)
        count_tokens = getattr(generator, "count_tokens", None)
        retry: deque[_Request] = deque()
        while todo or retry:
            batch: list[_Request] = []
            while len(batch) < batch_size and retry:
                batch.append(retry.popleft())
            while len(batch) < batch_size and todo:
                batch.append(todo.popleft())
            outputs = generator.generate(  # type: ignore[union-attr]
                [r.prompt for r in batch],
                max_new_tokens=[distractor_budget(r.sentence, per_kind, count_tokens, cap)
                                for r in batch],
                batch_size=batch_size)
            if len(outputs) != len(batch):
                raise RuntimeError(f"generator returned {len(outputs)} answers for "
                                   f"{len(batch)} prompts")
            for req, text in zip(batch, outputs, strict=True):
                req.attempts += 1
                try:
                    items: list[str] | None = parse_distractors(text)
                except DistractorParseError as exc:
                    why = str(exc)
                    if is_truncated(text):
                        why = ("the answer was cut off at its token limit before it was "
                               f"complete; answer with the compact JSON object only ({why})")
                    req.errors.append(f"attempt {req.attempts}: {why}")
                    if req.attempts < max_attempts:
                        req.prompt = build_repair_prompt(req.kind, req.sentence, per_kind,
                                                         text, why)
                        retry.append(req)
                        continue
                    items = None
                record = {"distractors": items, "attempts": req.attempts,
                          "errors": req.errors, "truncated": items is None
                          and is_truncated(text)}
                cache.put(key, req.phash, req.item, record)
                records[req.item] = record
                counts["generated"] += 1
                if on_request is not None:
                    on_request(req.item, record)
                _kill_hook(counts["generated"])
    accepted: list[tuple[int, str, str]] = []
    rejected: list[tuple[int, str, str, str]] = []
    for sent_id, sentence, kind, context, item in plans:
        record = records[item]
        if record["distractors"] is None:
            errors = record.get("errors") or ["no answer"]
            last = str(errors[-1]).split(": ", 1)[-1]
            word = "truncated" if record.get("truncated") else "unparseable"
            rejected.append((sent_id, kind, "", f"{word}: {last}"))
            continue
        ok, bad = _candidates(sentence, kind, record["distractors"], per_kind, context)
        accepted.extend((sent_id, kind, t) for t in ok)
        rejected.extend((sent_id, kind, t, r) for t, r in bad)
    return accepted, rejected, counts


# -- vLLM (the `vllm` extra; GPU) --------------------------------------------------------------
def distractor_schema(per_kind: int) -> dict[str, Any]:
    """JSON schema of an answer, for vLLM's structured decoding."""
    return {"type": "object", "additionalProperties": False, "required": ["distractors"],
            "properties": {"distractors": {"type": "array", "maxItems": int(per_kind),
                                           "items": {"type": "string", "minLength": 1}}}}


def vllm_text_requests(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                       schema: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`LLM.generate` inputs and sampling parameters as plain dicts (greedy, JSON schema).

    Inputs are ``{"prompt_token_ids": ids}`` (vLLM's TokensPrompt): the ids `chat_prompt_ids`
    encoded once, so vLLM does not tokenize the chat template's text again and add a second
    BOS. `max_new_tokens` is one limit or one per prompt.
    """
    from stages.vlm import _per_request

    budgets = _per_request(max_new_tokens, len(prompt_ids))
    out = []
    for i, ids in enumerate(prompt_ids):
        params: dict[str, Any] = {"temperature": 0.0, "max_tokens": budgets[i]}
        if schema is not None:
            params["structured_outputs"] = {"json": schema}
        out.append({"index": i, "inputs": {"prompt_token_ids": [int(t) for t in ids]},
                    "sampling_params": params})
    return out


def _max_model_len(llm: Any) -> int | None:
    """The engine's context (``LLM.model_config`` in newer vLLM, ``LLM.llm_engine.model_config``
    in 0.10), or None when neither is there."""
    for owner in (llm, getattr(llm, "llm_engine", None)):
        value = getattr(getattr(owner, "model_config", None), "max_model_len", None)
        if value:
            return int(value)
    return None


class VLLMTextGenerator:
    """The `llm` augment backend through vLLM: continuous batching, prefix caching (the few-shot
    examples are a shared prefix), JSON-schema decoding. Needs `pip install nemo-pipe[vllm]`
    and a GPU; the same prompts, token ids, budgets, cache and checks as `CausalLMGenerator`."""

    def __init__(self, model: str, per_kind: int = 2, *, seed: int = 0,
                 **llm_kwargs: Any) -> None:
        from stages.hub import hf_offline
        from stages.vlm import GenerationStats, _import_vllm, resolve_model_path

        vllm = _import_vllm()
        self.model_name = str(model)
        self.path = (tiny_causal_lm_dir(None, seed) if _is_tiny(model)
                     else resolve_model_path(model)[0])
        self.cache_key = "vllm:" + llm_model_key(model, seed)
        self.schema = distractor_schema(per_kind)
        self._vllm = vllm
        with hf_offline():
            self.llm = vllm.LLM(model=str(self.path), enable_prefix_caching=True, seed=seed,
                                **llm_kwargs)
            self.tokenizer = self.llm.get_tokenizer()
        self.context = _max_model_len(self.llm)
        self.stats = GenerationStats()

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` with the engine's tokenizer (no special tokens): answer budgets."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[str], max_new_tokens: int | Sequence[int] = 96,
                 batch_size: int = 8) -> list[str]:
        """One greedy answer per prompt, in order, as ``vlm.Answer``s (truncated: finish_reason
        "length"); each limit is capped by the engine's context minus the prompt."""
        from stages.vlm import _per_request, parse_vllm_outputs, vllm_sampling_params

        del batch_size  # vLLM schedules its own batches
        ids = [chat_prompt_ids(self.tokenizer, p) for p in prompts]
        budgets = _per_request(max_new_tokens, len(prompts))
        if self.context is not None:
            budgets = [max(1, min(b, self.context - len(x))) for b, x in zip(budgets, ids,
                                                                             strict=True)]
        items = vllm_text_requests(ids, budgets, self.schema)
        sampling = [vllm_sampling_params(self._vllm, it["sampling_params"]) for it in items]
        t0 = time.perf_counter()
        outputs = self.llm.generate([it["inputs"] for it in items], sampling, use_tqdm=False)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.batches += 1
        return list(parse_vllm_outputs(outputs, self.stats))
