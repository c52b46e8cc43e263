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
is unknown). ``negation_scopes`` gives the scope of each negation word (``is_negator``: spelt
with or without apostrophes, "isn't" = "isnt"; "no" before a number is "number": "player no 5"):
the noun phrase after no/non/without/nothing/... (to its head, over "and"/"or" + another
phrase); after not/isnt/doesnt/never/... the rest of the clause up to where the predicate surely
ends (``_verbal_scope_end``): "and" before a new predicate, "not" after a closed phrase, a
position that :func:`stages.text.positional.asserted_position` reads as plainly asserted ("man
not wearing a hat | on the left"), a second verb-ing after a closed phrase ("not holding
anything | standing behind two men") and a worn colour right after the verb ("not smiling | in
pink"); a negated noun phrase ("not the man on the left") keeps the rest of the clause. The
distractor rules swap nothing in a scope and make no negation edit that touches two negations.
"""

from __future__ import annotations

from collections.abc import Sequence

from stages.text.lexicon import (
    ARTICLES,
    AUXILIARIES,
    BASE_FORM_AUXILIARIES,
    BASE_FORM_NEGATIONS,
    COLOR_SET,
    COMPOUND_VBG,
    CONJUNCTIONS,
    DETERMINERS,
    DISTANCE_SUPERLATIVES,
    FREQUENT_VERBS,
    FUNCTION_WORDS,
    ING_NOUN_VERBS,
    ING_NOUNS,
    NP_NEGATION_WORDS,
    NUMBERS,
    OTHER_COLOR_WORDS,
    POSITION_FORMS,
    POSITION_HEADS,
    PREPOSITIONS,
    PRO_FORMS,
    RELATIVES,
    SPATIAL_WORDS,
    negation_word,
)
from stages.text.morphology import lemmas, noun_number, verb_forms
from stages.text.positional import asserted_position

__all__ = [
    "FAR_NEAR_NOUNS",
    "MODIFIERS",
    "chunk_head_index",
    "clause_ids",
    "distance_preposition",
    "head_noun",
    "ing_is_noun",
    "is_head_candidate",
    "is_negator",
    "is_nounlike",
    "is_np_end",
    "is_participle",
    "is_vbg",
    "is_verbal",
    "joins_colours",
    "negated_positions",
    "negation_scopes",
    "negation_word",
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
    return (nxt in AUXILIARIES or negation_word(nxt) is not None or is_vbg(nxt)
            or is_participle(nxt)
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


# Skipped between a verbal negator and what it negates ("is not even", "isnt being").
_NEGATION_FILLER = frozenset(
    {"be", "being", "been", "even", "really", "currently", "actually", "also", "yet", "always",
     "ever", "quite", "exactly"})
# Particles closing a verb ("sitting down | wearing a dress").
_PARTICLES = frozenset(
    {"down", "up", "out", "off", "around", "away", "alone", "together", "there", "here", "back"})
_POSITION_FILLER = ARTICLES | frozenset(POSITION_FORMS) | {"far", "very", "extreme", "most"}


def is_negator(tokens: Sequence[str], j: int) -> bool:
    """Is tokens[j] a negation word here? "no" before a number is the abbreviation of "number"
    ("player no 5", "jersey no 10"), no negation ("no one" still is)."""
    w = negation_word(tokens[j])
    if w is None:
        return False
    if w == "no" and j + 1 < len(tokens):
        nxt = tokens[j + 1]
        if nxt[:1].isdigit() or (nxt in NUMBERS and nxt != "one"):
            return False
    return True


def _starts_predicate(tokens: Sequence[str], m: int) -> bool:
    """Does a coordinated predicate start at tokens[m] ("and | not wearing a hat", "and |
    holding a bat", "and | is smiling")?"""
    w = tokens[m]
    nxt = tokens[m + 1] if m + 1 < len(tokens) else None
    if is_negator(tokens, m) or w in AUXILIARIES or is_participle(w) or vbz_lemma(w):
        return True
    return _verbal_ing(w, nxt)


def _verbal_ing(w: str, nxt: str | None) -> bool:
    return is_vbg(w) and not ing_is_noun(w, nxt) and not (
        w in COMPOUND_VBG and nxt is not None and is_nounlike(nxt))


def _worn_colour_at(tokens: Sequence[str], m: int) -> bool:
    """"in pink", "in a red" + no noun: clothing of the subject, not a place of the verb."""
    if tokens[m] != "in":
        return False
    k = m + 1
    if k < len(tokens) and tokens[k] in ARTICLES:
        k += 1
    if k >= len(tokens) or not (tokens[k] in COLOR_SET or tokens[k] in OTHER_COLOR_WORDS):
        return False
    return k + 1 >= len(tokens) or not is_head_candidate(tokens[k + 1])


def _verbal_scope_end(tokens: Sequence[str], j: int, clause_end: int) -> int:
    """Where the scope of the verbal negator tokens[j] (not, isnt, never, ...) ends.

    The rest of its clause (a negation after it stays inside: "not wearing no shirt"), except
    at what surely starts outside it: "and" before a new predicate ("not sitting | and not
    wearing a hat", "awake | and not sleeping"), "not" after a closed phrase ("not in red | not
    wearing a hat"), a position that
    ``positional.asserted_position`` reads as plainly asserted ("not wearing a hat | on the
    left"), and, unless the negator negates a noun phrase ("not the man on the left"), a
    second verb-ing after a closed phrase ("not holding anything | standing behind two men")
    or a worn colour right after the verb ("not smiling | in pink"). A posture verb before a
    position ("not sitting on the left") keeps the position inside: which one is negated is
    unknown."""
    k = j + 1
    while k < clause_end and tokens[k] in _NEGATION_FILLER:
        k += 1
    if k >= clause_end:
        return clause_end
    w = tokens[k]
    base = negation_word(tokens[j]) in BASE_FORM_NEGATIONS or (
        j > 0 and tokens[j - 1] in BASE_FORM_AUXILIARIES)
    verb = is_vbg(w) or is_participle(w) or vbz_lemma(w) is not None or (
        base and "VERB" in lemmas(w))
    # "not the man on the left", "not two": a noun phrase is negated, and what follows it may
    # belong to it; only a coordinated predicate ends that scope
    nominal = not verb and w not in PREPOSITIONS and (
        starts_np(w) or w in PRO_FORMS or is_head_candidate(w))
    for m in range(k + 1, clause_end):
        t = tokens[m]
        nxt = tokens[m + 1] if m + 1 < len(tokens) else None
        if t == "and" and m + 1 < clause_end and _starts_predicate(tokens, m + 1):
            return m
        if nominal:
            continue
        if is_negator(tokens, m) and negation_word(t) not in NP_NEGATION_WORDS \
                and is_np_end(tokens, m):
            return m  # "not in red | not wearing a hat": a second predicate, negated itself
        if t in POSITION_FORMS and asserted_position(tokens, m):
            p = m - 1
            while p > k and tokens[p] in _POSITION_FILLER:
                p -= 1
            return p if p > k and tokens[p] in PREPOSITIONS else p + 1
        if m == k + 1 and verb and _worn_colour_at(tokens, m):
            return m
        if _verbal_ing(t, nxt) and (is_np_end(tokens, m) or tokens[m - 1] in _PARTICLES):
            return m
    return clause_end


def negation_scopes(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """``(j, end)`` per negation word tokens[j] (``is_negator``): its scope is tokens[j:end].

    A word of ``NP_NEGATION_WORDS`` ("no", "without", "non", ...) negates the noun phrase after
    it, up to its head noun and over "and"/"or" + another noun phrase ("without hat or red
    scarf"); any other ("not", "isnt", "never", ...), or one whose phrase has no head ("wearing
    nothing red"), negates the rest of its clause (``clause_ids``) up to where the predicate
    surely ends (``_verbal_scope_end``): "the one not on the left", "shirt that isnt blue", "man
    not wearing a hat" (but not "| on the left")."""
    clause = clause_ids(tokens)
    n = len(tokens)
    out: list[tuple[int, int]] = []
    for j in range(n):
        if not is_negator(tokens, j):
            continue
        clause_end = j
        while clause_end < n and clause[clause_end] == clause[j]:
            clause_end += 1
        end = clause_end
        head = None
        if negation_word(tokens[j]) in NP_NEGATION_WORDS:
            head = chunk_head_index(tokens, j + 1)
            while head is not None and head + 1 < n and tokens[head + 1] in ("and", "or", "nor"):
                head = chunk_head_index(tokens, head + 2)
        if head is not None:
            end = min(head + 1, clause_end)
        else:
            end = _verbal_scope_end(tokens, j, clause_end)
        out.append((j, end))
    return out


def negated_positions(tokens: Sequence[str]) -> frozenset[int]:
    """The token positions inside the scope of a negation word (``negation_scopes``), the word
    itself included. A word edited there stays true of the target ("man without red hat" is
    also without a beige hat), so the swap rules skip them."""
    out: set[int] = set()
    for j, end in negation_scopes(tokens):
        out.update(range(j, end))
    return frozenset(out)
