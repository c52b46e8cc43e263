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
  ``right in front`` (and ``right infront``),

unless the token before ``right`` makes it a noun or a direction (``_RIGHT_NOUN_CONTEXT``: "the",
"on", "at", "to", "far", "from", "extreme", "very", "most", a possessive such as "your", or any
positional form such as "top"/"upper"/"bottom"): "guy on right next to girl", "the one to the
right behind the table", "top right by the window" ARE positional, while "guy right next to
girl" and "the one right there" are not. Missing a real position would make the mosaic lie;
keeping a spurious one only narrows the quadrant choice, so the adverb rule is kept narrow.
"rightmost", "right-hand", "righthand" are always positional.

Quadrants
---------

left -> {0, 2}, right -> {1, 3}, top -> {0, 1}, bottom -> {2, 3}. Several words intersect
("top left" -> [0], "lower right corner" -> [3]). An empty intersection (a conflict such as
"left and right" or "top ... bottom") and no positional word at all both allow all four
quadrants [0, 1, 2, 3].

All functions are pure and deterministic; :func:`positional_words` is one pass over the tokens
with a single dict lookup per token (plus a neighbour look at the rare hits).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stages.text.lexicon import HOUR_WORDS, POSITION_FORMS

__all__ = [
    "CANONICAL",
    "WORD_FORMS",
    "allowed_quadrants",
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
_RIGHT_NOUN_CONTEXT = frozenset(WORD_FORMS) | frozenset(
    {
        "the", "on", "at", "to", "far", "from", "extreme", "very", "most",
        "your", "my", "his", "her", "its", "their", "our",
    }
)  # fmt: skip

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


def _right_is_adverb(pieces: list[str], i: int) -> bool:
    prev = pieces[i - 1] if i > 0 else ""
    if prev == "all":
        return True
    if prev in _RIGHT_NOUN_CONTEXT:
        return False
    n = len(pieces)
    nxt = pieces[i + 1] if i + 1 < n else ""
    if nxt in _RIGHT_ADVERB_NEXT:
        return True
    return nxt == "in" and i + 2 < n and pieces[i + 2] == "front"


def positional_words(tokens: Sequence[str]) -> list[str]:
    """Canonical positional words in ``tokens`` (REFER tokens or :func:`tokenize` output),
    deduplicated, in ``CANONICAL`` order."""
    if isinstance(tokens, str):
        raise TypeError("positional_words expects a token list; use tokenize() on raw text")
    pieces = _pieces(tokens)
    n = len(pieces)
    bits = 0
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
        bits |= _BIT[word]
    return list(_BITS_TO_WORDS[bits])


def allowed_quadrants(words: Sequence[str]) -> list[int]:
    """Sorted quadrant ids consistent with all ``words`` (canonical words or ``WORD_FORMS``
    surface forms; anything else, e.g. "corner", adds no constraint). A conflict, or no
    positional word, allows all four."""
    if isinstance(words, str):
        raise TypeError("allowed_quadrants expects a sequence of words, not a str")
    mask = _FULL
    for w in words:
        m = _MASK.get(w)
        if m is None:
            canonical = WORD_FORMS.get(w.lower())
            if canonical is None:
                continue
            m = _MASK[canonical]
        mask &= m
    return list(_MASK_TO_QUADS[mask or _FULL])


def quadrants_for_tokens(tokens: Sequence[str]) -> tuple[list[str], list[int]]:
    """``(positional_words(tokens), allowed_quadrants(of those words))``."""
    words = positional_words(tokens)
    return words, allowed_quadrants(words)
