"""Positional words in referring expressions, and the mosaic quadrants they allow.

NeMo mosaic augmentation puts the positive image into one quadrant of a 2x2 grid::

    0 top-left     | 1 top-right
    2 bottom-left  | 3 bottom-right

If the expression says where the target is ("the man on the left"), the positive must go into a
quadrant where that stays true. :func:`positional_words` finds the canonical positional words of
a REFER token list; :func:`allowed_quadrants` turns them into the allowed quadrant ids.

Word forms (``WORD_FORMS``; matched on whole tokens only, lowercased)
----------------------------------------------------------------------

==========  ================================================================================
canonical   surface forms
==========  ================================================================================
left        left, leftmost, lefthand
right       right, rightmost, righthand
top         top, upper, topmost, uppermost, high, higher, highest
bottom      bottom, lower, low, lowest, bottommost, lowermost
==========  ================================================================================

* Tokens are split on ``-`` first, so "left-hand", "right-hand", "top-left", "bottom-right",
  "bottom-most", "left-most", "far-left" work through their parts; "left hand", "far left" and
  "upper left corner" work naturally ("hand", "far", "corner" are not positional).
* Only the listed forms count; nothing matches inside a longer word: "bright", "upright",
  "copyright", "alright", "highway", "highlight", "topping", "stop", "laptop",
  "tabletop", "lefty", "leftover", "rightful", "flowers", "slower", "lowered", "bottoms" do NOT
  match. Known, accepted noise: a listed form used in a non-spatial sense still counts ("tank
  top", "high chair", "low table", "lower the bar") - at worst it over-restricts the quadrant.
* Relations are not positions: "above", "below", "under", "beneath", "over", "front", "back",
  "behind", "near", "next", "beside" are never positional. "corner", "middle", "center",
  "centre", "side" carry no quadrant constraint on their own.

Clock positions
---------------

An hour 1-12 (digits ``1``..``12`` or words ``one``..``twelve``) immediately followed by
o'clock, in any REFER tokenization: ``3 o'clock``, ``3 o clock``, ``3 oclock``, ``3 o-clock``,
``3-o'clock``, ``3o'clock``, ``3oclock``, ``3o clock``, ``three o'clock`` (a lone ``'`` token
between ``o`` and ``clock`` is skipped; curly apostrophes are treated as ``'``):

======================  =========
hours                   canonical
======================  =========
11, 12, 1               top
2, 3, 4                 right
5, 6, 7                 bottom
8, 9, 10                left
======================  =========

A number without o'clock means nothing ("2 men", "left 3", "3:00", "13 o'clock").

Adverbial "right" (not positional)
----------------------------------

A bare token ``right`` is an adverb, and ignored, in:

* ``all right``;
* ``right next``, ``right behind``, ``right beside``, ``right by``, ``right there``,
  ``right in front`` (and ``right infront``), ``right in (the) middle/center/centre/front``,

unless the token before ``right`` makes it a noun or a direction (``_RIGHT_NOUN_CONTEXT``: "the",
"on", "at", "to", "far", "from", "extreme", "very", "most", a possessive such as "your", or a
vertical positional form such as "top"/"upper"/"bottom"): "guy on right next to girl", "the one
to the right behind the table", "top right by the window" ARE positional, while "guy right next
to girl", "the one right there" and "guy on the left right next to the girl" (a left/right form
before it is no noun context: "left right" names no place) are not. Missing a real position
would make the mosaic lie; keeping a spurious one only narrows the quadrant choice, so the adverb
rule is kept narrow.
"rightmost", "right-hand", "righthand" are always positional.

Negation
--------

A negator (``not``, ``never``, ``neither``, ``nor`` and the contracted forms ``isnt``, ``arent``,
``doesnt``, ... with or without the apostrophe, read by ``lexicon.negation_word`` as the
distractor rules read them; the ``NEGATION_WORDS`` of the lexicon without
"no", "without", "none", "nothing", "nobody", which negate nouns, not places) negates a
positional word when only place filler lies between them (``_NEGATION_BRIDGE``: "on", "in",
"at", "to", "the", "far", "is", "located", "one", other positional forms, ...; at most
``_NEGATION_REACH`` pieces). A negated word counts as its opposite, which is exact on the 2x2
mosaic: "guy not on the left" and "the one that isnt leftmost" -> right; "not in the top row"
-> bottom. "man not wearing a hat on the left" keeps "left" ("wearing", "hat" are no filler).
A posture or placement verb (``_NEGATION_POSTURE``: sitting, standing, lying, parked, placed,
...) between them leaves the reading open: "woman not standing on the right" is mostly "(the
woman who isn't standing) on the right", but may be "not (standing on the right)", so such a
word is dropped: no constraint ("dog not sitting on the left" -> no words; "man sitting on the
left", without a negator, -> left).
One negator over words on BOTH axes ("not on the top left": quadrants {1, 2, 3}, which no
intersection of words expresses) drops those words: no constraint rather than a false one.

Weak readings
-------------

A left/right/top/bottom form read in one of these ways says nothing, or only something relative,
about where the target is in the image:

* a relation to another object: the form (possibly followed by "side", "hand", "end", "corner",
  "edge", "part", "half") followed by "of", unless a frame noun follows ("picture", "image",
  "photo", "frame", "screen", "center", ...): "to the left of the truck", "on top of the table",
  "the left side of the bench" are relations; "top of the picture", "right of center" are not;
* gaze or motion: a verb such as "facing", "looking", "turned", "pointing", "heading",
  "walking" before the form, at most ``_GAZE_REACH`` pieces back over "to", "the", "his",
  "slightly", ...: "looking right", "facing to the left";
* a body part: the form followed by "hand", "arm", "leg", "foot", "ear", "eye", "shoulder",
  "knee", "paw", "wing", ... ("left hand", "right arm"), unless a place noun follows that
  ("left hand side", "upper right hand corner" are positions);
* the verb "left" (:func:`left_is_verb`): "left" after "only" or "last" (within three pieces),
  not right after a preposition, article, possessive, "only"/"last" or another positional form
  and not before a place noun ("side", "corner", ...): "the only donut left", "last one left"
  (but "the only one on the left", "only left guy", "the only girl left side" are positions).

Weak readings give way: on each axis (left/right, top/bottom) the strong words decide when there
are any, and the weak ones only when there are none. A weak word alone still counts (narrowing
the quadrant choice never makes the sentence false; "car to the left of the truck" keeps "left"),
so this only settles sentences that would otherwise contradict themselves: "the car on the right
to the left of the truck" -> right, "guy on left looking right" -> left, "man on the right
holding racket in left hand" -> right, "the only donut left on the right" -> right.

Quadrants and conflicts
-----------------------

left -> {0, 2}, right -> {1, 3}, top -> {0, 1}, bottom -> {2, 3}. Several words intersect
("top left" -> [0], "lower right corner" -> [3]). Each axis is settled on its own: an axis whose
words still disagree after the rules above ("left and right") gives no word and no constraint,
and the other axis keeps its own: "top left and right" -> ["top"], [0, 1]. So
:func:`positional_words` never returns both words of an axis, and :func:`allowed_quadrants`
treats a conflicting axis of any word list the same way. No positional word at all allows all
four quadrants [0, 1, 2, 3].

All functions are pure and deterministic; :func:`positional_words` is one pass over the tokens
with a single dict lookup per token (plus a neighbour look at the rare hits).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stages.text.lexicon import (
    HOUR_WORDS,
    NEGATION_WORDS,
    POSITION_FORMS,
    PREPOSITIONS,
    negation_word,
)

__all__ = [
    "CANONICAL",
    "OPPOSITE",
    "WORD_FORMS",
    "allowed_quadrants",
    "asserted_position",
    "left_is_verb",
    "negated_words",
    "positional_words",
    "quadrants_for_tokens",
    "tokenize",
]

# The positional word forms (stages.text.lexicon, shared with the distractor rules) and the
# directions they name: left, right, top, bottom.
WORD_FORMS = POSITION_FORMS
CANONICAL: tuple[str, ...] = tuple(dict.fromkeys(POSITION_FORMS.values()))

ALL_QUADRANTS: tuple[int, ...] = (0, 1, 2, 3)

# Bit q set <=> quadrant q allowed.
_MASK = {"left": 0b0101, "right": 0b1010, "top": 0b0011, "bottom": 0b1100}
_FULL = 0b1111
_MASK_TO_QUADS = tuple(tuple(q for q in range(4) if m >> q & 1) for m in range(16))
_BIT = {w: 1 << i for i, w in enumerate(CANONICAL)}
_BITS_TO_WORDS = tuple(
    tuple(w for i, w in enumerate(CANONICAL) if b >> i & 1) for b in range(1 << len(CANONICAL))
)

_HOURS: dict[str, int] = {str(h): h for h in range(1, 13)}
_HOURS.update({w: h for h, w in enumerate(HOUR_WORDS, start=1)})


def _clock_word(hour: int) -> str:
    if hour in (11, 12, 1):
        return "top"
    if hour <= 4:
        return "right"
    if hour <= 7:
        return "bottom"
    return "left"


_OCLOCK = frozenset({"o'clock", "oclock"})

# One lookup table for the scan: token -> (kind, payload).
_FORM, _HOUR, _HOUR_OCLOCK, _HOUR_O = 0, 1, 2, 3
_TABLE: dict[str, tuple[int, str]] = {}
for _tok, _word in WORD_FORMS.items():
    _TABLE[_tok] = (_FORM, _word)
for _tok, _h in _HOURS.items():
    _TABLE[_tok] = (_HOUR, _clock_word(_h))  # needs o'clock next
    for _suffix in _OCLOCK:
        _TABLE[_tok + _suffix] = (_HOUR_OCLOCK, _clock_word(_h))  # "3o'clock", "3oclock"
    _TABLE[_tok + "o"] = (_HOUR_O, _clock_word(_h))  # "3o" needs "clock" next
del _tok, _word, _h, _suffix

_RIGHT_ADVERB_NEXT = frozenset({"next", "behind", "beside", "by", "there", "infront"})
# "right in front", "right in the middle": after "in" / "in the", these make "right" an adverb.
_RIGHT_ADVERB_IN = frozenset({"front", "middle", "center", "centre"})
_HORIZONTAL_FORMS = frozenset(f for f, w in WORD_FORMS.items() if w in ("left", "right"))
_RIGHT_NOUN_CONTEXT = (frozenset(WORD_FORMS) - _HORIZONTAL_FORMS) | frozenset(
    {
        "the", "on", "at", "to", "far", "from", "extreme", "very", "most",
        "your", "my", "his", "her", "its", "their", "our",
    }
)  # fmt: skip

# -- negation (see the module docstring) ------------------------------------------------------
# read through lexicon.negation_word, as the distractor rules read them: "isn't", "isnt" and
# REFER's split "n't" (as "not") are all negators
_NEGATORS = NEGATION_WORDS - {"no", "without", "none", "nothing", "nobody"}
_NEGATION_REACH = 6
_NEGATION_BRIDGE = frozenset(WORD_FORMS) | frozenset(
    {
        "on", "in", "at", "to", "toward", "towards", "from", "the", "a", "an", "far", "very",
        "most", "extreme", "is", "are", "was", "were", "be", "being", "been", "located",
        "positioned", "situated", "one", "ones", "all", "way", "or", "side", "exactly", "quite",
        "really",
    }
)  # fmt: skip
# A posture or placement verb between a negator and a position leaves the scope open: "woman not
# standing on the right" is mostly "(the woman who isn't standing) on the right", but may be "not
# (standing on the right)". Neither reading is safe, so the word gives no constraint.
_NEGATION_POSTURE = frozenset(
    {
        "sitting", "sat", "seated", "standing", "stood", "lying", "laying", "kneeling",
        "squatting", "crouching", "crouched", "leaning", "resting", "hanging", "perched",
        "parked", "placed",
    }
)  # fmt: skip
_AMBIGUOUS = -2  # _negator_at: a negator reaches the word only across a posture verb

# -- weak readings (see the module docstring) -------------------------------------------------
_OF_BRIDGE = frozenset({"side", "hand", "end", "corner", "edge", "part", "half", "most"})
_FRAME_NOUNS = frozenset(
    {
        "picture", "pictures", "pic", "pics", "photo", "photos", "photograph", "image",
        "images", "frame", "screen", "scene", "shot", "view", "center", "centre", "middle",
    }
)  # fmt: skip
_ARTICLES = frozenset({"the", "a", "an", "this", "that"})
_GAZE_VERBS = frozenset(
    {
        "face", "faces", "facing", "faced", "look", "looks", "looking", "looked", "turn",
        "turns", "turning", "turned", "point", "points", "pointing", "pointed", "glance",
        "glances", "glancing", "gaze", "gazes", "gazing", "stare", "stares", "staring", "lean",
        "leans", "leaning", "head", "heads", "heading", "headed", "going", "goes", "move",
        "moves", "moving", "walk", "walks", "walking", "run", "runs", "running", "drive",
        "drives", "driving", "swerving", "veering",
    }
)  # fmt: skip
_GAZE_BRIDGE = frozenset(
    {
        "to", "toward", "towards", "the", "his", "her", "its", "their", "slightly", "a", "bit",
        "little", "more", "further", "farther", "far", "straight", "off",
    }
)  # fmt: skip
_GAZE_REACH = 4
_BODY_PARTS = frozenset(
    {
        "hand", "hands", "arm", "arms", "leg", "legs", "foot", "feet", "ear", "ears", "eye",
        "eyes", "shoulder", "shoulders", "knee", "knees", "elbow", "elbows", "wrist", "wrists",
        "wing", "wings", "paw", "paws", "hip", "hips", "thumb", "fingers", "cheek",
    }
)  # fmt: skip
_PLACE_NOUNS = frozenset(
    {"side", "corner", "edge", "end", "part", "half", "area", "portion", "column", "row", "most"}
)
_LEFT_VERB_CUES = frozenset({"only", "last"})
# Before these "left" is a place ("the only one on the left", "only top left"), not the verb.
_LEFT_NOUN_CONTEXT = _RIGHT_NOUN_CONTEXT | frozenset(WORD_FORMS) | PREPOSITIONS | _LEFT_VERB_CUES
_AXIS = {"left": 0, "right": 0, "top": 1, "bottom": 1}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

_APOSTROPHES = "'\u2019\u2018"
_TOKEN_RE = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercased tokens of a raw sentence.

    Splits on whitespace and punctuation, keeping apostrophes inside words ("o'clock", "man's")
    and hyphens inside words ("top-left", "left-hand"); curly apostrophes become ``'``.
    Hyphenated tokens are split further by :func:`positional_words`.
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    return _TOKEN_RE.findall(text)


def _pieces(tokens: Sequence[str]) -> list[str]:
    """Lowercased tokens split on hyphens (and whitespace), outer apostrophes stripped, empties
    dropped."""
    out: list[str] = []
    append = out.append
    for tok in tokens:
        t = tok.lower()
        if "-" in t or " " in t:
            for part in t.replace("-", " ").split():
                if "'" in part or "\u2019" in part or "\u2018" in part:
                    part = part.replace("\u2019", "'").replace("\u2018", "'").strip("'")
                if part:
                    append(part)
            continue
        if "'" in t or "\u2019" in t or "\u2018" in t:
            t = t.replace("\u2019", "'").replace("\u2018", "'").strip("'")
        if t:
            append(t)
    return out


def _right_is_adverb(pieces: Sequence[str], i: int) -> bool:
    prev = pieces[i - 1] if i > 0 else ""
    if prev == "all":
        return True
    if prev in _RIGHT_NOUN_CONTEXT:
        return False
    n = len(pieces)
    nxt = pieces[i + 1] if i + 1 < n else ""
    if nxt in _RIGHT_ADVERB_NEXT:
        return True
    if nxt != "in" or i + 2 >= n:
        return False
    after = pieces[i + 3] if pieces[i + 2] == "the" and i + 3 < n else pieces[i + 2]
    return after in _RIGHT_ADVERB_IN


def _negator_at(pieces: Sequence[str], i: int) -> int:
    """Index of the negator whose scope reaches the positional word at ``i`` (over place filler
    only), ``_AMBIGUOUS`` when it reaches it only across a posture verb ("not sitting on the
    left"), or -1."""
    posture = False
    for j in range(i - 1, max(i - 1 - _NEGATION_REACH, -1), -1):
        p = pieces[j].replace("'", "").replace("\u2019", "")
        if negation_word(p) in _NEGATORS:
            return _AMBIGUOUS if posture else j
        if p in _NEGATION_POSTURE:
            posture = True
        elif p not in _NEGATION_BRIDGE and p not in _TABLE:  # an hour ("not at 3 o'clock")
            return -1
    return -1


def left_is_verb(pieces: Sequence[str], i: int) -> bool:
    """Is "left" at ``i`` the verb ("the only donut left", "last one left") rather than a place?
    Only after "only"/"last" (within three pieces) and not right after a preposition, article,
    possessive, "only"/"last" or another positional form ("the only one on the left", "only left
    guy"), nor before a place noun ("the only girl left side"). Shared with the distractor rules,
    which must not swap the verb."""
    n = len(pieces)
    if pieces[i] != "left" or i < 2 or pieces[i - 1] in _LEFT_NOUN_CONTEXT:
        return False
    if i + 1 < n and pieces[i + 1] in _PLACE_NOUNS:
        return False
    return any(p in _LEFT_VERB_CUES for p in pieces[max(i - 3, 0):i - 1])


def asserted_position(tokens: Sequence[str], i: int) -> bool:
    """Does the positional form at ``tokens[i]`` (lowercase tokens, read as pieces) say plainly
    where the target is: no weak reading (relation, gaze, body part, the verb "left"), no adverb
    "right", and no negator reaching it, not even across a posture verb? The distractor rules
    take such a word out of an earlier negation's scope ("man not wearing a hat | on the left")."""
    word = WORD_FORMS.get(tokens[i])
    if word is None or (tokens[i] == "right" and _right_is_adverb(tokens, i)):
        return False
    return not _is_weak(tokens, i, word) and _negator_at(tokens, i) == -1


def _is_weak(pieces: Sequence[str], i: int, word: str) -> bool:
    """Whether the form at ``i`` is read as a relation, a gaze, a body part or the verb "left"
    (module docstring, "Weak readings") rather than as the target's place in the image."""
    n = len(pieces)
    j = i + 1
    while j < n and j <= i + 2 and pieces[j] in _OF_BRIDGE:
        j += 1
    if j < n and pieces[j] == "of":
        k = j + 1
        while k < n and pieces[k] in _ARTICLES:
            k += 1
        if k >= n or pieces[k] not in _FRAME_NOUNS:
            return True
    if word in ("left", "right") and i + 1 < n and pieces[i + 1] in _BODY_PARTS \
            and (i + 2 >= n or pieces[i + 2] not in _PLACE_NOUNS):
        return True
    for j in range(i - 1, max(i - 1 - _GAZE_REACH, -1), -1):
        if pieces[j] in _GAZE_VERBS:
            return True
        if pieces[j] not in _GAZE_BRIDGE:
            break
    return left_is_verb(pieces, i)


def negated_words(tokens: Sequence[str]) -> set[str]:
    """Canonical words a negator plainly reaches ("not on the left" -> {"left"}): the ones
    `positional_words` gives as their opposite, which is exact on the 2x2 mosaic only. A rule
    about the scene (where the other instances stand) must test "not left" as such."""
    pieces = _pieces(tokens)
    out: set[str] = set()
    for i, p in enumerate(pieces):
        word = WORD_FORMS.get(p)
        if word is None or (p == "right" and _right_is_adverb(pieces, i)):
            continue
        if _negator_at(pieces, i) >= 0:
            out.add(word)
    return out


def positional_words(tokens: Sequence[str]) -> list[str]:
    """Canonical positional words that ``tokens`` (REFER tokens or :func:`tokenize` output)
    assert about the target's place, deduplicated, in ``CANONICAL`` order: negated words turned
    to their opposite, weak readings dropped where a strong word speaks for the same axis, and
    an axis whose words still disagree left out (module docstring)."""
    if isinstance(tokens, str):
        raise TypeError("positional_words expects a token list; use tokenize() on raw text")
    pieces = _pieces(tokens)
    n = len(pieces)
    # per axis: [strong words, weak words]; per negator: the axes it negates and its hits
    found: list[list[set[str]]] = [[set(), set()], [set(), set()]]
    hits: list[tuple[str, bool, int]] = []
    for i, p in enumerate(pieces):
        hit = _TABLE.get(p)
        if hit is None:
            continue
        kind, word = hit
        if kind == _FORM:
            if p == "right" and _right_is_adverb(pieces, i):
                continue
        elif kind == _HOUR:
            nxt = pieces[i + 1] if i + 1 < n else ""
            if nxt not in _OCLOCK and (nxt != "o" or i + 2 >= n or pieces[i + 2] != "clock"):
                continue
        elif kind == _HOUR_O and (i + 1 >= n or pieces[i + 1] != "clock"):
            continue
        neg = _negator_at(pieces, i)
        if neg == _AMBIGUOUS:
            continue  # "dog not sitting on the left": no safe reading
        weak = kind == _FORM and _is_weak(pieces, i, word)
        hits.append((word, weak, neg))
    negated_axes: dict[int, set[int]] = {}
    for word, _, neg in hits:
        if neg >= 0:
            negated_axes.setdefault(neg, set()).add(_AXIS[word])
    for word, weak, neg in hits:
        if neg >= 0:
            if len(negated_axes[neg]) > 1:
                continue  # "not top left": the complement of one quadrant; no words say that
            word = OPPOSITE[word]
        found[_AXIS[word]][weak].add(word)
    bits = 0
    for strong, weak in found:
        axis_words = strong or weak
        if len(axis_words) == 1:
            bits |= _BIT[next(iter(axis_words))]
    return list(_BITS_TO_WORDS[bits])


def allowed_quadrants(words: Sequence[str]) -> list[int]:
    """Sorted quadrant ids consistent with all ``words`` (canonical words or ``WORD_FORMS``
    surface forms; anything else, e.g. "corner", adds no constraint). Each axis is settled on
    its own: one whose words conflict ("left", "right") adds no constraint, the other axis
    still does. No positional word allows all four."""
    if isinstance(words, str):
        raise TypeError("allowed_quadrants expects a sequence of words, not a str")
    axis_mask = [_FULL, _FULL]
    for w in words:
        canonical = w if w in _MASK else WORD_FORMS.get(w.lower())
        if canonical is None:
            continue
        axis_mask[_AXIS[canonical]] &= _MASK[canonical]
    mask = (axis_mask[0] or _FULL) & (axis_mask[1] or _FULL)
    return list(_MASK_TO_QUADS[mask])


def quadrants_for_tokens(tokens: Sequence[str]) -> tuple[list[str], list[int]]:
    """``(positional_words(tokens), allowed_quadrants(of those words))``."""
    words = positional_words(tokens)
    return words, allowed_quadrants(words)
