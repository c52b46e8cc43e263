"""Noun phrases of a referring expression without a parser: word classes and the head noun.

The distractor rules (:mod:`stages.text.distractor_rules`) need to know which word a sentence is
about (an edit must keep it) and where a noun phrase ends (a verb or a preposition may attach
there); class extraction (:mod:`stages.text.class_extract`) reads -ing words with the same
rule (:func:`ing_is_noun`). Tokens are REFER-cleaned words (lowercase, no punctuation).

``head_noun`` heuristic
=======================
Scan the first chunk: tokens from the start up to the first boundary, where a boundary is a
preposition (always), "not", an auxiliary, or - once a head candidate has been seen - a relative
pronoun (who/that/which/...), "and"/"or" (except between two colours: "orange and white cat"), or a
verbal token (a verb-ing that is not an -ing noun (``ING_NOUNS``; ``ing_is_noun``: "brick
building", but "man crossing street", "man building a boat") nor a ``COMPOUND_VBG`` before a noun,
an -ed/-en participle that lemminflect cannot read as a noun, or a verb-s followed by a determiner
/ of a frequent REFER verb, or a frequent verb in base form after a plural noun: "men hold
umbrellas"). "near" before side/end/corner/edge is an adjective, not a boundary ("the near side" ->
side). A head candidate is a word lemminflect can read as a NOUN (out-of-vocabulary alphabetic
words count as nouns) that is not a function word and not a modifier (colour, spatial, number,
ordinal word, half, whole), plus "one"/"ones" (pronoun "right one") and "orange" (fruit). The head
is the LAST candidate of the chunk, because English noun phrases are head-final ("second bottle" ->
bottle, "blue shirt guy" -> guy, "man in red" -> man). Returns None when the chunk has no candidate
("left", "second from right"). Known limits: partitives give the quantity word ("pair of scissors"
-> pair), noun-noun compounds misread as verbs ("glass building" -> glass) and the like; they are
consistent between a source and its distractor, which is what validation needs. Heads are compared
by noun lemma (``person``/``people`` are the same head, so "one person" -> "two people" keeps its
head). "near" after a determiner is an adjective ("the near one" -> one), and a superlative of
distance between two nouns or before a determiner is a preposition, a boundary ("man nearest the
camera" -> man; ``distance_preposition``).

Clauses and negation scope
==========================
``clause_ids`` splits a sentence at relative pronouns, "that" before a verb ("shirt | that isnt
blue") and "but" ("and" never splits: whether "man without hat and red scarf" lacks the scarf
is unknown). ``negated_positions`` is the scope of each negation word: the noun phrase after
no/non/without/nothing/... (to its head, over "and"/"or" + another phrase), the rest of the
clause after not/isnt/doesnt/never/... . The distractor rules swap nothing there and add no
negation to a clause that already holds one.
"""

from __future__ import annotations

from collections.abc import Sequence

from stages.text.lexicon import (
    AUXILIARIES,
    COLOR_SET,
    COMPOUND_VBG,
    CONJUNCTIONS,
    DETERMINERS,
    DISTANCE_SUPERLATIVES,
    FREQUENT_VERBS,
    FUNCTION_WORDS,
    ING_NOUN_VERBS,
    ING_NOUNS,
    NEGATION_WORDS,
    NP_NEGATION_WORDS,
    NUMBERS,
    OTHER_COLOR_WORDS,
    POSITION_HEADS,
    PREPOSITIONS,
    PRO_FORMS,
    RELATIVES,
    SPATIAL_WORDS,
)
from stages.text.morphology import lemmas, noun_number, verb_forms

__all__ = [
    "FAR_NEAR_NOUNS",
    "MODIFIERS",
    "chunk_head_index",
    "clause_ids",
    "distance_preposition",
    "head_noun",
    "ing_is_noun",
    "is_head_candidate",
    "is_nounlike",
    "is_np_end",
    "is_participle",
    "is_vbg",
    "is_verbal",
    "joins_colours",
    "negated_positions",
    "starts_np",
    "vbz_lemma",
]

# "half"/"whole" quantify rather than head: "sandwich half on right" -> sandwich.
MODIFIERS = (COLOR_SET | SPATIAL_WORDS | frozenset(NUMBERS) | {"half", "whole"}) - {"one"}
# "near"/"far" before these are adjectives: "the near side", "far end".
FAR_NEAR_NOUNS = frozenset({"side", "end", "corner", "edge"})
# A colour after these is clothing, a noun phrase of its own: "man in white holding bat".
_CLOTHING_COLOR_PREV = frozenset({"in", "wearing"})
# Words that open a new clause: the scope of a negation ends before them.
# ("that" only before a verb: it is also a determiner).
_CLAUSE_OPENERS = (RELATIVES - {"that"}) | {"but"}


def starts_np(word: str | None) -> bool:
    """Does a noun phrase start with ``word`` (a determiner or a number)?"""
    return word is not None and (word in DETERMINERS or word in NUMBERS)


def ing_is_noun(word: str, next_word: str | None) -> bool:
    """Is ``word``, right after a noun, one of the -ing nouns? Not when a noun phrase follows it
    ("man building a sandcastle") nor when it is one of the usual verbs (``ING_NOUN_VERBS``:
    "man crossing street", "plane landing"); yes in "brick building", "cake frosting"."""
    return word in ING_NOUNS and word not in ING_NOUN_VERBS and not starts_np(next_word)


def is_nounlike(word: str) -> bool:
    """Can ``word`` be a content noun? (OOV alphabetic words are assumed to be nouns.)"""
    if word in FUNCTION_WORDS:
        return False
    if word in ING_NOUNS:
        return True
    lem = lemmas(word)
    if lem:
        return "NOUN" in lem
    return word.isalpha() and len(word) > 1


def is_head_candidate(word: str) -> bool:
    """A word that may head the noun phrase (see the module docstring)."""
    if word in PRO_FORMS or word == "orange":
        return True
    return word not in MODIFIERS and is_nounlike(word)


def is_vbg(word: str) -> bool:
    """A verb-ing form ("holding")."""
    return word.endswith("ing") and bool(verb_forms(word, ("VBG",)))


def is_participle(word: str) -> bool:
    """An -ed/-en past participle that cannot be a noun ("parked", "dressed", "eaten")."""
    if word in MODIFIERS or not word.endswith(("ed", "en")):
        return False
    lem = lemmas(word)
    if "NOUN" in lem or "VERB" not in lem:
        return False
    return bool(verb_forms(word, ("VBN", "VBD")))


def vbz_lemma(word: str) -> str | None:
    """The verb of a third-person-singular form ("holds" -> "hold"), or None."""
    if word in AUXILIARIES or word in MODIFIERS or not word.endswith("s"):
        return None
    forms = verb_forms(word, ("VBZ",))
    return forms[0] if forms else None


def is_verbal(tokens: Sequence[str], j: int) -> bool:
    """Is tokens[j] (after a head candidate) the verb that ends the noun phrase?"""
    w = tokens[j]
    nxt = tokens[j + 1] if j + 1 < len(tokens) else None
    if w in MODIFIERS:
        return False
    if is_vbg(w):
        if ing_is_noun(w, nxt):
            return False
        return not (w in COMPOUND_VBG and nxt is not None and is_nounlike(nxt))
    if is_participle(w) or (w == "cut" and nxt in (None, "off", "out")):
        return True
    if w in FREQUENT_VERBS and j > 0 and noun_number(tokens[j - 1]) == "pl":
        return True  # plural present tense: "men hold umbrellas"
    lemma = vbz_lemma(w)
    return lemma is not None and (starts_np(nxt) or lemma in FREQUENT_VERBS)


def joins_colours(tokens: Sequence[str], j: int, start: int = 0) -> bool:
    """Is tokens[j] an "and"/"or" between two colour words ("orange and white cat"), so it
    joins colours of one noun phrase rather than two noun phrases? (``start``: the chunk's
    first index; the colour before must lie in it.) Shared with class extraction."""
    return (tokens[j] in CONJUNCTIONS and start < j < len(tokens) - 1
            and tokens[j - 1] in COLOR_SET and tokens[j + 1] in COLOR_SET)


def distance_preposition(tokens: Sequence[str], i: int) -> bool:
    """Is tokens[i], a superlative of distance (closest, nearest, farthest, furthest), a
    preposition ("man nearest the camera", "dog closest car") rather than an adjective ("the
    nearest one", "closest elephant", "the closest two people")?"""
    prev = tokens[i - 1] if i else None
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    if nxt is None or nxt in PRO_FORMS:
        return False
    if nxt in DETERMINERS:
        return prev not in DETERMINERS
    return prev is not None and is_head_candidate(prev) and is_head_candidate(nxt)


def chunk_head_index(tokens: Sequence[str], start: int = 0) -> int | None:
    """Index of the head noun of the chunk starting at ``start`` (see the module docstring)."""
    cand: int | None = None
    for j in range(start, len(tokens)):
        w = tokens[j]
        nxt = tokens[j + 1] if j + 1 < len(tokens) else None
        if w == "near" and (nxt in FAR_NEAR_NOUNS or (j > start and tokens[j - 1] in DETERMINERS)):
            continue  # adjective: "the near side", "the near one"
        if w in PREPOSITIONS or w in AUXILIARIES or w == "not":
            break
        if cand is not None and w in DISTANCE_SUPERLATIVES and distance_preposition(tokens, j):
            break  # "man nearest the camera"
        if joins_colours(tokens, j, start):
            continue  # "orange and white cat": colours joined, not noun phrases
        if w in RELATIVES or w in CONJUNCTIONS:
            if cand is not None:
                break
            continue
        if cand is not None and is_verbal(tokens, j):
            break
        if is_head_candidate(w):
            cand = j
    return cand


def head_noun(tokens: Sequence[str]) -> str | None:
    """Heuristic head noun of a referring expression, without a parser.

    The last noun-capable, non-modifier word of the first chunk (the tokens before the first
    preposition, auxiliary, relative clause or verbal form); see the module docstring. Used by
    the distractor validation to make sure an edit kept the expression about the same kind of
    object.
    """
    toks = [t.lower() for t in tokens]
    idx = chunk_head_index(toks, 0)
    return None if idx is None else toks[idx]


def is_np_end(tokens: Sequence[str], i: int) -> bool:
    """Does the token before position i close a noun phrase (so a verb/PP may attach there)?
    Not when tokens[i] is an adjective that continues it ("purple | potted plant")."""
    if i <= 0:
        return False
    prev = tokens[i - 1]
    if is_head_candidate(prev):
        # a verb form used verbally ("sitting on", "parked in") does not close a noun phrase
        if prev in ING_NOUNS:
            return True
        return not (is_vbg(prev) or is_participle(prev))
    if prev in MODIFIERS:
        if _continues_np(tokens, i):
            return False  # "next to purple | potted plant": an adjective, not a clause verb
        # "man on the left | holding", "man left | holding"; not "white | dining table"
        for k in range(i - 2, -1, -1):
            w = tokens[k]
            if w in PREPOSITIONS or is_head_candidate(w):
                return True
            if not (w in DETERMINERS or w in MODIFIERS):
                return False
        return False
    return False


def _continues_np(tokens: Sequence[str], i: int) -> bool:
    """Is tokens[i], a verb form right after a bare modifier, an adjective of the noun after it
    ("purple potted plant", "red parked car", "two sleeping cats") rather than the verb of a
    clause? A participle before a noun always is; a verb-ing is not after a position that heads
    its own phrase ("on the left holding umbrella") or a worn colour ("in white holding bat")."""
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    if nxt is None or not is_head_candidate(nxt):
        return False
    w, prev = tokens[i], tokens[i - 1]
    if is_participle(w):
        return True
    if not is_vbg(w) or prev in POSITION_HEADS or (prev in NUMBERS and i >= 2
                                                   and tokens[i - 2] in ("number", "no")):
        return False  # "on the left | holding umbrella", "player number 5 | holding bat"
    worn = (prev in COLOR_SET or prev in OTHER_COLOR_WORDS) and i >= 2 \
        and tokens[i - 2] in _CLOTHING_COLOR_PREV
    return not worn


def _opens_clause(tokens: Sequence[str], j: int) -> bool:
    w = tokens[j]
    if w in _CLAUSE_OPENERS:
        return True
    if w != "that" or j + 1 >= len(tokens):
        return False  # "that" is also a determiner: "not holding that red cup"
    nxt = tokens[j + 1]
    return (nxt in AUXILIARIES or nxt in NEGATION_WORDS or is_vbg(nxt) or is_participle(nxt)
            or vbz_lemma(nxt) is not None)


def clause_ids(tokens: Sequence[str]) -> list[int]:
    """The clause of each token: a new clause opens at a relative pronoun ("man | who is not
    smiling"), "that" before a verb ("shirt | that isnt blue") and "but". Without a parser this
    splits less than English does ("and" never splits), which only makes negation scopes longer,
    the safe direction for the rules that read them."""
    out: list[int] = []
    k = 0
    for j in range(len(tokens)):
        if j > 0 and _opens_clause(tokens, j):
            k += 1
        out.append(k)
    return out


def negated_positions(tokens: Sequence[str]) -> frozenset[int]:
    """The token positions inside the scope of a negation word (``NEGATION_WORDS``), the word
    itself included. A word of ``NP_NEGATION_WORDS`` ("no", "without", "non", ...) negates the
    noun phrase after it, up to its head noun and over "and"/"or" + another noun phrase
    ("without hat or red scarf"); any other ("not", "isnt", "never", ...), or one whose phrase
    has no head ("wearing nothing red"), negates the rest of its clause (``clause_ids``): "the
    one not on the left", "shirt that isnt blue". A word edited there stays true of the
    target ("man without red hat" is also without a beige hat), so the swap rules skip them."""
    clause = clause_ids(tokens)
    n = len(tokens)
    out: set[int] = set()
    for j, w in enumerate(tokens):
        if w not in NEGATION_WORDS:
            continue
        clause_end = j
        while clause_end < n and clause[clause_end] == clause[j]:
            clause_end += 1
        end = clause_end
        if w in NP_NEGATION_WORDS:
            head = chunk_head_index(tokens, j + 1)
            while head is not None and head + 1 < n and tokens[head + 1] in ("and", "or", "nor"):
                head = chunk_head_index(tokens, head + 2)
            if head is not None:
                end = min(head + 1, clause_end)
        out.update(range(j, end))
    return frozenset(out)
