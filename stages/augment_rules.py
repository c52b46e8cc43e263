"""Rule-based text hard negatives ("distractors") for referring image segmentation.

Why: the contrastive loss of the hard-negative stage (see ``hard_negative_notes.txt``, "Text
Augmentation") needs captions that look almost exactly like the positive but are WRONG for its
target: "the man in red" -> "the man in blue". The notes suggest an LLM; this module does the
same offline, deterministically and cheaply with hand-written rules over REFER-cleaned sentences
(lowercase, no punctuation, whitespace-tokenised). No parser is assumed (spaCy models and NLTK data
are not available); word classes come from lemminflect's lexicon (``getAllLemmas``,
``getAllInflections``) plus the closed word lists below.

Every distractor is ONE minimal edit confined to one slot: ``span`` is the half-open token span
``[start, end)`` of the source that was replaced, ``slot`` reads ``"<source words>-><new words>"``
(e.g. ``"red->blue"``, ``"holding->not holding"``, ``"not->"`` for a deletion), and
``text == " ".join(src[:start] + new_words + src[end:])``. A sentence without an editable slot
yields nothing of that kind, never a broken sentence. Input is lowercased and split on
whitespace. When an edited word follows "a"/"an" and its first sound changes, the article is
re-chosen and joins the span ("a red shirt" -> "an orange shirt", slot ``"a red->an orange"``).

Randomness: substitutes are drawn with ``random.Random`` seeded from sha256 of
(seed, sentence, kind), so draws are reproducible across processes and independent between
kinds; ``seed`` may be an int or a sequence of ints (e.g. ``(epoch, sample_id)``). Distractor k of
a kind edits slot ``k mod n_slots`` (round-robin over the slots in sentence order), drawing
without replacement; the list for ``per_kind=k`` is a prefix of the one for ``k+1``.

Guard: ``generate`` keeps only candidates that pass ``validate(source, d)`` without context, so a
rule slip on an odd sentence never reaches training data. The rules are tested without the guard
on every hand-written test sentence; the guard only fires on garbled input.

Kinds
=====

``swap_color`` (random draw)
    Colour lexicon ``COLORS``: red blue green yellow white black orange purple pink brown gray
    grey tan beige silver gold. Decisions:

    * "dark"/"light" are NOT colours here: they are shade modifiers ("dark blue") and common nouns
      ("traffic light"); "dark blue shirt" edits "blue" and keeps "dark".
    * "blond"/"blonde" are NOT in the lexicon: they are hair colours, and swapping them with shirt
      colours ("purple woman") gives absurd, not hard, negatives.
    * Words merely containing a colour are never edited ("bright", "reddish", "redhead").
    * "grey" is accepted in input but never produced ("gray" is the canonical spelling).
    * Near-synonym groups ``COLOR_GROUPS`` (gray/grey/silver, tan/beige/brown, gold/yellow): a
      substitute is never in the group of the original nor in the group of any colour already in
      the sentence, because "gray shirt" -> "silver shirt" is not reliably false.
    * "orange" is the fruit (not a slot) when it is the head noun ("orange on the left"), when
      it ends a noun phrase right after a determiner/number ("bowl with an orange"), or before a
      fruit-part noun ("orange slice", "orange juice"); "an orange shirt" is a colour. "orange"
      is not drawn as a substitute where it would become the head ("the red" -> "the orange").

    Several colours -> distractor k edits colour slot ``k mod n`` (round-robin), each draw without
    replacement from that slot's remaining substitutes.

``swap_spatial`` (deterministic: each spatial word maps to its opposite)
    left<->right, leftmost<->rightmost, lefthand<->righthand, top<->bottom, topmost<->bottommost,
    uppermost<->lowermost, upper<->lower, highest<->lowest, higher->lower, above<->below,
    under/underneath/beneath->above, front<->back, inside<->outside, foreground<->background,
    closest/nearest->farthest, farthest/furthest->closest. Phrases, matched before single words:
    "in front of"->"behind", "in front"->"behind", "behind"->"in front of" (before a noun phrase)
    or "in front" (at the end / before a preposition), "on top of"->"under",
    "close to"->"far from", "far from"->"close to", "closest to"/"nearest to"->"farthest from",
    "farthest from"/"furthest from"->"closest to", "near"->"far from" (preposition) or "far"
    (before side/end/corner/edge or at the end), "far"->"near" only before side/end/corner/edge
    ("far left" is an intensifier: only "left" is edited), "on top" (not followed by "of") ->
    "on the bottom". Not edited: "top" after tank/crop/halter/tube/bikini or before hat(s)
    (clothing), "bottom" after bikini, "back" after a verb ("looking back"). Decision: with
    several spatial words, ONE word is edited per distractor (one distractor per word, in sentence
    order, up to ``per_kind``): "top left" -> "bottom left" and "top right".
    "middle"/"center" have no opposite and are never edited.

``swap_count`` (random draw)
    Cardinals one..ten and 1..10, ordinals first..tenth and 1st..10th. A substitute keeps the form
    (word/digit, cardinal/ordinal), lies within +-2 of the original value (1..10; near values are
    the hard ones) and is not a value already present in the sentence (cardinal and ordinal values
    are counted separately). Not a slot: "one" without a following noun ("right one", "the one on
    left", "one of", "one holding bat"), a number after "number", before "o"/"oclock"/"clock", or an
    ordinal after "a" ("a second"). Agreement: crossing 1 <-> 2+ re-inflects the head noun of the
    following noun phrase with lemminflect ("one person" -> "two people", "two little girls" -> "one
    little girl"); when that head is missing or cannot be inflected the crossing substitutes are
    simply not drawn, so no ungrammatical count is ever generated (``validate`` reports hand-made
    ones as "number agreement").

``negation`` (deterministic; verbal edits first, then prepositional ones, each in sentence order)
    * "is/are/was/were X" -> "is not X" ("man who is sitting" -> "man who is not sitting");
    * "has/have/had" -> "does/do/did not have" ("car that has ..." -> "car that does not
      have ..."), or "has not" before a participle ("has been");
    * a verb-s after who/that/which -> "does not <lemma>" ("dog that chases" -> "dog that does
      not chase"), also a verb-s right after the head noun when it is verbal (see ``head_noun``);
    * a verb-ing or an -ed/-en participle after a noun phrase -> "not <verb>" ("man holding an
      umbrella" -> "man not holding an umbrella", "car parked on street" -> "car not parked on
      street"). Not for nouns in -ing (``ING_NOUNS``: building, painting, ceiling ...), prenominal
      compounds (``COMPOUND_VBG`` + noun: "dining table", "folding chair"), participles that can
      be nouns ("shed"), or after a bare adjective ("white dining table");
    * an existing negation is removed (also wrong for the target): "does not have" -> "has",
      "without" -> "with", and "not" after an auxiliary or before a verb form / preposition
      ("is not sitting" -> "is sitting", "man not wearing hat" -> "man wearing hat");
    * "with" -> "without" after a noun phrase ("woman with a hat" -> "woman without a hat");
    * a locative preposition after a noun phrase gets "not" ("dog on the couch" -> "dog not on
      the couch"): in on at near by behind under underneath beneath above below beside inside
      outside between among against along across atop over around into onto through toward(s),
      and "next" before "to". Never "of", "from", "to", "for" ("second from left").

``role_reversal`` (deterministic)
    Pattern ``NP1 [who|that|which [is|are]] VERB NP2 [rest]`` where NP1 starts the sentence and
    ends at its head noun, VERB is a transitive verb-ing (or verb-s followed by a determiner /
    after a relative pronoun), not in ``INTRANSITIVE`` (stand, sit, look ...), and NP2 follows the
    verb directly and ends at its head noun. The two noun phrases (with their adjectives) swap:
    "big dog chasing small cat" -> "small cat chasing big dog". Determiners: when both are articles
    (or absent), no number word is involved and a/an never lands on a plural, the determiners stay
    in place and a/an is re-chosen ("man holding the child" -> "child holding the man", "a man
    holding an umbrella" -> "an umbrella holding a man"); otherwise the whole phrases swap
    ("two men holding a baby" -> "a baby holding two men"). Skipped when both heads are the same
    noun, or when verb-s / "is/are" would then disagree in number with the new subject. The rule
    does not judge plausibility ("shirt wearing a man" is produced; it is false for the target).

``head_noun`` heuristic (no parser)
===================================
Scan the first chunk: tokens from the start up to the first boundary, where a boundary is a
preposition (always), "not", an auxiliary, or - once a head candidate has been seen - a relative
pronoun (who/that/which/...), "and"/"or" (except between two colours: "orange and white cat"), or a
verbal token (a verb-ing that is not in ``ING_NOUNS``/``COMPOUND_VBG``, an -ed/-en participle that
lemminflect cannot read as a noun, or a verb-s followed by a determiner / of a frequent REFER verb,
or a frequent verb in base form after a plural noun: "men hold umbrellas"). "near" before
side/end/corner/edge is an adjective, not a boundary ("the near side" -> side). A head candidate is
a word lemminflect can read as a NOUN (out-of-vocabulary alphabetic words count as nouns) that is
not a function word and not a modifier (colour, spatial, number, ordinal word, half, whole), plus
"one"/"ones" (pronoun "right one") and "orange" (fruit). The head is the LAST candidate of the
chunk, because English noun phrases are head-final ("second bottle" -> bottle, "blue shirt guy" ->
guy, "man in red" -> man). Returns None when the chunk has no candidate ("left", "second from
right"). Known limits: partitives give the quantity word ("pair of scissors" -> pair), noun-noun
compounds misread as verbs ("glass building" -> glass) and the like; they are consistent between a
source and its distractor, which is what validation needs. Heads are compared by noun lemma
(``person``/``people`` are the same head, so "one person" -> "two people" keeps its head).

Validation (``validate``; the reason strings, in the order checked)
====================================================================
"empty" (no tokens), "identical" (same tokens), "unknown kind", "edit outside slot" (the
source and the distractor must agree on every token before ``span[0]`` and after ``span[1]``,
so only the span changed, insertions at either span boundary - the +-1 allowance for an inserted
"not"/"without" - included; the ``slot`` string must also name exactly the replaced and the new
words), "head noun changed" (``head_noun`` lemmas differ; not for role_reversal), "head noun not
swapped" (role_reversal: the new head must be the head of the source's second noun phrase),
"synonym" (colour in the same ``COLOR_GROUPS`` group, or the same number value: "two"->"2"),
"number agreement" (swap_count: in the edited region a cardinal 1 now precedes a plural head
noun, or 2+ a singular one, while the source agreed there - "an eight year old" never did), and
"describes another instance" (swap_spatial with a ``SceneContext`` only, below).

Geometry rule ("describes another instance")
    The positional words of the whole distractor (left family: left leftmost lefthand; right
    family; top family: top topmost upper uppermost highest higher; bottom family: bottom
    bottommost lower lowermost lowest) form its description. Box centres are compared among the
    target and ``same_class_boxes``. A direction holds for an instance when it is the extreme
    instance in that direction (smallest centre x for left, largest for right, smallest centre y
    for top, largest for bottom), or when its centre lies in that outer third of the image
    (x < w/3 for left, x > 2w/3 for right, y < h/3 top, y > 2h/3 bottom). The distractor is
    rejected when some OTHER same-class instance satisfies every direction of the description:
    then the new caption is true of an object in the image and is no negative for "the image".
    The target itself is not tested (its annotation says where it is); relational words (above,
    front, near, ...) are depth/relations that boxes cannot decide and are never rejected here.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from lemminflect import getAllInflections, getAllLemmas, getAllLemmasOOV, getInflection

__all__ = [
    "COLORS",
    "COLOR_GROUPS",
    "KINDS",
    "SPATIAL_OPPOSITES",
    "Distractor",
    "Rejection",
    "SceneContext",
    "generate",
    "generate_validated",
    "head_noun",
    "validate",
]

KINDS = ("swap_color", "swap_spatial", "swap_count", "negation", "role_reversal")

# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distractor:
    """One minimal edit of a referring expression that makes it wrong for its target."""

    kind: str
    text: str
    slot: str  # "<replaced source words>-><new words>", e.g. "red->blue"
    span: tuple[int, int]  # half-open token span of the source that was replaced


@dataclass(frozen=True)
class Rejection:
    """A candidate distractor that ``validate`` refused, with the reason (kept for auditing)."""

    kind: str
    text: str
    reason: str


Box = tuple[float, float, float, float]


@dataclass
class SceneContext:
    """What the image says about the target's class, for the swap_spatial geometry check."""

    target_box: Box  # COCO xywh
    same_class_boxes: list[Box]  # the OTHER instances of the target's category in the image
    image_size: tuple[int, int]  # (w, h)


# --------------------------------------------------------------------------------------------
# Lexicons
# --------------------------------------------------------------------------------------------

COLORS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "white", "black", "orange", "purple", "pink", "brown",
    "gray", "grey", "tan", "beige", "silver", "gold",
)
_COLOR_SET = frozenset(COLORS)
# "grey" is understood but never produced.
_COLOR_SUBSTITUTES: tuple[str, ...] = tuple(c for c in COLORS if c != "grey")
COLOR_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"gray", "grey", "silver"}),
    frozenset({"tan", "beige", "brown"}),
    frozenset({"gold", "yellow"}),
)
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
_FAR_NEAR_NOUNS = frozenset({"side", "end", "corner", "edge"})
_TOP_CLOTHING_PREV = frozenset({"tank", "crop", "halter", "tube", "bikini"})
# Positional words with a box-geometry meaning, by canonical direction.
_GEO: dict[str, str] = {
    "left": "left", "leftmost": "left", "lefthand": "left",
    "right": "right", "rightmost": "right", "righthand": "right",
    "top": "top", "topmost": "top", "upper": "top", "uppermost": "top", "highest": "top",
    "higher": "top",
    "bottom": "bottom", "bottommost": "bottom", "lower": "bottom", "lowermost": "bottom",
    "lowest": "bottom",
}

_CARD_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ORD_WORDS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
              "ninth", "tenth")
_ORD_NUMS = ("1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th", "10th")
# token -> (family, value); a family is a (cardinal|ordinal, word|digit) surface form.
_NUMBERS: dict[str, tuple[str, int]] = {}
for _v in range(1, 11):
    _NUMBERS[_CARD_WORDS[_v - 1]] = ("card_word", _v)
    _NUMBERS[str(_v)] = ("card_digit", _v)
    _NUMBERS[_ORD_WORDS[_v - 1]] = ("ord_word", _v)
    _NUMBERS[_ORD_NUMS[_v - 1]] = ("ord_num", _v)
_FAMILY_FORMS: dict[str, tuple[str, ...]] = {
    "card_word": _CARD_WORDS,
    "card_digit": tuple(str(v) for v in range(1, 11)),
    "ord_word": _ORD_WORDS,
    "ord_num": _ORD_NUMS,
}
_COUNT_RADIUS = 2

PREPOSITIONS = frozenset({
    "in", "on", "at", "with", "without", "near", "by", "of", "from", "to", "for", "behind",
    "under", "underneath", "beneath", "above", "below", "beside", "besides", "between", "among",
    "next", "inside", "outside", "into", "onto", "over", "across", "along", "against", "around",
    "through", "toward", "towards", "past", "like", "than", "about", "after", "before", "during",
    "except", "within", "atop", "upon", "via", "off", "up", "down", "out", "beyond", "amongst",
    "alongside",
})
_NEGATABLE_PREPS = frozenset({
    "in", "on", "at", "near", "by", "behind", "under", "underneath", "beneath", "above", "below",
    "beside", "inside", "outside", "between", "among", "against", "along", "across", "atop",
    "over", "around", "into", "onto", "through", "toward", "towards", "next",
})
DETERMINERS = frozenset({
    "the", "a", "an", "this", "that", "these", "those", "some", "any", "each", "every", "all",
    "both", "another", "other", "its", "his", "her", "their", "my", "your", "our", "no", "either",
    "neither", "several", "many", "few", "most",
})
_ARTICLES = frozenset({"the", "a", "an"})
_PRONOUNS = frozenset({
    "he", "she", "it", "they", "them", "him", "i", "you", "we", "me", "us", "itself", "himself",
    "herself", "themselves", "there", "here", "what",
})
RELATIVES = frozenset({"who", "that", "which", "whose", "whom", "where", "when", "while"})
_AUX = frozenset({
    "is", "are", "was", "were", "be", "being", "been", "am", "has", "have", "had", "does", "do",
    "did", "can", "could", "will", "would", "should", "may", "might", "must",
})
_CONJ = frozenset({"and", "or", "but", "nor", "plus"})
_FUNCTION_WORDS = (
    PREPOSITIONS | DETERMINERS | _PRONOUNS | RELATIVES | _AUX | _CONJ | {"not", "very", "so"}
)
_SPATIAL_WORDS = frozenset(SPATIAL_OPPOSITES) | {
    "middle", "center", "centre", "far", "near", "close", "closer", "farther", "further",
    "high", "low", "central",
}
# "half"/"whole" quantify rather than head: "sandwich half on right" -> sandwich.
_MODIFIERS = (_COLOR_SET | _SPATIAL_WORDS | frozenset(_NUMBERS) | {"half", "whole"}) - {"one"}

# Nouns ending in -ing that lemminflect may read as verb-ing forms.
ING_NOUNS = frozenset({
    "building", "buildings", "painting", "paintings", "clothing", "ceiling", "railing",
    "railings", "wedding", "frosting", "icing", "topping", "toppings", "filling", "stuffing",
    "siding", "bedding", "drawing", "drawings", "dressing", "landing", "parking", "crossing",
    "opening", "evening", "morning", "seating", "housing", "lighting", "shopping", "wrapping",
    "packaging", "writing", "lettering", "carving", "setting", "fencing", "netting", "flooring",
    "paneling", "trimming", "trimmings", "awning", "stocking", "stockings", "pudding",
})
# Verb-ing forms that are prenominal modifiers when a noun follows ("dining table").
COMPOUND_VBG = frozenset({
    "dining", "living", "sliding", "ironing", "rolling", "baking", "folding", "frying", "mixing",
    "batting", "swimming", "sleeping", "waiting", "running",
})
INTRANSITIVE = frozenset({
    "stand", "sit", "walk", "run", "look", "lie", "lay", "smile", "lean", "jump", "fly", "swim",
    "sleep", "wait", "squat", "kneel", "crouch", "bend", "stay", "rest", "go", "come", "talk",
    "laugh", "pose", "graze", "park", "skate", "ski", "surf", "stare", "glance", "sing", "cry",
    "hang", "float", "perch", "dive", "fall", "turn", "move", "play",
})
_FREQUENT_VERBS = frozenset({
    "hold", "wear", "sit", "stand", "look", "eat", "ride", "carry", "lie", "lay", "face", "watch",
    "throw", "catch", "hit", "drink", "use", "talk", "smile", "walk", "run", "fly", "swing",
    "pull", "push", "feed", "kiss", "hug", "chase", "touch", "reach", "point", "lean", "have",
})
_IRREGULAR_PLURAL = {"person": "people"}
_IRREGULAR_SINGULAR = {"people": "person"}
_INVARIANT_NOUNS = frozenset({
    "sheep", "deer", "fish", "moose", "bison", "salmon", "aircraft", "broccoli", "series",
    "species", "cattle", "people",
})


# --------------------------------------------------------------------------------------------
# Word classes (lemminflect, cached)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def _lemmas(word: str) -> dict[str, tuple[str, ...]]:
    return dict(getAllLemmas(word))


@lru_cache(maxsize=65536)
def _verb_forms(word: str, tags: tuple[str, ...]) -> tuple[str, ...]:
    """Verb lemmas of which ``word`` is one of the inflections ``tags`` (e.g. ("VBG",))."""
    out = []
    for lemma in _lemmas(word).get("VERB", ()):
        infl = getAllInflections(lemma, upos="VERB")
        if any(word in infl.get(tag, ()) for tag in tags):
            out.append(lemma)
    return tuple(out)


def _is_nounlike(word: str) -> bool:
    """Can ``word`` be a content noun? (OOV alphabetic words are assumed to be nouns.)"""
    if word in _FUNCTION_WORDS:
        return False
    if word in ING_NOUNS:
        return True
    lem = _lemmas(word)
    if lem:
        return "NOUN" in lem
    return word.isalpha() and len(word) > 1


def _is_head_candidate(word: str) -> bool:
    if word in ("one", "ones", "orange"):
        return True
    return word not in _MODIFIERS and _is_nounlike(word)


def _is_vbg(word: str) -> bool:
    return word.endswith("ing") and bool(_verb_forms(word, ("VBG",)))


def _is_participle(word: str) -> bool:
    """An -ed/-en past participle that cannot be a noun ("parked", "dressed", "eaten")."""
    if word in _MODIFIERS or not word.endswith(("ed", "en")):
        return False
    lem = _lemmas(word)
    if "NOUN" in lem or "VERB" not in lem:
        return False
    return bool(_verb_forms(word, ("VBN", "VBD")))


def _vbz_lemma(word: str) -> str | None:
    if word in _AUX or word in _MODIFIERS or not word.endswith("s"):
        return None
    forms = _verb_forms(word, ("VBZ",))
    return forms[0] if forms else None


def _starts_np(word: str | None) -> bool:
    return word is not None and (word in DETERMINERS or word in _NUMBERS)


def _is_verbal(tokens: Sequence[str], j: int) -> bool:
    """Is tokens[j] (after a head candidate) the verb that ends the noun phrase?"""
    w = tokens[j]
    nxt = tokens[j + 1] if j + 1 < len(tokens) else None
    if w in _MODIFIERS:
        return False
    if _is_vbg(w):
        if w in ING_NOUNS and not _starts_np(nxt):
            return False
        return not (w in COMPOUND_VBG and nxt is not None and _is_nounlike(nxt))
    if _is_participle(w) or (w == "cut" and nxt in (None, "off", "out")):
        return True
    if w in _FREQUENT_VERBS and j > 0 and _noun_number(tokens[j - 1]) == "pl":
        return True  # plural present tense: "men hold umbrellas"
    lemma = _vbz_lemma(w)
    return lemma is not None and (_starts_np(nxt) or lemma in _FREQUENT_VERBS)


def _chunk_head_index(tokens: Sequence[str], start: int = 0) -> int | None:
    """Index of the head noun of the chunk starting at ``start`` (see the module docstring)."""
    cand: int | None = None
    for j in range(start, len(tokens)):
        w = tokens[j]
        nxt = tokens[j + 1] if j + 1 < len(tokens) else None
        if w == "near" and nxt in _FAR_NEAR_NOUNS:
            continue  # adjective: "the near side"
        if w in PREPOSITIONS or w in _AUX or w == "not":
            break
        if w in _CONJ and j > start and tokens[j - 1] in _COLOR_SET and nxt in _COLOR_SET:
            continue  # "orange and white cat": colours joined, not noun phrases
        if w in RELATIVES or w in _CONJ:
            if cand is not None:
                break
            continue
        if cand is not None and _is_verbal(tokens, j):
            break
        if _is_head_candidate(w):
            cand = j
    return cand


def head_noun(tokens: Sequence[str]) -> str | None:
    """Heuristic head noun of a referring expression, without a parser.

    The last noun-capable, non-modifier word of the first chunk (the tokens before the first
    preposition, auxiliary, relative clause or verbal form); see the module docstring. Used by
    ``validate`` to make sure an edit kept the expression about the same kind of object.
    """
    toks = [t.lower() for t in tokens]
    idx = _chunk_head_index(toks, 0)
    return None if idx is None else toks[idx]


def _noun_lemma(word: str | None) -> str | None:
    """Singular form, so that "person" and "people" count as the same head."""
    if word is None:
        return None
    if word in _IRREGULAR_SINGULAR:
        return _IRREGULAR_SINGULAR[word]
    lem = _lemmas(word).get("NOUN")
    if not lem:
        lem = getAllLemmasOOV(word, "NOUN").get("NOUN", (word,))
    return lem[0]


def _noun_number(word: str) -> str:
    """"sg", "pl" or "both" (invariant / unknown)."""
    if word in _IRREGULAR_SINGULAR:
        return "pl"
    if word in _IRREGULAR_PLURAL:
        return "sg"
    if word in _INVARIANT_NOUNS:
        return "both"
    lem = _lemmas(word).get("NOUN")
    if not lem:
        if word in _FUNCTION_WORDS or not word.isalpha():
            return "both"
        lem = getAllLemmasOOV(word, "NOUN").get("NOUN", (word,))
    is_sg = word in lem
    is_pl = any(lemma != word for lemma in lem)
    if is_sg and is_pl:
        return "both"
    return "pl" if is_pl else "sg"


def _pluralize(word: str) -> str | None:
    if word in _IRREGULAR_PLURAL:
        return _IRREGULAR_PLURAL[word]
    if word in _INVARIANT_NOUNS:
        return word
    forms = getAllInflections(word, upos="NOUN").get("NNS")
    if not forms:
        if _lemmas(word):
            return None
        forms = getInflection(word, tag="NNS", inflect_oov=True)
    for f in forms or ():
        if f != word:
            return f
    return None


def _singularize(word: str) -> str | None:
    if word in _IRREGULAR_SINGULAR:
        return _IRREGULAR_SINGULAR[word]
    if word in _INVARIANT_NOUNS:
        return word
    lem = _lemmas(word).get("NOUN") or getAllLemmasOOV(word, "NOUN").get("NOUN", ())
    for lemma in lem:
        if lemma != word:
            return lemma
    return None


def _article(next_word: str) -> str:
    """"a" or "an" before ``next_word`` (spelling heuristic with the usual exceptions)."""
    w = next_word
    if w.startswith(("one", "uni", "use", "usu", "eu", "uk")):
        return "a"
    if w.startswith(("hour", "honest", "honor", "heir")) or w in ("8", "11", "18", "8th", "11th"):
        return "an"
    return "an" if w[:1] in "aeiou" else "a"


# --------------------------------------------------------------------------------------------
# Candidate edits per kind. An edit is (start, end, new_tokens).
# --------------------------------------------------------------------------------------------

Edit = tuple[int, int, tuple[str, ...]]


def _tokens(sentence: str) -> list[str]:
    return sentence.lower().split()


def _is_np_end(tokens: Sequence[str], i: int) -> bool:
    """Does the token before position i close a noun phrase (so a verb/PP may attach there)?"""
    if i <= 0:
        return False
    prev = tokens[i - 1]
    if _is_head_candidate(prev):
        # a verb form used verbally ("sitting on", "parked in") does not close a noun phrase
        if prev in ING_NOUNS:
            return True
        return not (_is_vbg(prev) or _is_participle(prev))
    if prev in _MODIFIERS:
        # "man on the left | holding", "man left | holding"; not "white | dining table"
        for k in range(i - 2, -1, -1):
            w = tokens[k]
            if w in PREPOSITIONS or _is_head_candidate(w):
                return True
            if not (w in DETERMINERS or w in _MODIFIERS):
                return False
        return False
    return False


def _color_slots(tokens: Sequence[str]) -> list[int]:
    head = _chunk_head_index(tokens, 0)
    slots = []
    for i, w in enumerate(tokens):
        if w not in _COLOR_SET:
            continue
        if w == "orange":
            prev = tokens[i - 1] if i else None
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if i == head or nxt in _ORANGE_FRUIT_NEXT:
                continue
            # fruit also when it heads a later phrase: "bowl of an orange", "half an orange"
            ends_np = nxt is None or nxt in _FUNCTION_WORDS
            if ends_np and (prev is None or prev in DETERMINERS or prev in _NUMBERS):
                continue
        slots.append(i)
    return slots


def _color_group(word: str) -> frozenset[str]:
    for g in COLOR_GROUPS:
        if word in g:
            return g
    return frozenset({word})


def _color_options(tokens: Sequence[str]) -> list[tuple[int, list[Edit]]]:
    present: set[str] = set()
    for w in tokens:
        if w in _COLOR_SET:
            present |= _color_group(w)
    head = _noun_lemma(head_noun(tokens))
    out = []
    for i in _color_slots(tokens):
        edits = []
        for c in _COLOR_SUBSTITUTES:
            if c in present:
                continue
            # "the red" -> "the orange" would be the fruit: the head must stay the same
            if c == "orange" and _noun_lemma(head_noun(_apply(tokens, (i, i + 1, (c,))))) != head:
                continue
            edits.append((i, i + 1, (c,)))
        out.append((i, edits))
    return out


def _spatial_edits(tokens: Sequence[str]) -> list[Edit]:
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
                and nxt not in _CONJ and not _is_vbg(nxt)
            new = ("in", "front", "of") if np_follows else ("in", "front")
        elif w == "near":
            if nxt is None or nxt in _FAR_NEAR_NOUNS:
                new = ("far",)
            elif nxt not in PREPOSITIONS and nxt not in _CONJ and nxt not in RELATIVES:
                new = ("far", "from")
        elif w == "far":
            if nxt in _FAR_NEAR_NOUNS:
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
            verbal_prev = prev is not None and (_is_vbg(prev) or _is_participle(prev))
            new = None if verbal_prev or nxt == "and" else ("front",)
        elif w in SPATIAL_OPPOSITES:
            new = (SPATIAL_OPPOSITES[w],)
        if new is not None:
            edits.append((i, i + 1, new))
        i += 1
    return edits


def _count_options(tokens: Sequence[str]) -> list[tuple[int, list[Edit]]]:
    n = len(tokens)
    present: dict[str, set[int]] = {"card": set(), "ord": set()}
    for w in tokens:
        if w in _NUMBERS:
            fam, v = _NUMBERS[w]
            present[fam.split("_")[0]].add(v)
    out = []
    for i, w in enumerate(tokens):
        if w not in _NUMBERS:
            continue
        fam, v = _NUMBERS[w]
        prev = tokens[i - 1] if i else None
        nxt = tokens[i + 1] if i + 1 < n else None
        if prev == "number" or nxt in ("o", "oclock", "clock"):
            continue
        cardinal = fam.startswith("card")
        if not cardinal and prev == "a":
            continue
        head = _chunk_head_index(tokens, i + 1) if cardinal else None
        if head is not None and tokens[head] in ("one", "ones"):
            head = None
        if nxt is not None and nxt not in ING_NOUNS and (_is_vbg(nxt) or _is_participle(nxt)):
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
            number = _noun_number(noun)
            if nv == 1:
                new_noun = noun if number == "both" else (
                    _singularize(noun) if number == "pl" else None)
            else:
                new_noun = noun if number == "both" else (
                    _pluralize(noun) if number == "sg" else None)
            if new_noun is None:
                continue
            mid = tuple(tokens[i + 1:head])
            edits.append((i, head + 1, (new_num, *mid, new_noun)))
        if edits:
            out.append((i, edits))
    return out


def _negation_edits(tokens: Sequence[str]) -> list[Edit]:
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
            elif prev is not None and (prev in _AUX or nxt in PREPOSITIONS or (
                    nxt is not None and (_is_vbg(nxt) or _is_participle(nxt)))):
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
            if nxt == "been" or _is_participle(nxt):
                verbal.append((i, i + 1, (w, "not")))
            else:
                do = {"has": "does", "have": "do", "had": "did"}[w]
                verbal.append((i, i + 1, (do, "not", "have")))
            continue
        if w == "without":
            prepositional.append((i, i + 1, ("with",)))
            continue
        lemma = _vbz_lemma(w)
        if lemma is not None and (prev in ("who", "that", "which")
                                  or (_is_np_end(tokens, i) and _is_verbal(tokens, i))):
            verbal.append((i, i + 1, ("does", "not", lemma)))
            continue
        if (_is_vbg(w) or _is_participle(w)) and _is_np_end(tokens, i):
            if w in ING_NOUNS and not _starts_np(nxt):
                continue
            if w in COMPOUND_VBG and nxt is not None and _is_nounlike(nxt):
                continue
            verbal.append((i, i + 1, ("not", w)))
            continue
        if w == "with" and nxt not in (None, "no") and _is_np_end(tokens, i):
            prepositional.append((i, i + 1, ("without",)))
            continue
        if w in _NEGATABLE_PREPS and nxt is not None and _is_np_end(tokens, i):
            if w == "next" and nxt != "to":
                continue
            prepositional.append((i, i + 1, ("not", w)))
    return verbal + prepositional


def _role_pattern(tokens: Sequence[str]) -> tuple[int, int, int, int] | None:
    """(h1, verb, np2_start, h2) for ``NP1 [rel [aux]] VERB NP2 ...``, or None."""
    n = len(tokens)
    h1 = _chunk_head_index(tokens, 0)
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
    if _is_vbg(verb) and verb not in ING_NOUNS and (aux or not rel):
        lemmas = _verb_forms(verb, ("VBG",))
        vbz = False
    else:
        lemma = _vbz_lemma(verb)
        if lemma is None or aux or not (rel or _starts_np(tokens[k + 1])):
            return None
        lemmas = (lemma,)
        vbz = True
    if any(lemma in INTRANSITIVE for lemma in lemmas):
        return None
    if not rel and not vbz and not _is_verbal(tokens, k):
        return None
    h2 = _chunk_head_index(tokens, k + 1)
    if h2 is None or tokens[h2] in ("one", "ones", "orange"):
        return None  # "kid wearing orange": a colour, not an object to swap with
    if any(t in PREPOSITIONS or t in RELATIVES or t in _CONJ for t in tokens[k + 1:h2]):
        return None
    if _noun_lemma(tokens[h1]) == _noun_lemma(tokens[h2]):
        return None
    if (vbz or aux) and _plural(tokens[h1]) != _plural(tokens[h2]):
        return None
    return h1, k, k + 1, h2


def _plural(word: str) -> bool:
    return _noun_number(word) == "pl"


def _role_edits(tokens: Sequence[str]) -> list[Edit]:
    pat = _role_pattern(tokens)
    if pat is None:
        return []
    h1, verb, s2, h2 = pat
    np1, np2 = list(tokens[0:h1 + 1]), list(tokens[s2:h2 + 1])
    d1 = np1[0] if np1[0] in DETERMINERS else None
    d2 = np2[0] if np2[0] in DETERMINERS else None
    c1 = np1[1:] if d1 else np1
    c2 = np2[1:] if d2 else np2
    has_number = any(t in _NUMBERS for t in c1 + c2)
    positional = (
        bool(c1) and bool(c2) and not has_number
        and d1 in (None, *_ARTICLES) and d2 in (None, *_ARTICLES)
        and not (d1 in ("a", "an") and _plural(tokens[h2]))
        and not (d2 in ("a", "an") and _plural(tokens[h1]))
    )
    if positional:
        new1 = ([_article(c2[0]) if d1 in ("a", "an") else d1] if d1 else []) + c2
        new2 = ([_article(c1[0]) if d2 in ("a", "an") else d2] if d2 else []) + c1
    else:
        new1, new2 = np2, np1
    middle = list(tokens[h1 + 1:s2])
    return [(0, h2 + 1, tuple(new1 + middle + new2))]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _rng(seed: int | Sequence[int], sentence: str, kind: str) -> random.Random:
    """A stream that depends only on (seed, sentence, kind): stable across processes/runs."""
    seed_key = str(seed) if isinstance(seed, int) else ",".join(str(int(s)) for s in seed)
    digest = hashlib.sha256(f"{seed_key}\x1f{sentence}\x1f{kind}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _draw(options: list[list[Edit]], limit: int, rng: random.Random | None) -> list[Edit]:
    """Round-robin over slots, drawing without replacement (the first remaining edit when
    ``rng`` is None). The result for ``limit`` k is a prefix of the result for k + 1, which
    ``generate_validated`` relies on for spare candidates."""
    pools = [list(edits) for edits in options if edits]
    out: list[Edit] = []
    k = 0
    while len(out) < limit and any(pools):
        pool = pools[k % len(pools)]
        k += 1
        if pool:
            out.append(pool.pop(rng.randrange(len(pool)) if rng is not None else 0))
    return out


def _with_article(tokens: Sequence[str], edit: Edit) -> Edit:
    """Re-choose a preceding a/an when the edit changes the first sound ("a red" -> "an
    orange"); the article then becomes part of the edited span."""
    s, e, new = edit
    if s == 0 or not new or tokens[s - 1] not in ("a", "an"):
        return edit
    art = _article(new[0])
    if art == tokens[s - 1]:
        return edit
    return (s - 1, e, (art, *new))


def _apply(tokens: Sequence[str], edit: Edit) -> list[str]:
    s, e, new = edit
    return [*tokens[:s], *new, *tokens[e:]]


_RANDOM_KINDS = frozenset({"swap_color", "swap_count"})


def _options(tokens: list[str], kind: str) -> list[list[Edit]]:
    """The rules' raw candidate edits, grouped by slot (one edit per slot for the deterministic
    kinds), in sentence order, before any validation."""
    if kind == "swap_color":
        return [[_with_article(tokens, e) for e in edits] for _, edits in _color_options(tokens)]
    if kind == "swap_count":
        return [[_with_article(tokens, e) for e in edits] for _, edits in _count_options(tokens)]
    if kind == "swap_spatial":
        return [[_with_article(tokens, e)] for e in _spatial_edits(tokens)]
    if kind == "negation":
        return [[e] for e in _negation_edits(tokens)]
    if kind == "role_reversal":
        return [[e] for e in _role_edits(tokens)]
    raise ValueError(f"unknown distractor kind {kind!r}; expected one of {KINDS}")


def _make(tokens: Sequence[str], kind: str, edit: Edit) -> Distractor:
    s, e, repl = edit
    slot = f"{' '.join(tokens[s:e])}->{' '.join(repl)}"
    return Distractor(kind=kind, text=" ".join(_apply(tokens, edit)), slot=slot, span=(s, e))


def generate(
    sentence: str,
    kinds: Sequence[str] = KINDS,
    per_kind: int = 2,
    seed: int | Sequence[int] = 0,
) -> list[Distractor]:
    """Up to ``per_kind`` distractors of each kind in ``kinds`` (in that order).

    Random substitutes (colour, count) come from a stream seeded by (seed, sentence, kind), so a
    fixed seed reproduces the same distractors in any process; spatial, negation and role
    reversal edits are deterministic. A sentence without a slot for a kind yields none of it.
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    tokens = _tokens(sentence)
    out: list[Distractor] = []
    if per_kind <= 0 or not tokens:
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown distractor kind {kind!r}; expected one of {KINDS}")
        return out
    sentence = " ".join(tokens)
    for kind in kinds:
        # Guard: keep only candidates that pass the context-free validation, so a rule slip on
        # an odd sentence never reaches the training data (the rules alone are tested too).
        options = [
            [e for e in slot if validate(sentence, _make(tokens, kind, e)) is None]
            for slot in _options(tokens, kind)
        ]
        rng = _rng(seed, sentence, kind) if kind in _RANDOM_KINDS else None
        out.extend(_make(tokens, kind, e) for e in _draw(options, per_kind, rng))
    return out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _centre(box: Box) -> tuple[float, float]:
    x, y, w, h = box
    return x + w / 2.0, y + h / 2.0


def _describes_other_instance(dst: Sequence[str], context: SceneContext) -> bool:
    dirs = {_GEO[w] for w in dst if w in _GEO}
    if not dirs or not context.same_class_boxes:
        return False
    width, height = context.image_size
    centres = [_centre(context.target_box)] + [_centre(b) for b in context.same_class_boxes]
    xs = [c[0] for c in centres]
    ys = [c[1] for c in centres]
    eps = 1e-6

    def holds(cx: float, cy: float, d: str) -> bool:
        if d == "left":
            return cx <= min(xs) + eps or (width > 0 and cx < width / 3.0)
        if d == "right":
            return cx >= max(xs) - eps or (width > 0 and cx > 2.0 * width / 3.0)
        if d == "top":
            return cy <= min(ys) + eps or (height > 0 and cy < height / 3.0)
        return cy >= max(ys) - eps or (height > 0 and cy > 2.0 * height / 3.0)

    return any(all(holds(cx, cy, d) for d in dirs) for cx, cy in centres[1:])


def _slot_matches(d: Distractor, src: list[str], dst: list[str]) -> bool:
    s, e = d.span
    if not (0 <= s <= e <= len(src)):
        return False
    tail = len(src) - e
    if len(dst) < s + tail or dst[:s] != src[:s] or dst[len(dst) - tail:] != src[e:]:
        return False
    if "->" not in d.slot:
        return False
    before, after = d.slot.split("->", 1)
    return before.split() == src[s:e] and after.split() == dst[s:len(dst) - tail]


def _number_agreement_ok(dst: list[str], start: int, stop: int) -> bool:
    for j in range(start, min(stop, len(dst))):
        w = dst[j]
        if w not in _NUMBERS or not _NUMBERS[w][0].startswith("card"):
            continue
        h = _chunk_head_index(dst, j + 1)
        if h is None or dst[h] in ("one", "ones") or dst[h] in _NUMBERS:
            continue
        number = _noun_number(dst[h])
        value = _NUMBERS[w][1]
        if (value == 1 and number == "pl") or (value >= 2 and number == "sg"):
            return False
    return True


def validate(source: str, d: Distractor, context: SceneContext | None = None) -> str | None:
    """Why ``d`` is not a usable hard negative of ``source`` (a short reason), or None.

    A negative must stay about the same object (same head noun), differ only in its declared
    slot (so the loss learns that slot), and - for spatial swaps, when the scene is known - must
    not become true of another instance of the same class.
    """
    src = _tokens(source)
    dst = _tokens(d.text)
    if not dst:
        return "empty"
    if dst == src:
        return "identical"
    if d.kind not in KINDS:
        return "unknown kind"
    if not _slot_matches(d, src, dst):
        return "edit outside slot"
    if d.kind == "role_reversal":
        pat = _role_pattern(src)
        new_head = _noun_lemma(head_noun(dst))
        if pat is None or new_head != _noun_lemma(src[pat[3]]):
            return "head noun not swapped"
    elif _noun_lemma(head_noun(src)) != _noun_lemma(head_noun(dst)):
        return "head noun changed"
    s, e = d.span
    new_words = dst[s:len(dst) - (len(src) - e)]
    old_words = src[s:e]
    if d.kind == "swap_color":
        for old, new in zip(old_words, new_words, strict=False):
            if old != new and old in _COLOR_SET and new in _color_group(old):
                return "synonym"
    if d.kind == "swap_count":
        old_vals = [_NUMBERS[w][1] for w in old_words if w in _NUMBERS]
        new_vals = [_NUMBERS[w][1] for w in new_words if w in _NUMBERS]
        if old_vals and old_vals == new_vals:
            return "synonym"
        # only where the source itself agrees ("an eight year old" does not, and is fine)
        if not _number_agreement_ok(dst, s, s + len(new_words)) and _number_agreement_ok(
                src, s, e):
            return "number agreement"
    if d.kind == "swap_spatial" and context is not None and _describes_other_instance(dst, context):
        return "describes another instance"
    return None


def generate_validated(
    sentence: str,
    kinds: Sequence[str] = KINDS,
    per_kind: int = 2,
    seed: int | Sequence[int] = 0,
    context: SceneContext | None = None,
) -> tuple[list[Distractor], list[Rejection]]:
    """``generate`` + ``validate``: up to ``per_kind`` valid distractors per kind, and the
    rejected candidates with their reasons.

    A rejected candidate is replaced by the next one of the same kind when there is one
    (candidate lists are prefix-stable, so the kept ones match ``generate`` whenever nothing is
    rejected); at most ``2 * per_kind`` candidates are examined per kind. Since ``generate``
    already drops context-free failures, rejections here come from the scene (``context``).
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    kept: list[Distractor] = []
    rejected: list[Rejection] = []
    for kind in kinds:
        n_ok = 0
        for d in generate(sentence, (kind,), per_kind=2 * per_kind, seed=seed):
            if n_ok >= per_kind:
                break
            reason = validate(sentence, d, context)
            if reason is None:
                kept.append(d)
                n_ok += 1
            else:
                rejected.append(Rejection(kind=kind, text=d.text, reason=reason))
    return kept, rejected
