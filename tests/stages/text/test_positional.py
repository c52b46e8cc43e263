"""stages.text.positional: positional words of referring expressions and allowed mosaic quadrants.

The expected values below are written by hand from the product spec (quadrants: 0 top-left,
1 top-right, 2 bottom-left, 3 bottom-right), not computed with the module.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.text import positional as positional_module
from stages.text.positional import (
    CANONICAL,
    WORD_FORMS,
    allowed_quadrants,
    positional_words,
    quadrants_for_tokens,
    tokenize,
)

ALL = [0, 1, 2, 3]
L, R, T, B = [0, 2], [1, 3], [0, 1], [2, 3]

# (input, expected words, expected quadrants). A str is a raw sentence (goes through
# tokenize); a list is REFER tokens as stored in refs(*).p.
CASES = [
    # --- each form -------------------------------------------------------------------------
    ("man on the left", ["left"], L),
    ("leftmost person", ["left"], L),
    ("left-hand side of the couch", ["left"], L),
    (["lefthand", "chair"], ["left"], L),
    (["left", "hand", "side"], ["left"], L),
    ("far left guy", ["left"], L),
    ("woman on the right", ["right"], R),
    ("rightmost zebra", ["right"], R),
    ("right-hand man", ["right"], R),
    (["righthand", "cup"], ["right"], R),
    ("far right", ["right"], R),
    ("top shelf", ["top"], T),
    ("upper plate", ["top"], T),
    ("topmost bird", ["top"], T),
    ("uppermost window", ["top"], T),
    ("the high one", ["top"], T),
    ("highest kite", ["top"], T),
    ("higher kite", ["top"], T),  # a comparative, like "lower"
    ("bottom cake", ["bottom"], B),
    ("lower bunk", ["bottom"], B),
    ("lowermost shelf", ["bottom"], B),
    ("low branch", ["bottom"], B),
    ("lowest drawer", ["bottom"], B),
    ("bottommost book", ["bottom"], B),
    ("bottom-most book", ["bottom"], B),
    ("LEFT Guy", ["left"], L),
    # --- substrings / relations that must not match ------------------------------------------
    ("bright yellow umbrella", [], ALL),
    ("upright piano", [], ALL),
    ("highway sign", [], ALL),
    ("stop sign", [], ALL),
    ("laptop on desk", [], ALL),
    ("tabletop", [], ALL),
    ("copyright text", [], ALL),
    ("highlight", [], ALL),
    ("pink flowers", [], ALL),
    ("slower car", [], ALL),
    ("lowered arm", [], ALL),
    ("lefty", [], ALL),
    ("rightful owner", [], ALL),
    ("topping", [], ALL),
    ("alright", [], ALL),
    ("plate below the cup", [], ALL),
    ("dog under the table", [], ALL),
    ("man above the sign", [], ALL),
    ("car in front", [], ALL),
    ("guy in back", [], ALL),
    # --- hyphenated ---------------------------------------------------------------------------
    ("top-left pizza", ["left", "top"], [0]),
    ("top-right", ["right", "top"], [1]),
    ("bottom-left slice", ["left", "bottom"], [2]),
    ("bottom-right corner", ["right", "bottom"], [3]),
    (["bottom-right"], ["right", "bottom"], [3]),
    (["upper-left"], ["left", "top"], [0]),
    (["far-left"], ["left"], L),
    (["left-most"], ["left"], L),
    # --- combinations -------------------------------------------------------------------------
    ("top left", ["left", "top"], [0]),
    ("upper left corner", ["left", "top"], [0]),
    ("bottom right", ["right", "bottom"], [3]),
    ("lower right corner", ["right", "bottom"], [3]),
    ("guy on the left at the top", ["left", "top"], [0]),
    ("second from left in the bottom row", ["left", "bottom"], [2]),
    ("left left left", ["left"], L),
    ("middle left", ["left"], L),
    ("center right", ["right"], R),
    ("top middle", ["top"], T),
    # --- conflicts: an axis whose words disagree says nothing, the other axis still counts ---
    ("left and right", [], ALL),
    ("top cake above the bottom plate", [], ALL),
    ("top left and bottom", ["left"], L),
    ("left-right", [], ALL),
    ("top left and right", ["top"], T),
    ("upper left lower right", [], ALL),
    # --- no constraint ------------------------------------------------------------------------
    ("corner", [], ALL),
    ("middle", [], ALL),
    ("center", [], ALL),
    ("centre", [], ALL),
    ("the man in the middle", [], ALL),
    ("", [], ALL),
    ([], [], ALL),
    ("   ", [], ALL),
    # --- clock positions ----------------------------------------------------------------------
    ("player at 12 o'clock", ["top"], T),
    ("1 o'clock", ["top"], T),
    ("11 o'clock", ["top"], T),
    ("twelve o'clock", ["top"], T),
    (["3", "o'clock"], ["right"], R),
    (["3", "o", "clock"], ["right"], R),
    (["3", "oclock"], ["right"], R),
    (["three", "o'clock"], ["right"], R),
    (["3o'clock"], ["right"], R),
    (["3oclock"], ["right"], R),
    (["3o", "clock"], ["right"], R),
    (["3", "o-clock"], ["right"], R),
    (["3-o'clock"], ["right"], R),
    (["3", "o", "'", "clock"], ["right"], R),
    ("3 o\u2019clock", ["right"], R),
    ("2 o'clock", ["right"], R),
    ("four o clock", ["right"], R),
    ("5 o'clock", ["bottom"], B),
    ("six o'clock", ["bottom"], B),
    ("7 oclock", ["bottom"], B),
    ("8 o'clock", ["left"], L),
    ("nine o'clock", ["left"], L),
    ("10 o'clock", ["left"], L),
    ("ten o'clock guy", ["left"], L),
    ("3 o'clock and 6 o'clock", ["right", "bottom"], [3]),
    ("3 o'clock and 9 o'clock", [], ALL),
    # --- numbers without o'clock -------------------------------------------------------------
    ("2 men", [], ALL),
    ("three dogs", [], ALL),
    ("left 3", ["left"], L),
    ("at 3:00", [], ALL),
    ("13 o'clock", [], ALL),
    ("0 o'clock", [], ALL),
    ("the clock on the wall", [], ALL),
    ("o'clock", [], ALL),
    ("3 o", [], ALL),
    # --- adverbial "right" -------------------------------------------------------------------
    ("guy right next to girl", [], ALL),
    ("dog right behind the man", [], ALL),
    ("the car right in front", [], ALL),
    ("cup right infront of plate", [], ALL),
    ("chair right beside the table", [], ALL),
    ("bike right by the door", [], ALL),
    ("the one right there", [], ALL),
    ("all right", [], ALL),
    ("right next to the dog", [], ALL),
    ("man right in the middle", [], ALL),
    ("the vase right in the center of the table", [], ALL),
    ("the one on the right in the middle", ["right"], R),
    # "right" as a noun/direction stays positional even before those words
    ("guy on right next to girl", ["right"], R),
    ("the one on the right behind the table", ["right"], R),
    ("top right by the window", ["right", "top"], [1]),
    ("far right there", ["right"], R),
    ("man to the right in front of the car", ["right"], R),
    ("right guy", ["right"], R),
    ("right side of the bench", ["right"], R),
    ("second from right", ["right"], R),
    ("rightmost next to the wall", ["right"], R),
    ("bottom-right next to the lamp", ["right", "bottom"], [3]),
    ("guy right next to the girl on the left", ["left"], L),
    # a left/right form before "right" is no noun context: "left right" names no place
    ("guy on the left right next to the girl", ["left"], L),
    ("the leftmost right behind the table", ["left"], L),
    ("the left guy right behind the table", ["left"], L),
    # --- negation: a negated word counts as its opposite on the 2x2 mosaic -------------------
    ("guy not on the left", ["right"], R),
    ("woman that isnt on the left", ["right"], R),
    (["woman", "that", "isn't", "on", "the", "left"], ["right"], R),
    (["woman", "that", "is", "n't", "on", "the", "left"], ["right"], R),
    ("the man who is not on the right", ["left"], L),
    ("not the leftmost one", ["right"], R),
    ("cake not on the top shelf", ["bottom"], B),
    ("plate that is never on the bottom", ["top"], T),
    ("not at 3 o'clock", ["left"], L),
    ("the one not on the far left side", ["right"], R),
    ("neither on the left nor on the right", [], ALL),
    ("not on the left but on the right", ["right"], R),
    ("the one on the left not on the right", ["left"], L),
    ("not top row, on the left", ["left", "bottom"], [2]),
    # one negator over both axes: {1, 2, 3} is no intersection of words, so no constraint
    ("the slice not on the top left", [], ALL),
    ("not bottom-right", [], ALL),
    # ... but the other, unnegated words stay
    ("the top cup, not the bottom-right one", ["top"], T),
    # a negator whose scope ends before the word does not negate it
    ("man not wearing a hat on the left", ["left"], L),
    ("dog that is not sleeping on the right", ["right"], R),
    ("no hat guy on left", ["left"], L),
    ("man without a shirt on the right", ["right"], R),
    # a posture verb between negator and word: "(the woman who isn't standing) on the right" or
    # "not (standing on the right)"? Neither is safe, so no constraint
    ("woman not standing on the right", [], ALL),
    ("the guy who is not sitting on the right", [], ALL),
    ("the man not sitting on the left", [], ALL),
    ("the girl that isnt standing on the left", [], ALL),
    ("the chair not being sat in on the right", [], ALL),
    ("car not parked on the left, at the top", ["top"], T),  # the other axis stays
    ("the man sitting on the left", ["left"], L),  # no negator: a plain position
    ("the car not located on the left", ["right"], R),  # "located" only places
    # --- weak readings give way to a strong word on the same axis ------------------------------
    ("the car on the right to the left of the truck", ["right"], R),
    ("a child wearing a orange shirt walking to the left of a kid in black on the right",
     ["right"], R),
    ("bowl on top left to the right of the plate", ["left", "top"], [0]),
    ("cup on top of the box on the left", ["left", "top"], [0]),  # weak "top" alone stays
    ("cup on top of the box at the bottom", ["bottom"], B),
    ("man on left side of the picture to the right of the woman", ["left"], L),
    ("man on left side of bench to the right of the woman", [], ALL),  # both relations
    ("guy on left looking right", ["left"], L),
    ("the elephant on the left facing right", ["left"], L),
    ("giraffe on right turned to the left", ["right"], R),
    ("man on the right holding racket in left hand", ["right"], R),
    ("woman on right with her left arm raised", ["right"], R),
    ("the only donut left on the right", ["right"], R),
    ("last one left in the bottom right", ["right", "bottom"], [3]),
    # ... and speak for their axis only when nothing strong does
    ("car to the left of the truck", ["left"], L),
    ("cup on top of the box", ["top"], T),
    ("guy looking right", ["right"], R),
    ("woman holding bag in left hand", ["left"], L),
    ("the only one left", ["left"], L),
    ("left of the man facing right", [], ALL),  # two weak words disagree
    # strong readings that look like weak ones
    ("top of the picture", ["top"], T),
    ("far left of the photo", ["left"], L),
    ("just right of center", ["right"], R),
    ("the left side of the image, right of the dog", ["left"], L),
    ("left hand side facing right", ["left"], L),
    ("upper right hand corner, holding a cup in his left hand", ["right", "top"], [1]),
    ("the only one on the left holding a cup in his right hand", ["left"], L),
    ("guy walking on the left, looking right", ["left"], L),
    ("guy looking at the man on the right, on the left", [], ALL),  # both strong
]


def _ids():
    return [c[0] if isinstance(c[0], str) else "tokens:" + "|".join(c[0]) for c in CASES]


@pytest.mark.parametrize(("text", "words", "quads"), CASES, ids=_ids())
def test_table(text, words, quads):
    tokens = tokenize(text) if isinstance(text, str) else text
    assert positional_words(tokens) == words
    assert allowed_quadrants(positional_words(tokens)) == quads
    assert quadrants_for_tokens(tokens) == (words, quads)


def test_table_is_big_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("The man on the LEFT.", ["the", "man", "on", "the", "left"]),
        ("man at 3 o'clock!", ["man", "at", "3", "o'clock"]),
        ("3o'clock", ["3o'clock"]),
        ("top-left, not bottom-right", ["top-left", "not", "bottom-right"]),
        ("the man's hat", ["the", "man's", "hat"]),
        ("left--right", ["left", "right"]),
        ("'quoted' -dash- end-", ["quoted", "dash", "end"]),
        ("at 3:00", ["at", "3", "00"]),
        ("o\u2019clock", ["o'clock"]),
        ("a_b", ["a", "b"]),
        ("", []),
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


@pytest.mark.parametrize(
    ("words", "quads"),
    [
        ([], ALL),
        (["left"], L),
        (["right"], R),
        (["top"], T),
        (["bottom"], B),
        (["top", "left"], [0]),
        (["left", "top"], [0]),
        (["top", "right"], [1]),
        (["bottom", "left"], [2]),
        (["bottom", "right"], [3]),
        (["left", "right"], ALL),
        (["top", "bottom"], ALL),
        (["left", "right", "top"], T),  # a conflict on one axis keeps the other axis
        (["top", "bottom", "leftmost"], L),
        (["left", "right", "top", "bottom"], ALL),
        (["left", "left"], L),
        (["upper", "leftmost"], [0]),  # surface forms are accepted too
        (["corner"], ALL),  # non-positional words add no constraint
        (["corner", "bottom"], B),
    ],
)
def test_allowed_quadrants(words, quads):
    assert allowed_quadrants(words) == quads


def test_str_arguments_are_rejected():
    with pytest.raises(TypeError):
        positional_words("left")
    with pytest.raises(TypeError):
        allowed_quadrants("left")
    with pytest.raises(TypeError):
        tokenize(["left"])


def test_word_forms_table():
    assert CANONICAL == ("left", "right", "top", "bottom")
    assert set(WORD_FORMS.values()) == set(CANONICAL)
    expected = {
        "left": {"left", "leftmost", "lefthand"},
        "right": {"right", "rightmost", "righthand"},
        "top": {"top", "upper", "topmost", "high", "higher", "highest", "uppermost"},
        "bottom": {"bottom", "lower", "low", "lowest", "bottommost", "lowermost"},
    }
    for canonical, forms in expected.items():
        assert {k for k, v in WORD_FORMS.items() if v == canonical} == forms
    # The table is documented in the module docstring.
    doc = positional_module.__doc__
    for form in WORD_FORMS:
        assert re.search(rf"\b{form}\b", doc), form


def test_results_are_fresh_lists():
    a = allowed_quadrants([])
    a.append(9)
    assert allowed_quadrants([]) == ALL
    w = positional_words(["left"])
    w.append("x")
    assert positional_words(["left"]) == ["left"]


# --- properties -----------------------------------------------------------------------------

QUADRANTS_OF = {"left": {0, 2}, "right": {1, 3}, "top": {0, 1}, "bottom": {2, 3}}
canonical_words = st.lists(st.sampled_from(CANONICAL), max_size=8)


@given(st.lists(st.sampled_from([*CANONICAL, *WORD_FORMS, "corner", "middle", "x"]), max_size=8))
def test_allowed_quadrants_nonempty_sorted_subset(words):
    q = allowed_quadrants(words)
    assert q
    assert q == sorted(set(q))
    assert set(q) <= {0, 1, 2, 3}


@given(canonical_words, st.sampled_from(CANONICAL))
def test_each_axis_is_settled_on_its_own(words, extra):
    # Oracle: per axis, the intersection of its words' quadrants, all four if that is empty;
    # then the two axes intersected.
    words = [*words, extra]
    expected = set(range(4))
    for axis in (("left", "right"), ("top", "bottom")):
        on_axis = set(range(4))
        for w in words:
            if w in axis:
                on_axis &= QUADRANTS_OF[w]
        expected &= on_axis or set(range(4))
    assert set(allowed_quadrants(words)) == expected


@given(canonical_words)
def test_allowed_quadrants_is_order_and_duplicate_insensitive(words):
    assert allowed_quadrants(words) == allowed_quadrants(sorted(set(words)))


DECOYS = [
    "bright", "upright", "highway", "stop", "laptop", "tabletop", "copyright", "flowers",
    "slower", "below", "above", "under", "front", "back", "corner", "middle", "center",
    "centre", "3", "12", "three", "next", "all", "by", "there", "in",
]  # fmt: skip
_CLOCKISH = re.compile(r"clock|^o$")
non_positional_token = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10),
    st.sampled_from(DECOYS),
).filter(lambda t: t not in WORD_FORMS and not _CLOCKISH.search(t))


@given(st.lists(non_positional_token, max_size=12))
def test_tokens_without_forms_allow_all(tokens):
    assert quadrants_for_tokens(tokens) == ([], [0, 1, 2, 3])


VOCAB = [
    *WORD_FORMS, "far", "hand", "most", "corner", "middle", "the", "man", "on", "of", "and",
    "all", "next", "to", "behind", "in", "front", "infront", "beside", "by", "there",
    "o", "clock", "oclock", "3", "9", "12", "13", "one", "six", "eleven", "3o", "3oclock",
    "bright", "upright", "laptop", "below",
]  # fmt: skip
HYPHEN_APOS_VOCAB = [
    *VOCAB, "o'clock", "3o'clock", "top-left", "bottom-right", "left-hand", "o-clock",
    "3-o'clock", "bottom-most", "far-right", "upper-left", "right-hand", "man's",
]  # fmt: skip
words_sentence = st.lists(st.sampled_from(VOCAB), max_size=12).map(" ".join)


@settings(max_examples=300)
@given(words_sentence, st.sampled_from([" ", "  ", "\t", " \n "]))
def test_tokenize_matches_refer_tokens_without_punctuation(sentence, sep):
    sentence = sep.join(sentence.split(" "))
    refer_tokens = sentence.lower().split()
    assert tokenize(sentence) == refer_tokens
    assert positional_words(tokenize(sentence)) == positional_words(refer_tokens)


@settings(max_examples=300)
@given(st.lists(st.sampled_from(HYPHEN_APOS_VOCAB), max_size=12).map(" ".join))
def test_hyphen_and_apostrophe_splitting_does_not_matter(sentence):
    # REFER may split "o'clock" / "top-left" into pieces; the result must not depend on it.
    split_tokens = re.findall(r"[a-z0-9]+", sentence.lower())
    assert positional_words(tokenize(sentence)) == positional_words(split_tokens)
    assert positional_words(tokenize(sentence.upper())) == positional_words(split_tokens)


@given(st.lists(st.sampled_from(HYPHEN_APOS_VOCAB), max_size=12))
def test_positional_words_canonical_order_and_deterministic(tokens):
    words = positional_words(tokens)
    assert words == [w for w in CANONICAL if w in words]
    assert positional_words(list(tokens)) == words
    assert quadrants_for_tokens(tokens) == (words, allowed_quadrants(words))


# --- negation and weak readings, over every form -------------------------------------------

OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


@pytest.mark.parametrize("form", sorted(WORD_FORMS))
@pytest.mark.parametrize("negator", ["not", "isnt", "isn't", "never"])
def test_a_negated_form_counts_as_its_opposite(form, negator):
    # "the one that is not on the <form>": on a 2x2 mosaic, the other side of that axis.
    canonical = WORD_FORMS[form]
    tokens = ["the", "one", "that", "is", negator, "on", "the", form]
    assert positional_words(tokens) == [OPPOSITE[canonical]]


STRONG = {"left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom"}
WEAK = {  # weak readings of a horizontal word x
    "relation": "to the {x} of the truck",
    "gaze": "looking {x}",
    "turned": "turned to the {x}",
    "body part": "holding a cup in his {x} hand",
    "arm": "with {x} arm raised",
}


@given(st.sampled_from(["left", "right"]), st.sampled_from(["left", "right"]),
       st.sampled_from(sorted(WEAK)), st.booleans(),
       st.sampled_from([None, "top", "bottom"]))
def test_weak_words_never_override_a_strong_one(strong, weak, reading, weak_first, vertical):
    # "the man on the right, looking left" says where the man is (right) and where he looks;
    # the weak word on the same axis must not erase or contradict the strong one, and the
    # other axis keeps its own word.
    parts = ["the man", STRONG[strong], WEAK[reading].format(x=weak)]
    if weak_first:
        parts[1], parts[2] = parts[2], parts[1]
    if vertical:
        parts.append(STRONG[vertical])
    expected = [w for w in CANONICAL if w in (strong, vertical)]
    assert positional_words(tokenize(" ".join(parts))) == expected
