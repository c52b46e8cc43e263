"""stages.text.distractor_prompts: the kind prompts, their repair prompt, answer parsing and the
token budget, by hand."""

from __future__ import annotations

import json
import re

import pytest

from stages.text import distractor_prompts
from stages.text.distractor_prompts import (
    DistractorParseError,
    build_kind_prompt,
    distractor_budget,
    parse_distractors,
)
from stages.text.distractor_rules import KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_per_kind_has_sentence_json_instruction_and_examples(kind: str) -> None:
    prompt = build_kind_prompt(kind, "the  man in red\tshirt", 2)
    assert prompt.rstrip().endswith('Sentence: "the man in red shirt"\nAnswer:')
    assert f"Kind: {kind}" in prompt and "STRICT JSON" in prompt
    assert '{"distractors": ["...", ...]}' in prompt and "at most 2 different" in prompt
    examples = distractor_prompts._KIND_EXAMPLES[kind]
    assert len(examples) == 3
    for source, answers in examples:
        assert f"Sentence: {json.dumps(source)}" in prompt
        assert json.dumps({"distractors": list(answers[:2])}) in prompt
    # the worked answers never show more items than are asked for
    one = build_kind_prompt(kind, "the man in red", 1)
    for answer in re.findall(r"Answer: (\{.*\})", one):
        assert len(json.loads(answer)["distractors"]) == 1
    assert "at most 1 different edited sentence," in one


def test_prompt_examples_and_errors() -> None:
    color = build_kind_prompt("swap_color", "the man in red", 2)
    assert '"the man in red"' in color
    assert '{"distractors": ["the man in blue", "the man in green"]}' in color
    assert build_kind_prompt("swap_color", "x", 2) != build_kind_prompt("swap_color", "x", 3)
    assert "<image>" not in build_kind_prompt("negation", "dog <image> left", 2)
    with pytest.raises(ValueError, match="unknown distractor kind"):
        build_kind_prompt("paraphrase", "the man", 2)
    with pytest.raises(ValueError, match="per_kind"):
        build_kind_prompt("negation", "the man", 0)
    repair = distractor_prompts.build_repair_prompt("negation", "dog on left", 2, "x" * 5000, "bad")
    assert repair.startswith(build_kind_prompt("negation", "dog on left", 2))
    assert "It could not be used: bad" in repair and "...[truncated]" in repair


def test_parse_distractors_accepts_json_fences_and_prose() -> None:
    assert parse_distractors('{"distractors": ["the man in blue", "the man in green"]}') == [
        "the man in blue", "the man in green"]
    assert parse_distractors('```json\n{"distractors": ["a  b ", ""]}\n```') == ["a b"]
    prose = 'Sure {happy to help}! Here you go:\n{"distractors": ["dog on right"]} Done.'
    assert parse_distractors(prose) == ["dog on right"]
    assert parse_distractors('{"note": 1}\n{"distractors": [], "extra": true}') == []


@pytest.mark.parametrize(("text", "message"), [
    ('{"distractors": ["the man in blue", ', "not valid JSON"),
    ("{'distractors': ['x']}", "not valid JSON"),
    ("I cannot help with that.", "no JSON object"),
    ('{"answers": ["x"]}', 'needs the key "distractors"'),
    ('{"distractors": ["x", 3, null]}', "must be a string"),
    ('{"distractors": "the man in blue"}', "list"),
])
def test_parse_distractors_rejects_bad_output(text: str, message: str) -> None:
    with pytest.raises(DistractorParseError, match=message):
        parse_distractors(text)
    assert issubclass(DistractorParseError, ValueError)


def test_distractor_budget_by_hand() -> None:
    # '{"distractors": ["the man in red in front of", "the man in red in front of"]}'
    # is 17 + 28 + 2 + 28 + 2 = 77 characters: ceil(77 / 3) = 26 tokens; 1.5 x 26 = 39; + 32
    assert distractor_budget("the man in red", 2) == 71
    # one item: 17 + 28 + 2 = 47 characters: 16 tokens; 24; + 32
    assert distractor_budget("the man in red", 1) == 56
    # whitespace words of that answer: 1 + 7 + 7 = 15; ceil(22.5) = 23; + 32
    assert distractor_budget("the man in red", 2, lambda t: len(t.split())) == 55
    assert distractor_budget("the man in red", 2, cap=60) == 60

