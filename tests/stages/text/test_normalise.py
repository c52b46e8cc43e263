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
    ("a\tb\nc", "a b c"),
])
def test_equal_after_normalising(a: str, b: str) -> None:
    assert normalise_sentence(a) == normalise_sentence(b)


@pytest.mark.parametrize(("a", "b"), [
    ("left", "right"),
    ("man on left", "man on the left"),
    ("2 dogs", "two dogs"),
    ("red car", "redcar"),
])
def test_different_texts_stay_different(a: str, b: str) -> None:
    assert normalise_sentence(a) != normalise_sentence(b)


def test_exact_form() -> None:
    assert normalise_sentence("  The man's  LEFT arm, please! ") == "the mans left arm please"
    assert normalise_sentence("...") == ""
