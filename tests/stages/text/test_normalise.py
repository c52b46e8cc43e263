"""The normal form that decides whether a negative equals a positive (hand-written cases)."""

import pytest

from stages.text.normalise import normalise_sentence


@pytest.mark.parametrize(("a", "b"), [
    ("left", "Left."),
    ("the man on the left", "  The   man on the LEFT  "),
    ("man's hat", "mans hat"),
    ("guy in red, left", "guy in red left"),
    ("“left” one", "left one"),
    ("ｌｅｆｔ", "left"),
    ("man — on the right", "man on the right"),
    ("x\ty\nz", "x y z"),
    # invisible format characters (Cf): zero-width space, soft hyphen, BOM, word joiner
    ("woman on the left\u200b", "woman on the left"),
    ("woman on the l\u00adeft", "woman on the left"),
    ("\ufeffwoman on the left", "woman on the left"),
    ("wo\u2060man", "woman"),
    # case folding beyond lower(): German sharp s, Greek final sigma
    ("STRASSE sign", "straße sign"),
    ("ΣΟΦΟΣ", "σοφος"),
    # articles name no other object
    ("man on left", "man on the left"),
    ("a woman on the left", "woman on left"),
    ("An apple", "apple"),
])
def test_equal_after_normalising(a: str, b: str) -> None:
    assert normalise_sentence(a) == normalise_sentence(b)


@pytest.mark.parametrize(("a", "b"), [
    ("left", "right"),
    ("2 dogs", "two dogs"),
    ("theater", "ater"),  # only whole words are articles
    ("man on left", "man on right"),
    ("red car", "redcar"),
])
def test_different_texts_stay_different(a: str, b: str) -> None:
    assert normalise_sentence(a) != normalise_sentence(b)


def test_exact_form() -> None:
    assert normalise_sentence("  The man's  LEFT arm, please! ") == "mans left arm please"
    assert normalise_sentence("...") == ""
    assert normalise_sentence("the a an") == ""
    assert normalise_sentence("zebra\u200b \u200b left") == "zebra left"
