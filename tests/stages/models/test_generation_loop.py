"""stages.models.generation.loop: the one request loop, driven by both tasks.

For views (three instances of an image) and for distractors (three (sentence, kind)
requests), a stand-in model answers every item well but one; the loop must keep the good
items, send ONE repair prompt -- for the bad item only, through the one `repair_prompt` -- and
then have every item. Expected prompts and answers are written out here by hand.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from llm_stand_ins import VALID
from PIL import Image

from stages.models.generation import loop
from stages.models.generation.answers import Answer
from stages.text.distractor_prompts import DistractorJob, DistractorTask, build_kind_prompt
from stages.text.view_prompts import Instance, ViewJob, ViewSet, ViewTask, build_prompt

IMAGE = Image.new("RGB", (64, 48), (10, 20, 30))
INSTANCES = [Instance(instance_id=i, category="person", bbox=(1, 2, 3, 4), expressions=[s])
             for i, s in ((101, "man"), (102, "woman"), (103, "kid"))]
DOG = {"appearance": "the small dog", "action": "the dog sitting", "spatial": "the dog below",
       "appearance_alt": None}
GOOD_VIEWS = {"101": VALID["101"], "102": VALID["102"], "103": DOG}


class Recorder:
    """Answers from `answer(request)`; records each call's requests and keyword arguments."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    def generate(self, requests: list[Any], max_new_tokens: Any = 256, batch_size: int = 8,
                 **kwargs: Any) -> list[str]:
        self.calls.append({"requests": list(requests), "max_new_tokens": max_new_tokens,
                           **kwargs})
        return [self.answer(r) for r in requests]


@pytest.fixture
def repairs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Every (prompt, previous answer, reason) the loop's one repair mechanism is asked for."""
    seen: list[tuple[str, str, str]] = []
    real = loop.repair_prompt

    def spy(prompt: str, previous: str, why: str, **kwargs: Any) -> str:
        seen.append((prompt, previous, why))
        return real(prompt, previous, why, **kwargs)

    monkeypatch.setattr(loop, "repair_prompt", spy)
    return seen


def test_views_one_bad_instance_among_good_ones(repairs: list[tuple[str, str, str]]) -> None:
    first = json.dumps({**GOOD_VIEWS, "102": {**VALID["102"], "spatial": ""}})
    fixed = json.dumps({"102": VALID["102"]})
    gen = Recorder(lambda r: fixed if "Your previous answer was" in r[1] else first)
    (outcome,) = loop.run_requests(gen, ViewTask(), [ViewJob(IMAGE, INSTANCES)])
    assert outcome.values == {k: ViewSet(**v) for k, v in GOOD_VIEWS.items()}
    assert outcome.attempts == 2 and outcome.failed == {}
    assert outcome.errors == ['attempt 1: instance "102": "spatial" must be a non-empty string']
    assert [len(c["requests"]) for c in gen.calls] == [1, 1]
    # one repair, asking for 102 only (all three still listed as context)
    (prompt, previous, why), = repairs
    assert prompt == build_prompt(INSTANCES, image_size=(64, 48), targets=["102"])
    assert previous == first and why == outcome.errors[0].removeprefix("attempt 1: ")
    sent = gen.calls[1]["requests"][0][1]
    assert sent.startswith(prompt) and first in sent
    assert sent.endswith("It could not be used: " + why
                         + "\n\nAnswer again with the corrected JSON object only.")
    assert gen.calls[1]["requests"][0][0] is IMAGE


def test_distractors_one_bad_request_among_good_ones(
        repairs: list[tuple[str, str, str]]) -> None:
    jobs = [DistractorJob("the man in red", "swap_color"),
            DistractorJob("dog on the left", "swap_spatial"),
            DistractorJob("woman with a hat", "negation")]
    good = {"swap_color": '{"distractors": ["the man in blue"]}',
            "swap_spatial": '{"distractors": ["dog on the right"]}',
            "negation": '{"distractors": ["woman without a hat"]}'}

    def answer(prompt: str) -> str:
        if "Your previous answer was" in prompt:
            return good["swap_spatial"]
        kind = next(k for k in good if f"Kind: {k}\n" in prompt)
        return Answer('{"distractors": ["dog on', truncated=True) if kind == "swap_spatial" \
            else good[kind]

    gen = Recorder(answer)
    outcomes = loop.run_requests(gen, DistractorTask(per_kind=1), jobs, max_attempts=2)
    assert [o.values for o in outcomes] == [{"distractors": ["the man in blue"]},
                                            {"distractors": ["dog on the right"]},
                                            {"distractors": ["woman without a hat"]}]
    assert [o.attempts for o in outcomes] == [1, 2, 1]
    assert all(o.failed == {} for o in outcomes)
    assert [len(c["requests"]) for c in gen.calls] == [3, 1]  # the repair alone
    (prompt, previous, why), = repairs
    assert prompt == build_kind_prompt("swap_spatial", "dog on the left", 1)
    assert previous == '{"distractors": ["dog on'
    assert why.startswith("the answer was cut off at its token limit before it was complete")
    assert outcomes[1].errors == [f"attempt 1: {why}"]
    sent = gen.calls[1]["requests"][0]
    assert sent.startswith(prompt) and sent.endswith(
        'Answer again with the corrected JSON object {"distractors": [...]} only.')


def test_a_bad_item_with_no_attempt_left_is_recorded_with_its_reason() -> None:
    first = json.dumps({**GOOD_VIEWS, "103": "a dog"})
    (views,) = loop.run_requests(Recorder(lambda r: first), ViewTask(),
                                 [ViewJob(IMAGE, INSTANCES)], max_attempts=1)
    assert list(views.values) == ["101", "102"]
    assert views.failed == {"103": 'invalid: attempt 1: instance "103": expected an object with '
                                   "keys appearance, action, spatial, appearance_alt, got str"}
    (text,) = loop.run_requests(Recorder(lambda r: Answer("{", truncated=True)),
                                DistractorTask(per_kind=2), [DistractorJob("a cat", "negation")],
                                max_attempts=1)
    assert text.values == {} and list(text.failed) == ["distractors"]
    assert text.failed["distractors"].startswith(
        "truncated: attempt 1: the answer was cut off at its token limit")


def test_batches_take_repairs_first_then_new_jobs_up_to_batch_size() -> None:
    jobs = [DistractorJob(f"dog number {i} on left", "swap_spatial") for i in range(5)]
    first_answers = {"dog number 0 on left": "oops"}  # job 0 needs a repair

    def answer(prompt: str) -> str:
        if "Your previous answer was" in prompt:
            return '{"distractors": []}'
        sentence = json.loads(prompt.rsplit("Sentence: ", 1)[1].split("\n")[0])
        return first_answers.get(sentence, '{"distractors": []}')

    gen = Recorder(answer)
    done: list[str] = []
    loop.run_requests(gen, DistractorTask(per_kind=1), jobs, batch_size=2,
                      on_done=lambda job, outcome: done.append(job.sentence[:12]))
    sizes = [len(c["requests"]) for c in gen.calls]
    assert sizes == [2, 2, 2] and sum(sizes) == 6  # 5 first answers + 1 repair
    assert "Your previous answer was" in gen.calls[1]["requests"][0]  # the repair goes first
    assert done == ["dog number 1", "dog number 0", "dog number 2", "dog number 3",
                    "dog number 4"]
    assert gen.calls[0]["max_new_tokens"] == [gen.calls[0]["max_new_tokens"][0]] * 2


def test_schema_only_for_generators_that_decode_with_one() -> None:
    gen = Recorder(lambda r: json.dumps(GOOD_VIEWS))
    loop.run_requests(gen, ViewTask(), [ViewJob(IMAGE, INSTANCES)])
    assert "schema" not in gen.calls[0]
    gen.supports_schema = True  # type: ignore[attr-defined]
    loop.run_requests(gen, ViewTask(), [ViewJob(IMAGE, INSTANCES)])
    assert gen.calls[1]["schema"][0]["required"] == ["101", "102", "103"]
    with pytest.raises(ValueError, match="max_attempts"):
        loop.run_requests(gen, ViewTask(), [], max_attempts=0)
