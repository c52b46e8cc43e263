"""From a model's edited sentence to a validated distractor, the way the rules are judged.

The llm backend of the augment stage holds every answer to exactly the same validity checks
as the rules backend (``augment_rules.validate``), so both produce the same kind of data. Per
request, i.e. per (sentence, kind), `judge_answer` does:

1. texts are normalised like REFER sentences (lowercase, whitespace-split, punctuation at word
   edges stripped: `normalize_text`) and de-duplicated;
2. a text identical to the source is rejected ("identical") and does not count;
3. like ``generate_validated``, at most ``2 * per_kind`` candidates are examined, in the model's
   order, until ``per_kind`` are accepted; the rest is ignored;
4. the span is the token diff (`diff_span`). A minimal edit may touch several places only for
   role_reversal (two noun phrases swap) or for agreement (an extra change that only
   re-inflects a word: "two little girls" -> "one little girl"); when the text makes two or more
   real edits ("red ... left" -> "green ... right" for a colour swap), the distractor's span is
   its first edit only, so ``validate`` rejects it as "edit outside slot" (`build_distractor`);
5. ``validate(source, d, context)`` decides (a swap inside a negation's scope is "under
   negation", a negation added to a clause that holds one "double negation", as for the rules);
   a text that passes it but is not the edit its kind names is rejected as ``"not a <kind>
   edit"`` (`candidate_reason`): a "swap_color" without a colour on both sides, a
   "swap_spatial" whose position words name the same directions ("left" -> "leftmost", "under"
   -> "beneath"), a "negation" that keeps the parity of the negation words ("without" -> "with
   no", "is not" -> "isnt" or "isn't": negation words are read with or without apostrophes,
   ``phrases.negation_word``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from stages.text.distractor_edits import negation_flips
from stages.text.distractor_rules import (
    SPATIAL_OPPOSITES,
    Distractor,
    SceneContext,
    validate,
)
from stages.text.lexicon import (
    COLOR_SET,
    POSITION_FORMS,
    SPATIAL_RELATION_WORDS,
    SPATIAL_WORDS,
)

__all__ = ["build_distractor", "candidate_reason", "diff_span", "judge_answer",
           "normalize_text"]

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


# what a swap_spatial edit must replace and insert: any word that says where something is
_SPATIAL_WORDS = (SPATIAL_WORDS | SPATIAL_RELATION_WORDS | frozenset(SPATIAL_OPPOSITES)
                  | frozenset(SPATIAL_OPPOSITES.values()))


# The direction each spatial word names, so that a swap between synonyms is no swap: "left" ->
# "leftmost", "under" -> "beneath", "top" -> "upper", "lower" -> "bottom", "closest" ->
# "nearest", "behind" -> "in back of" keep it. A word not listed names its own ("inside",
# "side").
_SPATIAL_SENSE: dict[str, str] = {
    **POSITION_FORMS,
    "above": "top",
    **dict.fromkeys(("below", "under", "underneath", "beneath"), "bottom"),
    **dict.fromkeys(("front", "foreground"), "front"),
    **dict.fromkeys(("behind", "back", "background"), "back"),
    **dict.fromkeys(("near", "nearer", "nearest", "close", "closer", "closest", "next",
                     "beside"), "near"),
    **dict.fromkeys(("far", "farther", "farthest", "further", "furthest"), "far"),
    **dict.fromkeys(("middle", "center", "centre", "central", "between"), "middle"),
}


def _spatial_senses(words: Iterable[str]) -> set[str]:
    return {_SPATIAL_SENSE.get(w, w) for w in words if w in _SPATIAL_WORDS}


def _is_count_word(word: str) -> bool:
    from stages.text.distractor_rules import NUMBERS as _NUMBERS

    return word in _NUMBERS


def candidate_reason(source: str, d: Distractor,
                     context: SceneContext | None = None) -> str | None:
    """Why `d` is not kept: ``validate``'s reason, else ``"not a <kind> edit"``, else None.

    The kind check: swap_color needs a colour word among both the replaced and the new words,
    swap_spatial a position word on both sides and a change of the directions they name
    (``_SPATIAL_SENSE``: "left" -> "leftmost" or "under" -> "beneath" is no swap), swap_count a
    number/ordinal on both sides, negation a change in the parity of the negation words
    (``negation_flips``: "with" -> "without", not "without" -> "with no" nor "is not" ->
    "isnt"); role_reversal is fully checked by ``validate`` ("head noun not swapped").
    """
    reason = validate(source, d, context)
    if reason is not None:
        return reason
    src = source.lower().split()
    dst = d.text.split()
    s, e = d.span
    old, new = src[s:e], dst[s:len(dst) - (len(src) - e)]
    if d.kind == "swap_color":
        ok = bool(COLOR_SET.intersection(old)) and bool(COLOR_SET.intersection(new))
    elif d.kind == "swap_spatial":
        old_senses, new_senses = _spatial_senses(old), _spatial_senses(new)
        ok = bool(old_senses) and bool(new_senses) and old_senses != new_senses
    elif d.kind == "swap_count":
        ok = any(map(_is_count_word, old)) and any(map(_is_count_word, new))
    elif d.kind == "negation":
        ok = negation_flips(old, new)
    else:
        ok = True
    return None if ok else f"not a {d.kind} edit"



def judge_answer(source: str, kind: str, texts: Iterable[str], per_kind: int,
                 context: SceneContext | None = None,
                 ) -> tuple[list[str], list[tuple[str, str]]]:
    """(accepted texts, [(text, reason)]) for one request's parsed answer (steps 1-5 of the
    module docstring)."""
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
