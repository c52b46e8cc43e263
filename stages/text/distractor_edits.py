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
    DISTANCE_SUPERLATIVES,
    FUNCTION_WORDS,
    ING_NOUNS,
    INTRANSITIVE,
    LOCATIVE_PREPOSITIONS,
    NP_NEGATION_WORDS,
    NUMBERS,
    ORDINAL_NUMERALS,
    ORDINALS,
    POSITION_FORMS,
    PREPOSITIONS,
    PRO_FORMS,
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
    clause_ids,
    distance_preposition,
    head_noun,
    ing_is_noun,
    is_head_candidate,
    is_negator,
    is_nounlike,
    is_np_end,
    is_participle,
    is_vbg,
    is_verbal,
    negated_positions,
    negation_scopes,
    negation_word,
    starts_np,
    vbz_lemma,
)
from stages.text.positional import _right_is_adverb, left_is_verb

__all__ = [
    "SPATIAL_OPPOSITES",
    "Edit",
    "apply_edit",
    "color_group",
    "color_options",
    "count_options",
    "negation_edits",
    "double_negation",
    "negation_flips",
    "swap_contradicts",
    "swap_under_negation",
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
# A superlative of distance before these intensifies them ("furthest right", "farthest to the
# left", "farthest back", "furthest away"): swapping it to "closest" says the same thing.
_INTENSIFIED = frozenset(POSITION_FORMS) | frozenset(
    {"front", "back", "away", "out", "up", "down", "off", "over"})
_INTENSIFIED_SKIP = frozenset({"to", "on", "at", "the"})
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
    negated = negated_positions(tokens)
    out = []
    for i in _color_slots(tokens):
        if i in negated:
            continue  # "man without red hat" is also without a beige hat
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


def _left_is_verb(tokens: Sequence[str], i: int) -> bool:
    """"left" as the verb: "left over/behind", "was left", and after "only"/"last" as
    ``positional.left_is_verb`` reads it ("the only one left", "last one left"; not "the only
    man on the left", "only left guy", "the only girl left side")."""
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    prev = tokens[i - 1] if i else None
    if nxt in ("over", "behind") or prev in ("was", "were", "been", "being"):
        return True
    return left_is_verb(tokens, i)


def _superlative_edit(tokens: Sequence[str], i: int) -> tuple[str, ...] | None:
    """closest/nearest <-> farthest/furthest as a single word. None before a position or
    direction ("furthest right", "farthest to the left", "farthest back": an intensifier of that
    word, as "far left" is), else the preposition the opposite needs before a noun phrase
    ("nearest the camera" -> "farthest from the camera", "man nearest camera"), else the plain
    adjective ("closest elephant" -> "farthest elephant")."""
    n = len(tokens)
    w = tokens[i]
    k = i + 1
    while k < n and tokens[k] in _INTENSIFIED_SKIP:
        k += 1
    if k < n and tokens[k] in _INTENSIFIED:
        return None
    new = SPATIAL_OPPOSITES[w]
    if distance_preposition(tokens, i):
        return (new, "from") if new == "farthest" else (new, "to")
    return (new,)


def _near_edit(tokens: Sequence[str], i: int) -> tuple[str, ...] | None:
    """"near" -> "far from" before a noun phrase ("dog near the door", "dog near red car"), "far"
    as an adjective ("the near side", "the near one", "man standing near"), None before a
    preposition, conjunction or relative ("near by") and after a determiner unless a noun or
    "one" follows."""
    n = len(tokens)
    prev = tokens[i - 1] if i else None
    nxt = tokens[i + 1] if i + 1 < n else None
    if nxt is None or nxt in FAR_NEAR_NOUNS:
        return ("far",)
    if prev in DETERMINERS:
        return ("far",) if nxt in PRO_FORMS or is_head_candidate(nxt) else None
    if nxt in PREPOSITIONS or nxt in CONJUNCTIONS or nxt in RELATIVES:
        return None
    return ("far", "from")  # "dog near the door", "dog near red car", "man near him"


def spatial_edits(tokens: Sequence[str]) -> list[Edit]:
    """Every spatial word that names a position, with its opposite (see the rules). Skipped:
    words inside a negation's scope ("the one not on the left" is also not on the right),
    "right" as an adverb ("right next to", ``positional._right_is_adverb``), "left" as a verb
    ("the only one left"), superlatives that only intensify a position ("furthest right"), and
    swaps that contradict the rest of the sentence (``swap_contradicts``)."""
    edits: list[Edit] = []
    negated = negated_positions(tokens)
    n = len(tokens)
    i = 0
    while i < n:
        matched = False
        for src, dst in _SPATIAL_PHRASES:
            k = len(src)
            if tuple(tokens[i:i + k]) == src:
                if negated.isdisjoint(range(i, i + k)):
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
        if i in negated:
            new = None
        elif w == "behind":
            np_follows = nxt is not None and nxt not in PREPOSITIONS and nxt not in RELATIVES \
                and nxt not in CONJUNCTIONS and not is_vbg(nxt)
            new = ("in", "front", "of") if np_follows else ("in", "front")
        elif w == "near":
            new = _near_edit(tokens, i)
        elif w == "far":
            if nxt in FAR_NEAR_NOUNS:
                new = ("near",)
        elif w in DISTANCE_SUPERLATIVES:
            new = _superlative_edit(tokens, i)
        elif w == "right" and _right_is_adverb(list(tokens), i):
            new = None  # "right next to", "right behind"
        elif w == "left" and _left_is_verb(tokens, i):
            new = None  # "the only one left"
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
    # "the left man not the right man" -> "the right man not the right man" says nothing
    return [e for e in edits if not swap_contradicts(tokens, e[0], e[1], apply_edit(tokens, e))]


def count_options(tokens: Sequence[str]) -> list[tuple[int, list[Edit]]]:
    n = len(tokens)
    present: dict[str, set[int]] = {"card": set(), "ord": set()}
    for w in tokens:
        if w in NUMBERS:
            fam, v = NUMBERS[w]
            present[fam.split("_")[0]].add(v)
    negated = negated_positions(tokens)
    out = []
    for i, w in enumerate(tokens):
        if w not in NUMBERS or i in negated:
            continue  # "man not holding two cups" is also not holding three
        fam, v = NUMBERS[w]
        prev = tokens[i - 1] if i else None
        nxt = tokens[i + 1] if i + 1 < n else None
        if prev in ("number", "no") or nxt in ("o", "oclock", "clock"):
            continue  # a jersey number ("number 5", "no 5"), a clock hour
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


_CONTRACTED_BE_HAVE: dict[str, str] = {
    "isnt": "is", "arent": "are", "wasnt": "was", "werent": "were", "hasnt": "has",
    "havent": "have", "hadnt": "had",
}
_CONTRACTED_DO: dict[str, str] = {"doesnt": "VBZ", "dont": "VBP", "didnt": "VBD"}
_DO_TAG: dict[str, str] = {"does": "VBZ", "do": "VBP", "did": "VBD"}
# "with no shirt" -> "with shirt": "no" is dropped only after these.
_NO_DROP_PREV = frozenset({"with", "w", "wearing"})


def swap_under_negation(src: Sequence[str], start: int, end: int, dst: Sequence[str]) -> bool:
    """Does replacing src[start:end] (giving ``dst``) edit words inside the scope of a negation
    (``negated_positions``), in the source or in the result? "man without red hat" -> "man
    without beige hat" stays true of the target, and so does "man in red" -> "man not in
    blue": a swap there is no negative."""
    if not negated_positions(src).isdisjoint(range(start, end)):
        return True
    return not negated_positions(dst).isdisjoint(range(start, len(dst) - (len(src) - end)))


def swap_contradicts(src: Sequence[str], start: int, end: int, dst: Sequence[str]) -> bool:
    """Does the swap make the sentence deny what it now asserts? A new word that also stands
    inside a negation's scope elsewhere ("the left man not the right man" -> "the right man
    not the right man", "the red car not the blue car" -> "the blue car not the blue car";
    position forms count by the direction they name, "right" as "rightmost"): such a text is
    no caption of anything."""
    stop = len(dst) - (len(src) - end)
    new = {POSITION_FORMS.get(w, w) for w in dst[start:stop] if w not in FUNCTION_WORDS}
    return any(POSITION_FORMS.get(dst[j], dst[j]) in new
               for j in negated_positions(dst) if not start <= j < stop)


def _inflect(lemma: str, tag: str) -> str | None:
    forms = getAllInflections(lemma, upos="VERB").get(tag)
    return forms[0] if forms else None


def negation_flips(old: Sequence[str], new: Sequence[str]) -> bool:
    """Does replacing the words ``old`` by ``new`` add or remove a negation? The parity of the
    negation words (``phrases.is_negator``, with or without apostrophes) must change: "with" ->
    "without" does, "without" -> "with no", "is not" -> "isnt" and "is not" -> "isn't" keep
    the meaning."""
    def count(words: Sequence[str]) -> int:
        return sum(is_negator(words, j) for j in range(len(words)))

    return count(old) % 2 != count(new) % 2


def double_negation(src: Sequence[str], start: int, end: int, new: Sequence[str]) -> bool:
    """Would replacing src[start:end] by ``new`` touch two negations at once? True when the
    edited span lies inside the scope (``negation_scopes``) of a negation outside it, in the
    source or in the result ("man who isnt | wearing a hat" -> "isnt not wearing"), when a
    negation of the span reaches another one ("man wearing no shirt" -> "man not wearing no
    shirt"), when the result puts two negations side by side, or when a negation of a noun
    phrase (no, without, nothing, ...) comes earlier in the clause, since what follows may be
    part of the negated phrase ("a plate with no food on it" -> "... no food not on it",
    "chairs that no one is sitting on"). Negations of coordinated predicates are separate
    ("a man who is not sitting and not wearing a hat" -> "a man who is sitting and not wearing
    a hat" is a negative). Such edits are not made by the rules (the
    llm backend's are rejected as "double negation")."""
    if src:
        clause = clause_ids(src)
        here = clause[min(start, len(src) - 1)]
        if any(clause[j] == here and negation_word(src[j]) in NP_NEGATION_WORDS
               and is_negator(src, j) for j in range(start)):
            return True  # "a plate with no food | on it", "chairs that no one | is sitting on"
    dst = apply_edit(src, (start, end, tuple(new)))
    for tokens, lo, hi in ((src, start, end), (dst, start, start + len(new))):
        for j, e in negation_scopes(tokens):
            if lo <= j < hi:
                if any(is_negator(tokens, m) for m in range(hi, e)):
                    return True
            elif j < lo < e:
                return True
    stop = start + len(new)
    edited_negation = any(is_negator(dst, m) for m in range(start, stop))
    return edited_negation and (
        (start > 0 and is_negator(dst, start - 1)) or (stop < len(dst) and is_negator(dst, stop)))


def negation_edits(tokens: Sequence[str]) -> list[Edit]:
    """Every negation edit of the rules (verbal ones first, then prepositional ones), each
    kept only when it flips its clause: it adds or removes one negation (``negation_flips``)
    and touches no other (``double_negation``). Negation words are read with or without
    apostrophes ("doesn't have" -> "has")."""
    n = len(tokens)
    verbal: list[Edit] = []
    prepositional: list[Edit] = []
    canon = [negation_word(t) or t for t in tokens]
    for i, w in enumerate(canon):
        prev = canon[i - 1] if i else None
        nxt = canon[i + 1] if i + 1 < n else None
        if w == "not":
            if prev in _DO_TAG and nxt is not None:
                form = _inflect(nxt, _DO_TAG[prev])
                if form:
                    verbal.append((i - 1, i + 2, (form,)))
            elif prev is not None and (prev in AUXILIARIES or nxt in PREPOSITIONS or (
                    nxt is not None and (is_vbg(nxt) or is_participle(nxt)))):
                verbal.append((i, i + 1, ()))  # "is not x", "not on x", "not holding x"
            continue
        if w in _CONTRACTED_BE_HAVE:
            if nxt is not None:
                verbal.append((i, i + 1, (_CONTRACTED_BE_HAVE[w],)))  # "isnt x" -> "is x"
            continue
        if w in _CONTRACTED_DO:
            form = None if nxt is None else _inflect(nxt, _CONTRACTED_DO[w])
            if form:
                verbal.append((i, i + 2, (form,)))  # "doesnt have" -> "has"
            continue
        if w == "non":
            if nxt is not None:
                verbal.append((i, i + 1, ()))  # "the non smiling man" -> "the smiling man"
            continue
        if w == "no":
            if is_negator(tokens, i) and prev in _NO_DROP_PREV and nxt is not None \
                    and nxt not in NUMBERS and nxt not in PRO_FORMS and nxt not in FUNCTION_WORDS:
                prepositional.append((i, i + 1, ()))  # "man with no shirt" -> "man with shirt"
            continue
        if prev is None or nxt == "not" or prev == "not":
            continue
        if w in ("is", "are", "was", "were"):
            if nxt is not None:
                verbal.append((i, i + 1, (w, "not")))
            continue
        if w in ("has", "have", "had"):
            if nxt is None or prev in _DO_TAG:
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
            if prev == "right" and _right_is_adverb(list(tokens), i - 1):
                prepositional.append((i - 1, i, ("not", "right")))  # "not right next to"
            else:
                prepositional.append((i, i + 1, ("not", w)))
    return [(s, e, new) for s, e, new in verbal + prepositional
            if negation_flips(tokens[s:e], new) and not double_negation(tokens, s, e, new)]


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
    if noun_lemma(tokens[h1]) == noun_lemma(tokens[h2]) or _np2_end(tokens, h2) is None:
        return None
    if any(is_negator(tokens, j) for j in range(h2 + 1)):
        return None  # "man wearing no shirt": "no shirt wearing man" is no caption
    if (vbz or aux) and _plural(tokens[h1]) != _plural(tokens[h2]):
        return None
    return h1, k, k + 1, h2


def _np2_end(tokens: Sequence[str], h2: int) -> int | None:
    """Where the object phrase whose head is tokens[h2] ends: over "of" + a noun phrase ("cup of
    coffee", "slice of pizza") and a following number ("number 5", "number 22", "jersey no
    23"), which the head alone would split ("cup holding woman of coffee", "number wearing
    player 22"); None when a conjunction follows ("bat and ball", "umbrella and smiling"), whose
    reach the rules cannot tell."""
    n = len(tokens)
    end = h2 + 1
    if end < n and tokens[end] == "of":
        head = chunk_head_index(tokens, end + 1)
        if head is None:
            return None
        end = head + 1
    if end < n and tokens[end] == "no" and end + 1 < n and tokens[end + 1][:1].isdigit():
        end += 1  # "jersey no 23"
    while end < n and (tokens[end] in NUMBERS or tokens[end].isdigit()):
        end += 1  # "number 5", "number 22"
    if end < n and tokens[end] in CONJUNCTIONS:
        return None
    return end


def _plural(word: str) -> bool:
    return noun_number(word) == "pl"


def role_edits(tokens: Sequence[str]) -> list[Edit]:
    pat = role_pattern(tokens)
    if pat is None:
        return []
    h1, verb, s2, h2 = pat
    end2 = _np2_end(tokens, h2)
    assert end2 is not None  # role_pattern checked it
    np1, np2 = list(tokens[0:h1 + 1]), list(tokens[s2:end2])
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
    return [(0, end2, tuple(new1 + middle + new2))]


