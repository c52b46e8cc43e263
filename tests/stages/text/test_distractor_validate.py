"""stages.text.distractor_rules: validation, the geometry rule, generate_validated, head_noun.

Hand-made bad and good distractors with the reason each must get, scenes whose boxes decide the
geometry rule by hand, and a table of head nouns written from the rule in stages.text.phrases.
(The kinds' own tables are in test_distractor_rules.py.)
"""

from __future__ import annotations

import pytest

from stages.text.distractor_rules import (
    Distractor,
    Rejection,
    SceneContext,
    generate_validated,
    head_noun,
    validate,
)

# --------------------------------------------------------------------------------------------
# validate: hand-made bad distractors
# --------------------------------------------------------------------------------------------

BAD_CASES: list[tuple[str, Distractor, str]] = [
    ("man in red", Distractor("swap_color", "man in red", "red->red", (2, 3)), "identical"),
    ("man in red", Distractor("swap_color", "", "man in red->", (0, 3)), "empty"),
    ("man in red", Distractor("swap_color", "   ", "man in red->", (0, 3)), "empty"),
    ("man in red", Distractor("swap_color", "woman in red", "man->woman", (0, 1)),
     "head noun changed"),
    ("dog on the couch", Distractor("negation", "cat not on the couch", "dog on->cat not on",
                                    (0, 2)), "head noun changed"),
    ("man in red shirt", Distractor("swap_color", "boy in blue shirt", "red->blue", (2, 3)),
     "edit outside slot"),
    ("man in red shirt", Distractor("swap_color", "man in blue shirt", "green->blue", (2, 3)),
     "edit outside slot"),
    ("man in red shirt", Distractor("swap_color", "man in blue shirt", "red->blue", (1, 2)),
     "edit outside slot"),
    ("man in red shirt", Distractor("swap_color", "man in blue shirt", "red->blue", (2, 9)),
     "edit outside slot"),
    ("man on left", Distractor("swap_spatial", "man on right side", "left->right", (2, 3)),
     "edit outside slot"),
    ("man holding an umbrella",
     Distractor("negation", "man not holding a umbrella", "holding->not holding", (1, 2)),
     "edit outside slot"),
    ("the cat chasing the dog",
     Distractor("role_reversal", "the cat chasing the mouse", "dog->mouse", (4, 5)),
     "head noun not swapped"),
    ("the cat chasing the dog",
     Distractor("role_reversal", "the cat chased by the dog", "chasing->chased by", (2, 3)),
     "head noun not swapped"),
    ("man in gray", Distractor("swap_color", "man in grey", "gray->grey", (2, 3)), "synonym"),
    ("tan dog", Distractor("swap_color", "beige dog", "tan->beige", (0, 1)), "synonym"),
    ("two dogs", Distractor("swap_count", "2 dogs", "two->2", (0, 1)), "synonym"),
    ("two dogs", Distractor("swap_count", "one dogs", "two->one", (0, 1)), "number agreement"),
    ("one person", Distractor("swap_count", "two person", "one->two", (0, 1)),
     "number agreement"),
    ("3 cats", Distractor("swap_count", "1 cats", "3->1", (0, 1)), "number agreement"),
    ("man in red", Distractor("swap_shape", "man in blue", "red->blue", (2, 3)), "unknown kind"),
    # a swap inside a negation's scope stays true of the target, in the source or the result
    ("man without red hat", Distractor("swap_color", "man without blue hat", "red->blue", (2, 3)),
     "under negation"),
    ("shirt that isnt blue", Distractor("swap_color", "shirt that isnt red", "blue->red", (3, 4)),
     "under negation"),
    ("the one not on the left",
     Distractor("swap_spatial", "the one not on the right", "left->right", (5, 6)),
     "under negation"),
    ("man in red", Distractor("swap_color", "man not in blue", "in red->not in blue", (1, 3)),
     "under negation"),
    ("man not holding two cups",
     Distractor("swap_count", "man not holding three cups", "two->three", (3, 4)),
     "under negation"),
    # a negation added to, or removed from, a clause that holds another one
    ("man who isnt wearing a hat",
     Distractor("negation", "man who isnt not wearing a hat", "->not", (3, 3)),
     "double negation"),
    ("man wearing no shirt",
     Distractor("negation", "man not wearing no shirt", "wearing->not wearing", (1, 2)),
     "double negation"),
    ("man who doesn't have a hat",
     Distractor("negation", "man who doesn't do not have a hat", "have->do not have", (3, 4)),
     "double negation"),
    ("a plate with no food on it",
     Distractor("negation", "a plate with no food not on it", "on->not on", (5, 6)),
     "double negation"),
    # apostrophes spell the same negation words
    ("girl whose shirt isn't red",
     Distractor("swap_color", "girl whose shirt isn't beige", "red->beige", (4, 5)),
     "under negation"),
    ("girl whose shirt isn\u2019t red",
     Distractor("swap_color", "girl whose shirt isn\u2019t beige", "red->beige", (4, 5)),
     "under negation"),
    # a posture verb: "not (sitting on the left)" may be meant
    ("dog not sitting on the left",
     Distractor("swap_spatial", "dog not sitting on the right", "left->right", (5, 6)),
     "under negation"),
    # a swap whose new word the sentence denies elsewhere
    ("the left man not the right man",
     Distractor("swap_spatial", "the right man not the right man", "left->right", (1, 2)),
     "self-contradiction"),
    ("the red car not the blue car",
     Distractor("swap_color", "the blue car not the blue car", "red->blue", (1, 2)),
     "self-contradiction"),
]


@pytest.mark.parametrize(("source", "d", "reason"), BAD_CASES)
def test_validate_rejects_bad_distractors(source: str, d: Distractor, reason: str) -> None:
    assert validate(source, d) == reason


GOOD_HAND_MADE: list[tuple[str, Distractor]] = [
    ("man in red", Distractor("swap_color", "man in blue", "red->blue", (2, 3))),
    ("one person on left", Distractor("swap_count", "two people on left",
                                      "one person->two people", (0, 2))),
    ("two sheep", Distractor("swap_count", "one sheep", "two->one", (0, 1))),
    # an inserted "not" at the span boundary is inside the +-1 allowance
    ("man holding an umbrella", Distractor("negation", "man not holding an umbrella",
                                           "holding->not holding", (1, 2))),
    ("man holding an umbrella", Distractor("negation", "man not holding an umbrella",
                                           "->not", (1, 1))),
    # outside the negation's scope: another noun phrase, another clause
    ("man with no shirt in blue shorts",
     Distractor("swap_color", "man with no shirt in red shorts", "blue->red", (5, 6))),
    ("man on the left who is not smiling",
     Distractor("swap_spatial", "man on the right who is not smiling", "left->right", (3, 4))),
    ("man on the left who is not smiling",
     Distractor("negation", "man not on the left who is not smiling", "on->not on", (1, 2))),
    # a verbal negation ends with its predicate
    ("man not wearing a hat on the left",
     Distractor("swap_spatial", "man not wearing a hat on the right", "left->right", (7, 8))),
    ("girl not smiling in pink",
     Distractor("swap_color", "girl not smiling in blue", "pink->blue", (4, 5))),
    ("a man who is not wearing a hat standing next to a red car",
     Distractor("swap_color", "a man who is not wearing a hat standing next to a green car",
                "red->green", (12, 13))),
    ("a man who is not sitting and not wearing a hat",
     Distractor("negation", "a man who is sitting and not wearing a hat", "not->", (4, 5))),
    ("the dog that is awake and not sleeping",
     Distractor("negation", "the dog that is not awake and not sleeping", "is->is not",
                (3, 4))),
    # "no" before a number is "number", no negation
    ("player no 5 in red", Distractor("swap_color", "player no 5 in blue", "red->blue", (4, 5))),
    ("jersey no 10 on left",
     Distractor("swap_spatial", "jersey no 10 on right", "left->right", (4, 5))),
]


@pytest.mark.parametrize(("source", "d"), GOOD_HAND_MADE)
def test_validate_accepts_good_hand_made(source: str, d: Distractor) -> None:
    assert validate(source, d) is None


# --------------------------------------------------------------------------------------------
# Geometry: "describes another instance"
# --------------------------------------------------------------------------------------------

IMG = (600, 400)
LEFT_MAN = (50.0, 100.0, 80.0, 200.0)  # centre x = 90
RIGHT_MAN = (450.0, 100.0, 80.0, 200.0)  # centre x = 490


def test_geometry_rejects_swap_true_of_the_other_instance() -> None:
    ctx = SceneContext(target_box=LEFT_MAN, same_class_boxes=[RIGHT_MAN], image_size=IMG)
    d = Distractor("swap_spatial", "man on right", "left->right", (2, 3))
    assert validate("man on left", d, ctx) == "describes another instance"
    kept, rejected = generate_validated("man on left", ("swap_spatial",), context=ctx)
    assert kept == []
    assert rejected == [Rejection("swap_spatial", "man on right", "describes another instance")]


def test_geometry_accepts_single_instance() -> None:
    ctx = SceneContext(target_box=LEFT_MAN, same_class_boxes=[], image_size=IMG)
    d = Distractor("swap_spatial", "man on right", "left->right", (2, 3))
    assert validate("man on left", d, ctx) is None
    kept, rejected = generate_validated("man on left", ("swap_spatial",), context=ctx)
    assert [k.text for k in kept] == ["man on right"] and rejected == []


def test_geometry_target_on_right() -> None:
    ctx = SceneContext(target_box=RIGHT_MAN, same_class_boxes=[LEFT_MAN], image_size=IMG)
    d = Distractor("swap_spatial", "man on left", "right->left", (2, 3))
    assert validate("man on right", d, ctx) == "describes another instance"


def test_geometry_other_instance_not_matching_is_accepted() -> None:
    # target top-left pizza; the other pizza is top-right (a bit higher).
    target = (20.0, 40.0, 100.0, 100.0)  # centre (70, 90)
    other = (450.0, 30.0, 100.0, 100.0)  # centre (500, 80)
    ctx = SceneContext(target_box=target, same_class_boxes=[other], image_size=IMG)
    kept, rejected = generate_validated("top left pizza", ("swap_spatial",), context=ctx)
    # "bottom left pizza": the other pizza is neither bottom nor left -> a true negative
    assert [k.text for k in kept] == ["bottom left pizza"]
    # "top right pizza" is exactly the other pizza
    assert rejected == [Rejection("swap_spatial", "top right pizza",
                                  "describes another instance")]


def test_geometry_reads_a_negated_position_as_not_that_side() -> None:
    """"bottom man not on the left" was tested as "bottom right man" (the 2x2 reading of "not
    left"): a man at the bottom middle, neither rightmost nor in the right third, passed, yet
    the text is true of him."""
    img = (900, 900)
    target = (150.0, 50.0, 100.0, 100.0)  # centre (200, 100): top left
    bottom_middle = (400.0, 750.0, 100.0, 100.0)  # centre (450, 800): bottom, not left
    top_right = (800.0, 50.0, 100.0, 100.0)  # centre (850, 100)
    d = Distractor("swap_spatial", "bottom man not on the left", "top->bottom", (0, 1))
    ctx = SceneContext(target_box=target, same_class_boxes=[bottom_middle, top_right],
                       image_size=img)
    assert validate("top man not on the left", d, ctx) == "describes another instance"
    bottom_left = (50.0, 750.0, 100.0, 100.0)  # centre (100, 800): bottom but on the left
    ctx = SceneContext(target_box=target, same_class_boxes=[bottom_left, top_right],
                       image_size=img)
    assert validate("top man not on the left", d, ctx) is None


def test_geometry_thirds_rule() -> None:
    # three men; the target is the leftmost, one man stands in the right third but is not the
    # rightmost... the rightmost is also another man, so "right" is true of someone else.
    target = (10.0, 100.0, 40.0, 100.0)
    middle = (250.0, 100.0, 40.0, 100.0)
    ctx = SceneContext(target_box=target, same_class_boxes=[middle], image_size=IMG)
    d = Distractor("swap_spatial", "man on right", "left->right", (2, 3))
    assert validate("man on left", d, ctx) == "describes another instance"  # extreme rule
    # vertical: the other man is level with the target, not in the bottom third, and both
    # share the extreme y (a tie counts as extreme for both) -> "bottom" holds for him too.
    d2 = Distractor("swap_spatial", "man on bottom", "top->bottom", (2, 3))
    assert validate("man on top", d2, ctx) == "describes another instance"
    # other man clearly higher and in the top third: "bottom" is not true of him
    high = (250.0, 10.0, 40.0, 60.0)  # centre y = 40 < 400/3
    ctx2 = SceneContext(target_box=(10.0, 250.0, 40.0, 100.0), same_class_boxes=[high],
                        image_size=IMG)
    assert validate("man on top", d2, ctx2) is None
    # ... but "top" family words are true of him
    d3 = Distractor("swap_spatial", "man on top", "bottom->top", (2, 3))
    assert validate("man on bottom", d3, ctx2) == "describes another instance"


def test_geometry_ignores_relational_words_and_other_kinds() -> None:
    ctx = SceneContext(target_box=LEFT_MAN, same_class_boxes=[RIGHT_MAN], image_size=IMG)
    d = Distractor("swap_spatial", "man behind the car", "in front of->behind", (1, 4))
    assert validate("man in front of the car", d, ctx) is None
    d2 = Distractor("negation", "man not on left", "on->not on", (1, 2))
    assert validate("man on left", d2, ctx) is None


def test_generate_validated_uses_spares() -> None:
    # target top-left pizza, the other pizza is bottom-left (a little to the right of it).
    target = (20.0, 40.0, 100.0, 100.0)  # centre (70, 90)
    other = (50.0, 250.0, 100.0, 100.0)  # centre (100, 300)
    ctx = SceneContext(target_box=target, same_class_boxes=[other], image_size=IMG)
    kept, rejected = generate_validated("top left pizza", ("swap_spatial",), per_kind=1,
                                        context=ctx)
    # "bottom left pizza" is the other pizza -> rejected; the spare "top right pizza" is not
    # true of it (it is the rightmost but not at the top) -> kept to fill the quota of 1.
    assert rejected == [Rejection("swap_spatial", "bottom left pizza",
                                  "describes another instance")]
    assert [k.text for k in kept] == ["top right pizza"]


# --------------------------------------------------------------------------------------------
# head_noun
# --------------------------------------------------------------------------------------------

HEAD_CASES: list[tuple[str, str | None]] = [
    ("man in red shirt on left", "man"),
    ("the cat chasing the dog", "cat"),
    ("second bottle from right", "bottle"),
    ("woman holding an umbrella", "woman"),
    ("two people on the left", "people"),
    ("guy", "guy"),
    ("left", None),
    ("man left", "man"),
    ("blue shirt guy", "guy"),
    ("picture of a dog", "picture"),
    ("the baby elephant", "elephant"),
    ("tv on the left", "tv"),
    ("skateboarder in air", "skateboarder"),
    ("kid in striped shirt", "kid"),
    ("white car parked", "car"),
    ("light pole", "pole"),
    ("traffic light", "light"),
    ("the one on the right", "one"),
    ("right one", "one"),
    ("umpire behind catcher", "umpire"),
    ("man and woman", "man"),
    ("lady sitting down", "lady"),
    ("hot dog", "dog"),
    ("zebra facing left", "zebra"),
    ("giraffe eating leaves", "giraffe"),
    ("second from right", None),
    ("bottom right corner", "corner"),
    ("dog wearing a collar", "dog"),
    ("the white building", "building"),
    ("a painting on the wall", "painting"),
    ("black and white dog", "dog"),
    ("far right person", "person"),
    ("closest elephant", "elephant"),
    ("frisbee", "frisbee"),
    ("the red", None),
    ("teddy bear on the right", "bear"),
    ("elephant that is the biggest", "elephant"),
    ("kitchen dining table", "table"),
    ("man who is sitting", "man"),
    ("dog holds frisbee", "dog"),
    ("men hold umbrellas", "men"),
    ("orange on the left", "orange"),
    ("orange cat", "cat"),
    ("person cut off", "person"),
    ("sandwich half on right", "sandwich"),
    ("car that has a dent", "car"),
    ("man not holding an umbrella", "man"),
    ("on the left", None),
    ("the near one", "one"),  # "near" after a determiner is an adjective
    ("man nearest the camera", "man"),  # a superlative of distance as a preposition
    ("dog closest car", "dog"),
    ("the closest two people", "people"),
    ("the non smiling man", "man"),
]


@pytest.mark.parametrize(("phrase", "expected"), HEAD_CASES)
def test_head_noun_table(phrase: str, expected: str | None) -> None:
    assert head_noun(phrase.split()) == expected


def test_head_noun_table_size_and_case() -> None:
    assert len(HEAD_CASES) >= 30
    assert head_noun(["Man", "IN", "Red"]) == "man"
    assert head_noun([]) is None
