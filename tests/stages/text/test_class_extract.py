"""stages.text.class_extract: COCO category of a referring expression's head noun.

Expected ids are literal COCO ids written by hand (1 person, 17 cat, 58 hot dog, ...), not
computed with the module; the decisions behind the debatable ones are in the module docstring.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pytest

from stages.text.class_extract import (
    COCO_CATEGORIES,
    SYNONYMS,
    candidate_nouns,
    embedding_fallback,
    extract_class,
)

CASES: list[tuple[str, int | None]] = [
    # the brief's examples
    ("guy in red on left", 1),
    ("second bottle from right", 44),
    ("kitty on the couch", 17),
    ("a white laptop computer", 73),
    ("woman holding umbrella", 1),
    ("man holding umbrella", 1),
    ("umbrella held by man", 28),
    ("dog next to the cat", 18),
    ("right one", None),
    ("second one from left", None),
    ("kitty", 17),
    ("tv screen", 72),
    ("cell phone", 77),
    ("hot dog", 58),
    ("teddy bear", 88),
    ("stop sign", 13),
    # synonyms
    ("lady in pink", 1),
    ("little boy on skateboard", 1),
    ("batter", 1),
    ("catcher crouching", 1),
    ("umpire behind catcher", 1),
    ("baby in high chair", 1),
    ("puppy sleeping", 18),
    ("pony", 19),
    ("baby calf", 21),
    ("big bull", 21),
    ("lamb on right", 20),
    ("bike on the right", 2),
    ("red motorbike", 4),
    ("jet on the runway", 5),
    ("pickup", 8),
    ("sailboat", 9),
    ("sofa", 63),
    ("television on the wall", 72),
    ("computer monitor on left", 72),
    ("mug", 47),
    ("purse on her lap", 31),
    ("fridge", 82),
    ("desk with papers", 67),
    # plurals and inflections
    ("kittens", 17),
    ("men", 1),
    ("two women", 1),
    ("people in the back", 1),
    ("knives", 49),
    ("skis", 35),
    ("hot dogs on the plate", 58),
    ("teddy bears", 88),
    ("wine glasses", 46),
    ("the scissors", 87),
    # multi-word categories: never their parts
    ("traffic light", 10),
    ("fire hydrant", 11),
    ("parking meter", 14),
    ("baseball bat", 39),
    ("baseball glove", 40),
    ("tennis racket", 43),
    ("wine glass", 46),
    ("potted plant", 64),
    ("dining table", 67),
    ("sports ball", 37),
    ("hair drier", 89),
    ("hair dryer on the counter", 89),
    ("polar bear", 23),
    # head-noun selection
    ("plate of pizza", 59),  # plate is not a COCO class: the food is
    ("glass of wine", 46),
    ("glass of water", 47),  # a drinking glass is a COCO cup
    ("cup of coffee", 47),
    ("bowl of oranges", 51),
    ("bunch of bananas", 52),
    ("one of the kids", 1),
    ("side of the bus", 6),
    ("left of the man", None),  # beside the man, not the man
    ("the leftmost of the two umbrellas to the left of a red bowl", 28),
    ("the rightmost of the two people next to a black bowl", 1),
    ("orange one", None),  # a colour before the pro-form "one", not the fruit
    ("zebra butt", 24),
    ("giraffe head on left", 25),
    ("pizza box", 59),
    ("laptop screen", 73),
    ("coffee table", 67),
    ("orange on left", 55),
    ("orange cat", 17),
    ("black and white cat", 17),
    # "and"/"or" between two colours joins colours: "orange" is then a colour, not the fruit
    ("orange and white cat", 17),
    ("an orange and white cat laying", 17),
    ("orange and black dog", 18),
    ("white and orange cat", 17),
    ("brown or orange dog on the left", 18),
    ("orange and white", None),  # colours only: no object named
    ("orange and apple", 55),  # two nouns: the first conjunct, as "man and dog"
    ("pitcher on the mound", 1),
    ("pitcher of water", None),  # a jug of water: neither a person nor a COCO class
    ("the pitcher of beer on the table", None),
    ("pitcher of the baseball team", 1),  # a team's pitcher is the player
    ("the pitcher of the red team on the mound", 1),
    ("sweater on dog", 18),  # the garment's wearer
    ("the red sweater on the dog on the left", 18),
    ("shirt on the left", 1),
    ("standing man on right", 1),
    ("man and dog", 1),
    ("man blue shirt", 1),
    ("red shirt", 1),  # a garment names its wearer
    ("dog in a sweater", 18),
    ("baseball cap", 1),
    ("mans arm", 1),
    ("far left zebra", 24),
    ("elephant closest to camera", 22),
    ("the dog that is sleeping", 18),
    # no COCO class
    ("on the left", None),
    ("bottom left corner", None),
    ("the thing in the middle", None),
    ("baseball field", None),
    ("train tracks", None),
    ("bike rack", None),
    ("picture of a dog", None),
    ("tree on the right", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_extract_class_table(text: str, expected: int | None) -> None:
    assert extract_class(text) == expected


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 60


def test_token_list_input_matches_string() -> None:
    assert extract_class(["second", "bottle", "from", "right"]) == 44
    assert extract_class(["hot", "dog"]) == 58
    assert extract_class(["Man's", "umbrella"]) == 28  # REFER drops the apostrophe: "mans"
    assert extract_class("The Hot-Dog!") == 58


def test_candidate_nouns_order() -> None:
    assert candidate_nouns(["a", "white", "laptop", "computer"]) == ["computer", "laptop"]
    assert candidate_nouns(["man", "holding", "umbrella"]) == ["man"]
    assert candidate_nouns(["umbrella", "held", "by", "man"]) == ["umbrella"]
    assert candidate_nouns(["plate", "of", "pizza"]) == ["plate", "pizza"]
    assert candidate_nouns(["hot", "dogs", "on", "plate"]) == ["hot dog"]
    assert candidate_nouns(["kittens"]) == ["kitten"]
    assert candidate_nouns(["right", "one"]) == []
    assert candidate_nouns(["second", "one", "from", "left"]) == []
    assert candidate_nouns("the giraffe head") == ["head", "giraffe"]
    assert candidate_nouns("orange and white cat") == ["cat"]
    assert candidate_nouns("sweater on dog") == ["sweater", "dog"]
    assert candidate_nouns("man on dog") == ["man"]  # "on" continues after a garment only


def test_colour_joining_is_the_rule_head_noun_uses() -> None:
    # one rule for "orange and white cat", shared with stages.text.phrases (not a copy)
    from stages.text import class_extract, phrases

    assert class_extract.joins_colours is phrases.joins_colours
    for text in ("orange and white cat", "orange and black dog", "white and orange cat"):
        assert phrases.head_noun(text.split()) == candidate_nouns(text)[0]


def test_coco_categories_are_the_real_80() -> None:
    assert len(COCO_CATEGORIES) == 80
    assert len(set(COCO_CATEGORIES.values())) == 80
    spot = {1: "person", 2: "bicycle", 3: "car", 13: "stop sign", 44: "bottle",
            46: "wine glass", 47: "cup", 62: "chair", 63: "couch", 64: "potted plant",
            67: "dining table", 72: "tv", 73: "laptop", 88: "teddy bear", 89: "hair drier",
            90: "toothbrush"}
    for cid, name in spot.items():
        assert COCO_CATEGORIES[cid] == name
    for missing in (0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91):
        assert missing not in COCO_CATEGORIES
    assert min(COCO_CATEGORIES) == 1 and max(COCO_CATEGORIES) == 90


def test_every_category_name_maps_to_itself() -> None:
    for cid, name in COCO_CATEGORIES.items():
        assert extract_class(name) == cid, name
        assert extract_class(f"the {name} on the left") == cid, name


def test_every_synonym_key_is_reachable() -> None:
    """A key shadowed by the head heuristic (a boundary or non-head word) would be dead."""
    assert all(cid in COCO_CATEGORIES for cid in SYNONYMS.values())
    for key, cid in SYNONYMS.items():
        assert extract_class(key) == cid, key


def _recording(answer: int | None) -> tuple[Callable[[str], int | None], list[str]]:
    calls: list[str] = []

    def fallback(noun: str) -> int | None:
        calls.append(noun)
        return answer

    return fallback, calls


def test_fallback_only_when_table_fails() -> None:
    fallback, calls = _recording(62)
    assert extract_class("kitty on the couch", fallback) == 17
    assert extract_class("red shirt", fallback) == 1
    assert calls == []
    assert extract_class("a blue crate on the left", fallback) == 62
    assert calls == ["crate"]


def test_fallback_gets_the_head_noun() -> None:
    fallback, calls = _recording(None)
    assert extract_class("plate of food", fallback) is None
    assert extract_class("baseball field", fallback) is None
    assert extract_class("door handle", fallback) is None  # all transparent: the rightmost
    assert calls == ["food", "field", "handle"]


def test_fallback_not_called_without_a_head() -> None:
    fallback, calls = _recording(1)
    assert extract_class("right one", fallback) is None
    assert extract_class("second one from left", fallback) is None
    assert calls == []


def test_fallback_must_return_a_coco_id() -> None:
    fallback, _ = _recording(12)  # a gap in COCO's ids
    with pytest.raises(ValueError, match="not a COCO category"):
        extract_class("a blue crate", fallback)


DIM = 4096


def trigram_encoder(calls: list[list[str]] | None = None) -> Callable[[list[str]], np.ndarray]:
    """Deterministic stand-in for CLIP: L2-normalised bag of character trigrams."""

    def encode(texts: list[str]) -> np.ndarray:
        if calls is not None:
            calls.append(list(texts))
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            padded = f"#{text}#"
            for j in range(len(padded) - 2):
                out[i, zlib.crc32(padded[j:j + 3].encode()) % DIM] += 1.0
            out[i] /= np.linalg.norm(out[i])
        return out

    return encode


def test_embedding_fallback_exact_names_map_to_themselves() -> None:
    fallback = embedding_fallback(trigram_encoder())
    for cid, name in COCO_CATEGORIES.items():
        assert fallback(name) == cid, name


def test_embedding_fallback_threshold() -> None:
    # "dogg" shares #do, dog with "dog": cosine 2 / sqrt(4 * 3) = 0.577
    assert embedding_fallback(trigram_encoder(), min_cosine=0.5)("dogg") == 18
    assert embedding_fallback(trigram_encoder(), min_cosine=0.6)("dogg") is None
    assert embedding_fallback(trigram_encoder())("xyzzy") is None  # nothing shared: cosine 0
    assert embedding_fallback(trigram_encoder())("") is None


def test_embedding_fallback_encodes_names_once_and_memoises() -> None:
    calls: list[list[str]] = []
    fallback = embedding_fallback(trigram_encoder(calls))
    assert len(calls) == 1 and len(calls[0]) == 80 and calls[0][0] == "person"
    fallback("dogg")
    fallback("dogg")
    assert calls[1:] == [["dogg"]]


def test_embedding_fallback_in_extract_class() -> None:
    fallback = embedding_fallback(trigram_encoder())
    assert extract_class("a brown dogg on the left", fallback) == 18  # typo, OOV noun
    assert extract_class("tree on the right", fallback) is None
    assert extract_class("kitty", fallback) == 17


def test_embedding_fallback_validates() -> None:
    with pytest.raises(ValueError, match="min_cosine"):
        embedding_fallback(trigram_encoder(), min_cosine=1.5)
    with pytest.raises(ValueError, match="shape"):
        embedding_fallback(lambda texts: np.ones((len(texts) - 1, 4)))
