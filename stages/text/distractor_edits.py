"""The candidate edits of each distractor kind: which slots a sentence has and what each may
become (the rules of :mod:`stages.text.distractor_rules`, whose docstring states them kind by
kind). An edit is ``(start, end, new_tokens)``: tokens ``[start, end)`` are replaced.

The functions return every candidate in sentence order, before any draw or validation; the word
lists come from :mod:`stages.text.lexicon`, the tables here are what the rules do with them.
"""

from __future__ import annotations

from collections.abc import Sequence

from lemminflect import getAllInflections

from stages.text.lexicon import (
    ARTICLES,
    AUXILIARIES,
    CARDINALS,
    COLOR_GROUPS,
    COLOR_SET,
    COLORS,
    COMPOUND_VBG,
    CONJUNCTIONS,
    DETERMINERS,
    FUNCTION_WORDS,
    ING_NOUNS,
    INTRANSITIVE,
    LOCATIVE_PREPOSITIONS,
    NUMBERS,
    ORDINAL_NUMERALS,
    ORDINALS,
    PREPOSITIONS,
    RELATIVES,
)
from stages.text.morphology import (
    article,
    noun_lemma,
    noun_number,
    pluralize,
    singularize,
    verb_forms,
)
from stages.text.phrases import (
    FAR_NEAR_NOUNS,
    chunk_head_index,
    head_noun,
    ing_is_noun,
    is_nounlike,
    is_np_end,
    is_participle,
    is_vbg,
    is_verbal,
    starts_np,
    vbz_lemma,
)

__all__ = [
    "SPATIAL_OPPOSITES",
    "Edit",
    "apply_edit",
    "color_group",
    "color_options",
    "count_options",
    "negation_edits",
    "role_edits",
    "role_pattern",
    "spatial_edits",
]

Edit = tuple[int, int, tuple[str, ...]]

# --------------------------------------------------------------------------------------------
# Rule tables (the word lists themselves are in stages.text.lexicon)
# --------------------------------------------------------------------------------------------

# "grey" is understood but never produced.
_COLOR_SUBSTITUTES: tuple[str, ...] = tuple(c for c in COLORS if c != "grey")
_ORANGE_FRUIT_NEXT = frozenset({
    "slice", "slices", "juice", "peel", "peels", "wedge", "wedges", "half", "halves", "piece",
    "pieces", "segment", "segments", "rind", "tree", "trees",
})

SPATIAL_OPPOSITES: dict[str, str] = {
    "left": "right", "right": "left",
    "leftmost": "rightmost", "rightmost": "leftmost",
    "lefthand": "righthand", "righthand": "lefthand",
    "top": "bottom", "bottom": "top",
    "topmost": "bottommost", "bottommost": "topmost",
    "uppermost": "lowermost", "lowermost": "uppermost",
    "upper": "lower", "lower": "upper",
    "highest": "lowest", "lowest": "highest", "higher": "lower",
    "above": "below", "below": "above",
    "under": "above", "underneath": "above", "beneath": "above",
    "front": "back", "back": "front",
    "inside": "outside", "outside": "inside",
    "foreground": "background", "background": "foreground",
    "closest": "farthest", "nearest": "farthest",
    "farthest": "closest", "furthest": "closest",
}
# Multi-token phrases, tried (longest first) before single words.
_SPATIAL_PHRASES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("in", "front", "of"), ("behind",)),
    (("on", "top", "of"), ("under",)),
    (("in", "front"), ("behind",)),
    (("closest", "to"), ("farthest", "from")),
    (("nearest", "to"), ("farthest", "from")),
    (("farthest", "from"), ("closest", "to")),
    (("furthest", "from"), ("closest", "to")),
    (("close", "to"), ("far", "from")),
    (("far", "from"), ("close", "to")),
)
_TOP_CLOTHING_PREV = frozenset({"tank", "crop", "halter", "tube", "bikini"})
_FAMILY_FORMS: dict[str, tuple[str, ...]] = {
    "card_word": CARDINALS,
    "card_digit": tuple(str(v) for v in range(1, 11)),
    "ord_word": ORDINALS,
    "ord_num": ORDINAL_NUMERALS,
}
_COUNT_RADIUS = 2



def apply_edit(tokens: Sequence[str], edit: Edit) -> list[str]:
    """``tokens`` with the edit's span replaced by its new tokens."""
    s, e, new = edit
    return [*tokens[:s], *new, *tokens[e:]]


def _color_slots(tokens: Sequence[str]) -> list[int]:
    head = chunk_head_index(tokens, 0)
    slots = []
    for i, w in enumerate(tokens):
        if w not in COLOR_SET:
            continue
        if w == "orange":
            prev = tokens[i - 1] if i else None
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if i == head or nxt in _ORANGE_FRUIT_NEXT:
                continue
            # fruit also when it heads a later phrase: "bowl of an orange", "half an orange"
            ends_np = nxt is None or nxt in FUNCTION_WORDS
            if ends_np and (prev is None or prev in DETERMINERS or prev in NUMBERS):
                continue
        slots.append(i)
    return slots


def color_group(word: str) -> frozenset[str]:
    for g in COLOR_GROUPS:
        if word in g:
            return g
    return frozenset({word})


def color_options(tokens: Sequence[str]) -> list[tuple[int, list[Edit]]]:
    present: set[str] = set()
    for w in tokens:
        if w in COLOR_SET:
            present |= color_group(w)
    head = noun_lemma(head_noun(tokens))
    out = []
    for i in _color_slots(tokens):
        edits = []
        for c in _COLOR_SUBSTITUTES:
            if c in present:
                continue
            # "the red" -> "the orange" would be the fruit: the head must stay the same
            swapped = apply_edit(tokens, (i, i + 1, (c,)))
            if c == "orange" and noun_lemma(head_noun(swapped)) != head:
                continue
            edits.append((i, i + 1, (c,)))
        out.append((i, edits))
    return out


def spatial_edits(tokens: Sequence[str]) -> list[Edit]:
    edits: list[Edit] = []
    n = len(tokens)
    i = 0
    while i < n:
        matched = False
        for src, dst in _SPATIAL_PHRASES:
            k = len(src)
            if tuple(tokens[i:i + k]) == src:
                edits.append((i, i + k, dst))
                i += k
                matched = True
                break
        if matched:
            continue
        w = tokens[i]
        prev = tokens[i - 1] if i else None
        nxt = tokens[i + 1] if i + 1 < n else None
        new: tuple[str, ...] | None = None
        if w == "behind":
            np_follows = nxt is not None and nxt not in PREPOSITIONS and nxt not in RELATIVES \
                and nxt not in CONJUNCTIONS and not is_vbg(nxt)
            new = ("in", "front", "of") if np_follows else ("in", "front")
        elif w == "near":
            if nxt is None or nxt in FAR_NEAR_NOUNS:
                new = ("far",)
            elif nxt not in PREPOSITIONS and nxt not in CONJUNCTIONS and nxt not in RELATIVES:
                new = ("far", "from")
        elif w == "far":
            if nxt in FAR_NEAR_NOUNS:
                new = ("near",)
        elif w == "top":
            if prev in _TOP_CLOTHING_PREV or nxt in ("hat", "hats"):
                new = None
            elif prev == "on":
                new = ("the", "bottom")
            else:
                new = ("bottom",)
        elif w == "bottom":
            new = None if prev == "bikini" else ("top",)
        elif w == "back":
            verbal_prev = prev is not None and (is_vbg(prev) or is_participle(prev))
            new = None if verbal_prev or nxt == "and" else ("front",)
        elif w in SPATIAL_OPPOSITES:
            new = (SPATIAL_OPPOSITES[w],)
        if new is not None:
            edits.append((i, i + 1, new))
        i += 1
    return edits


def count_options(tokens: Sequence[str]) -> list[tuple[int, list[Edit]]]:
    n = len(tokens)
    present: dict[str, set[int]] = {"card": set(), "ord": set()}
    for w in tokens:
        if w in NUMBERS:
            fam, v = NUMBERS[w]
            present[fam.split("_")[0]].add(v)
    out = []
    for i, w in enumerate(tokens):
        if w not in NUMBERS:
            continue
        fam, v = NUMBERS[w]
        prev = tokens[i - 1] if i else None
        nxt = tokens[i + 1] if i + 1 < n else None
        if prev == "number" or nxt in ("o", "oclock", "clock"):
            continue
        cardinal = fam.startswith("card")
        if not cardinal and prev == "a":
            continue
        head = chunk_head_index(tokens, i + 1) if cardinal else None
        if head is not None and tokens[head] in ("one", "ones"):
            head = None
        if nxt is not None and nxt not in ING_NOUNS and (is_vbg(nxt) or is_participle(nxt)):
            head = None  # "right one holding bat": the number is not counting a noun
        if cardinal and v == 1 and (head is None or nxt == "of"):
            continue  # pronoun "one" ("right one", "one of", "one on left")
        forms = _FAMILY_FORMS[fam]
        taken = present["card" if cardinal else "ord"]
        edits: list[Edit] = []
        for nv in range(max(1, v - _COUNT_RADIUS), min(10, v + _COUNT_RADIUS) + 1):
            if nv == v or nv in taken:
                continue
            new_num = forms[nv - 1]
            crosses = cardinal and ((v == 1) != (nv == 1))
            if not crosses:
                edits.append((i, i + 1, (new_num,)))
                continue
            if head is None:
                continue
            noun = tokens[head]
            number = noun_number(noun)
            if nv == 1:
                new_noun = noun if number == "both" else (
                    singularize(noun) if number == "pl" else None)
            else:
                new_noun = noun if number == "both" else (
                    pluralize(noun) if number == "sg" else None)
            if new_noun is None:
                continue
            mid = tuple(tokens[i + 1:head])
            edits.append((i, head + 1, (new_num, *mid, new_noun)))
        if edits:
            out.append((i, edits))
    return out


def negation_edits(tokens: Sequence[str]) -> list[Edit]:
    n = len(tokens)
    verbal: list[Edit] = []
    prepositional: list[Edit] = []
    for i, w in enumerate(tokens):
        prev = tokens[i - 1] if i else None
        nxt = tokens[i + 1] if i + 1 < n else None
        if w == "not":
            if prev in ("does", "do", "did") and nxt is not None:
                lemma = nxt
                tag = {"does": "VBZ", "do": "VBP", "did": "VBD"}[prev]
                forms = getAllInflections(lemma, upos="VERB").get(tag)
                if forms:
                    verbal.append((i - 1, i + 2, (forms[0],)))
            elif prev is not None and (prev in AUXILIARIES or nxt in PREPOSITIONS or (
                    nxt is not None and (is_vbg(nxt) or is_participle(nxt)))):
                verbal.append((i, i + 1, ()))  # "is not x", "not on x", "not holding x"
            continue
        if prev is None or nxt == "not" or prev == "not":
            continue
        if w in ("is", "are", "was", "were"):
            if nxt is not None:
                verbal.append((i, i + 1, (w, "not")))
            continue
        if w in ("has", "have", "had"):
            if nxt is None or prev in ("does", "do", "did"):
                continue
            if nxt == "been" or is_participle(nxt):
                verbal.append((i, i + 1, (w, "not")))
            else:
                do = {"has": "does", "have": "do", "had": "did"}[w]
                verbal.append((i, i + 1, (do, "not", "have")))
            continue
        if w == "without":
            prepositional.append((i, i + 1, ("with",)))
            continue
        lemma = vbz_lemma(w)
        if lemma is not None and (prev in ("who", "that", "which")
                                  or (is_np_end(tokens, i) and is_verbal(tokens, i))):
            verbal.append((i, i + 1, ("does", "not", lemma)))
            continue
        if (is_vbg(w) or is_participle(w)) and is_np_end(tokens, i):
            if ing_is_noun(w, nxt):
                continue
            if w in COMPOUND_VBG and nxt is not None and is_nounlike(nxt):
                continue
            verbal.append((i, i + 1, ("not", w)))
            continue
        if w == "with" and nxt not in (None, "no") and is_np_end(tokens, i):
            prepositional.append((i, i + 1, ("without",)))
            continue
        if w in LOCATIVE_PREPOSITIONS and nxt is not None and is_np_end(tokens, i):
            if w == "next" and nxt != "to":
                continue
            prepositional.append((i, i + 1, ("not", w)))
    return verbal + prepositional


def role_pattern(tokens: Sequence[str]) -> tuple[int, int, int, int] | None:
    """(h1, verb, np2_start, h2) for ``NP1 [rel [aux]] VERB NP2 ...``, or None."""
    n = len(tokens)
    h1 = chunk_head_index(tokens, 0)
    if h1 is None or tokens[h1] in ("one", "ones", "orange"):
        return None
    k = h1 + 1
    rel = aux = False
    if k < n and tokens[k] in ("who", "that", "which"):
        rel = True
        k += 1
        if k < n and tokens[k] in ("is", "are"):
            aux = True
            k += 1
    if k + 1 >= n:
        return None
    verb = tokens[k]
    if is_vbg(verb) and verb not in ING_NOUNS and (aux or not rel):
        lemmas = verb_forms(verb, ("VBG",))
        vbz = False
    else:
        lemma = vbz_lemma(verb)
        if lemma is None or aux or not (rel or starts_np(tokens[k + 1])):
            return None
        lemmas = (lemma,)
        vbz = True
    if any(lemma in INTRANSITIVE for lemma in lemmas):
        return None
    if not rel and not vbz and not is_verbal(tokens, k):
        return None
    h2 = chunk_head_index(tokens, k + 1)
    if h2 is None or tokens[h2] in ("one", "ones", "orange"):
        return None  # "kid wearing orange": a colour, not an object to swap with
    if any(t in PREPOSITIONS or t in RELATIVES or t in CONJUNCTIONS for t in tokens[k + 1:h2]):
        return None
    if noun_lemma(tokens[h1]) == noun_lemma(tokens[h2]):
        return None
    if (vbz or aux) and _plural(tokens[h1]) != _plural(tokens[h2]):
        return None
    return h1, k, k + 1, h2


def _plural(word: str) -> bool:
    return noun_number(word) == "pl"


def role_edits(tokens: Sequence[str]) -> list[Edit]:
    pat = role_pattern(tokens)
    if pat is None:
        return []
    h1, verb, s2, h2 = pat
    np1, np2 = list(tokens[0:h1 + 1]), list(tokens[s2:h2 + 1])
    d1 = np1[0] if np1[0] in DETERMINERS else None
    d2 = np2[0] if np2[0] in DETERMINERS else None
    c1 = np1[1:] if d1 else np1
    c2 = np2[1:] if d2 else np2
    has_number = any(t in NUMBERS for t in c1 + c2)
    positional = (
        bool(c1) and bool(c2) and not has_number
        and d1 in (None, *ARTICLES) and d2 in (None, *ARTICLES)
        and not (d1 in ("a", "an") and _plural(tokens[h2]))
        and not (d2 in ("a", "an") and _plural(tokens[h1]))
    )
    if positional:
        new1 = ([article(c2[0]) if d1 in ("a", "an") else d1] if d1 else []) + c2
        new2 = ([article(c1[0]) if d2 in ("a", "an") else d2] if d2 else []) + c1
    else:
        new1, new2 = np2, np1
    middle = list(tokens[h1 + 1:s2])
    return [(0, h2 + 1, tuple(new1 + middle + new2))]


