"""stages.text.distractor_answers: token spans of an edit and the same verdicts as
augment_rules.validate, by hand."""

from __future__ import annotations

import pytest

from stages.text.distractor_answers import build_distractor, candidate_reason, diff_span
from stages.text.distractor_rules import Distractor, validate


@pytest.mark.parametrize(("src", "new", "expected"), [
    ("the man in red", "the man in blue", (3, 4, "red->blue")),
    ("man holding umbrella", "man not holding umbrella", (1, 1, "->not")),
    ("man who is not sitting", "man who is sitting", (3, 4, "not->")),
    ("a red shirt", "an orange shirt", (0, 2, "a red->an orange")),
    ("big dog chasing small cat", "small cat chasing big dog",
     (0, 5, "big dog chasing small cat->small cat chasing big dog")),
    ("dog", "cat", (0, 1, "dog->cat")),
    ("left", "left", (1, 1, "->")),
    ("a a", "a a a", (2, 2, "->a")),  # prefix and suffix never overlap
    ("on the left side", "on the left", (3, 4, "side->")),
])
def test_diff_span(src: str, new: str, expected: tuple[int, int, str]) -> None:
    start, end, slot = diff_span(src.split(), new.split())
    assert (start, end, slot) == expected
    before, after = slot.split("->")
    s, d = src.split(), new.split()
    assert s[:start] + after.split() + s[end:] == d and before.split() == s[start:end]


def test_build_distractor_spans_and_validation() -> None:
    src = "the man in red shirt on left"
    ok = build_distractor("swap_color", src, "The man in BLUE shirt on left.")
    assert ok == Distractor("swap_color", "the man in blue shirt on left", "red->blue", (3, 4))
    assert validate(src, ok) is None and candidate_reason(src, ok) is None
    # two real edits: the span is the first one, validate sees the second outside it
    two = build_distractor("swap_color", src, "the man in green shirt on right")
    assert two.span == (3, 4) and validate(src, two) == "edit outside slot"
    # agreement is part of one edit; role reversal swaps two phrases
    count = build_distractor("swap_count", "two little girls on left", "one little girl on left")
    assert count.span == (0, 3) and validate("two little girls on left", count) is None
    rr = build_distractor("role_reversal", "big dog chasing small cat", "small cat chasing big dog")
    assert validate("big dog chasing small cat", rr) is None
    # passes validate but edits no colour: not a colour swap
    men = build_distractor("swap_color", "man holding a red umbrella",
                           "men holding a red umbrella")
    assert validate("man holding a red umbrella", men) is None
    assert candidate_reason("man holding a red umbrella", men) == "not a swap_color edit"
    neg = build_distractor("negation", "woman with a hat", "woman without a hat")
    assert candidate_reason("woman with a hat", neg) is None



@pytest.mark.parametrize(("src", "new", "reason"), [
    ("man behind the car", "man beside the car", None),  # relations on both sides
    ("the high shelf", "the low shelf", None),  # position forms
    ("the central table", "the left table", None),
    ("the man on the left side", "the man on the right side", None),
    ("man behind the car", "men behind the car", "not a swap_spatial edit"),
    ("the red car on left", "the blue car on left", "not a swap_spatial edit"),
])
def test_spatial_swaps_need_a_position_word_replaced_and_inserted(src, new, reason):
    """Every word the lexicon says is about position (forms, relations, distances) counts,
    so 'high' -> 'low' or 'behind' -> 'beside' is a spatial swap; a number or colour edit
    labelled swap_spatial is not."""
    d = build_distractor("swap_spatial", src, new)
    assert validate(src, d) is None
    assert candidate_reason(src, d) == reason


@pytest.mark.parametrize(("src", "new", "reason"), [
    # synonyms name the same direction: no swap
    ("left man", "leftmost man", "not a swap_spatial edit"),
    ("man under the umbrella", "man beneath the umbrella", "not a swap_spatial edit"),
    ("man under the umbrella", "man underneath the umbrella", "not a swap_spatial edit"),
    ("top shelf", "upper shelf", "not a swap_spatial edit"),
    ("lower left corner", "bottom left corner", "not a swap_spatial edit"),
    ("man closest to camera", "man nearest to camera", "not a swap_spatial edit"),
    ("man behind the car", "man in back of the car", "not a swap_spatial edit"),
    # opposites do
    ("left man", "right man", None),
    ("man under the umbrella", "man above the umbrella", None),
    ("top shelf", "bottom shelf", None),
    ("man closest to camera", "man farthest from camera", None),
    ("man behind the car", "man in front of the car", None),
    # and none inside a negation's scope
    ("the one not on the left", "the one not on the right", "under negation"),
    ("the girl that isn't on the left", "the girl that isn't on the right", "under negation"),
    ("woman not standing on the right", "woman not standing on the left", "under negation"),
    # outside it, after the negated predicate, a swap is a negative
    ("man not wearing a hat on the left", "man not wearing a hat on the right", None),
    # a swap may not contradict the rest of the sentence
    ("the left man not the right man", "the right man not the right man",
     "self-contradiction"),
    ("the left man not the rightmost man", "the right man not the rightmost man",
     "self-contradiction"),
])
def test_spatial_swaps_must_change_the_direction(src, new, reason):
    d = build_distractor("swap_spatial", src, new)
    assert candidate_reason(src, d) == reason


@pytest.mark.parametrize(("src", "new", "reason"), [
    # the same polarity in other words: no negation
    ("man without hat", "man with no hat", "not a negation edit"),
    ("woman with no shoes", "woman without shoes", "not a negation edit"),
    ("man who is not smiling", "man who isnt smiling", "not a negation edit"),
    # one negation added or removed
    ("man without hat", "man with hat", None),
    ("man who is smiling", "man who isnt smiling", None),
    ("man who is not smiling", "man who is smiling", None),
    # apostrophes spell the same words: "isn't" is "isnt", "doesn't" is "doesnt"
    ("man who is not smiling", "man who isn't smiling", "not a negation edit"),
    ("man who is not smiling", "man who isn\u2019t smiling", "not a negation edit"),
    ("the dog that is not sleeping", "the dog that isn't sleeping", "not a negation edit"),
    ("man who does not wear a hat", "man who doesn't wear a hat", "not a negation edit"),
    ("man who isnt smiling", "man who isn't smiling", "not a negation edit"),
    ("man who is smiling", "man who isn't smiling", None),
    # added to a clause that already holds one
    ("man who isnt wearing a hat", "man who isnt not wearing a hat", "double negation"),
    ("man who doesn't have a hat", "man who doesn't do not have a hat", "double negation"),
    # ... but a coordinated predicate is negated on its own
    ("a man who is not sitting and not wearing a hat",
     "a man who is sitting and not wearing a hat", None),
    ("a man sitting down and not wearing a shirt",
     "a man not sitting down and not wearing a shirt", None),
    # "no" before a number is "number"
    ("player no 5 in red", "player no 5 not in red", None),
])
def test_negations_must_flip_the_polarity(src, new, reason):
    d = build_distractor("negation", src, new)
    assert candidate_reason(src, d) == reason
