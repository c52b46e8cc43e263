"""The augment stage's llm backend (`stages.augment.run_llm_backend`): answers judged like the
rules, the request cache, repairs, budgets, truncation, the tiny causal LM and the vLLM text
engine against strict stand-ins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import fake_vllm
import pytest
from llm_stand_ins import FakeGenerator, NoGenerator

from pipeline.request_cache import RequestCache
from stages.augment import run_llm_backend
from stages.models.generation.answers import Answer
from stages.models.generation.vllm_engine import VLLMTextGenerator
from stages.text.distractor_answers import build_distractor
from stages.text.distractor_prompts import build_kind_prompt, distractor_budget, distractor_schema
from stages.text.distractor_rules import KINDS, SceneContext, validate

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------
# the backend with a scripted generator


S1 = "the man in red shirt on left"


S2 = "woman holding a blue umbrella"


SENTENCES = [(1, S1, None), (2, S2, None)]


SCRIPT = {
    ("swap_color", S1): [json.dumps({"distractors": [
        "the man in blue shirt on left", "the man in red shirt on left",
        "the man in green shirt on right"]})],
    ("negation", S1): ['Sure! {"distractors": ["the man not in red shirt on left"',
                       '```json\n{"distractors": ["the man not in red shirt on left"]}\n```'],
    ("swap_color", S2): ['{"distractors": ["Woman holding a Blue umbrella.", '
                         '"woman holding a green umbrella", "woman holding a green umbrella"]}'],
    ("negation", S2): ["I cannot help with that.", "Still no."],
}


def _run(cache: Path, gen: object, per_kind: int = 2, **kw: object):
    return run_llm_backend(SENTENCES, ["swap_color", "negation"], per_kind, "fake", "cpu",
                           cache, generator=gen, **kw)  # type: ignore[arg-type]


def test_run_llm_backend_judges_answers_like_validate(tmp_path: Path) -> None:
    gen = FakeGenerator(SCRIPT)
    accepted, rejected, counts = _run(tmp_path / "req.sqlite", gen)
    assert accepted == [
        (1, "swap_color", "the man in blue shirt on left"),
        (1, "negation", "the man not in red shirt on left"),
        (2, "swap_color", "woman holding a green umbrella"),
    ]
    unparseable = (2, "negation", "", "unparseable: no JSON object found in the answer; answer "
                   'with {"distractors": ["...", ...]}')
    assert rejected == [
        (1, "swap_color", "the man in red shirt on left", "identical"),
        (1, "swap_color", "the man in green shirt on right", "edit outside slot"),
        (2, "swap_color", "woman holding a blue umbrella", "identical"),
        unparseable,
    ]
    # exactly what validate says about the same Distractor
    for sid, kind, text, reason in rejected[:3]:
        source = S1 if sid == 1 else S2
        assert validate(source, build_distractor(kind, source, text)) == reason
    for sid, kind, text in accepted:
        assert validate(S1 if sid == 1 else S2, build_distractor(kind, S1 if sid == 1 else S2,
                                                                 text)) is None
    assert counts == {"generated": 4, "cached": 0}
    # one batch of 4 first answers, then one batch of the 2 repairs
    assert [len(c) for c in gen.calls] == [4, 2]
    assert all("Your previous answer was:" in p for p in gen.calls[1])
    assert "It could not be used: the answer is not valid JSON" in gen.calls[1][0]
    with RequestCache(tmp_path / "req.sqlite") as cache:
        keys = list(cache.keys(model="fake:v1"))
        records = {item: cache.get(model, phash, item) for model, phash, item in keys}
        assert cache.count() == len(keys)
    assert set(records) == {"1:swap_color", "1:negation", "2:swap_color", "2:negation"}
    assert records["1:negation"]["attempts"] == 2
    assert records["1:negation"]["distractors"] == ["the man not in red shirt on left"]
    assert records["1:swap_color"]["attempts"] == 1
    assert records["2:negation"]["distractors"] is None
    assert len(records["2:negation"]["errors"]) == 2


def test_run_llm_backend_cache_and_prompt_changes(tmp_path: Path) -> None:
    path = tmp_path / "req.sqlite"
    first = _run(path, FakeGenerator(SCRIPT))
    again = _run(path, NoGenerator())  # nothing regenerated, same answer
    assert again[2] == {"generated": 0, "cached": 4}
    assert again[:2] == first[:2]
    # a different prompt (per_kind) is a different request: all regenerated
    gen = FakeGenerator(SCRIPT)
    accepted, _, counts = _run(path, gen, per_kind=1)
    assert counts == {"generated": 4, "cached": 0} and sum(map(len, gen.calls)) == 6
    assert all(sum(1 for a in accepted if a[:2] == (s, k)) <= 1 for s, k, _ in accepted)
    # more attempts allowed: a new request too (a cached failure would be retried)
    assert _run(path, FakeGenerator(), max_attempts=3)[2]["generated"] == 4
    with RequestCache(path) as cache:
        assert cache.count() == 12


def test_run_llm_backend_batches_repairs_first_and_caps_candidates(tmp_path: Path) -> None:
    script = {("swap_color", S1): [json.dumps({"distractors": [
        "the man in blue shirt on left", "the man in green shirt on left",
        "the man in pink shirt on left"]})]}
    sentences = [(i, S1 if i == 0 else f"dog number {i} on left", None) for i in range(5)]
    gen = FakeGenerator(script, default="oops")
    accepted, rejected, counts = run_llm_backend(
        sentences, ["swap_color"], 1, "fake", "cpu", tmp_path / "c.sqlite", max_attempts=2,
        batch_size=2, generator=gen)
    assert accepted == [(0, "swap_color", "the man in blue shirt on left")]  # per_kind=1
    assert [r[3].split(":")[0] for r in rejected] == ["unparseable"] * 4
    assert counts == {"generated": 5, "cached": 0}
    assert all(len(c) <= 2 for c in gen.calls) and sum(map(len, gen.calls)) == 9
    # a request being repaired is sent before new ones
    assert "Your previous answer was" in gen.calls[1][0]


def test_run_llm_backend_uses_the_scene_for_spatial_swaps(tmp_path: Path) -> None:
    src = "man on left"
    # the target is leftmost; another man stands at the right edge
    scene = SceneContext(target_box=(0, 0, 10, 10), same_class_boxes=[(90, 0, 10, 10)],
                         image_size=(100, 100))
    gen = FakeGenerator({("swap_spatial", src): ['{"distractors": ["man on right"]}'] * 2})
    accepted, rejected, _ = run_llm_backend([(7, src, scene), (8, src, None)], ["swap_spatial"],
                                            2, "fake", "cpu", tmp_path / "c.sqlite",
                                            generator=gen)
    assert rejected == [(7, "swap_spatial", "man on right", "describes another instance")]
    assert accepted == [(8, "swap_spatial", "man on right")]


def test_kill_hook_then_resume_regenerates_nothing_finished(tmp_path: Path) -> None:
    cache = tmp_path / "kill.sqlite"
    script = textwrap.dedent(f"""
        from stages.augment import run_llm_backend

        class Gen:
            cache_key = "fake:v1"
            def generate(self, prompts, max_new_tokens=96, batch_size=8):
                return ['{{"distractors": []}}'] * len(prompts)

        sents = [(i, f"dog {{i}} on left", None) for i in range(3)]
        run_llm_backend(sents, ["swap_spatial", "negation"], 2, "fake", "cpu", {str(cache)!r},
                        batch_size=4, generator=Gen())
        print("not killed")
    """)
    env = {**os.environ, "NEMO_PIPE_TEST_KILL_AFTER_REQUESTS": "3"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert "not killed" not in proc.stdout
    gen = FakeGenerator()
    sents = [(i, f"dog {i} on left", None) for i in range(3)]
    _, _, counts = run_llm_backend(sents, ["swap_spatial", "negation"], 2, "fake", "cpu", cache,
                                   batch_size=4, generator=gen)
    assert counts == {"generated": 3, "cached": 3}
    assert sum(map(len, gen.calls)) == 3


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown distractor kind"):
        run_llm_backend(SENTENCES, ["nope"], 2, "fake", "cpu", tmp_path / "c",
                        generator=FakeGenerator())
    with pytest.raises(ValueError, match="max_attempts"):
        run_llm_backend(SENTENCES, KINDS, 2, "fake", "cpu", tmp_path / "c", max_attempts=0,
                        generator=FakeGenerator())


# --------------------------------------------------------------------------------------------
# the real (tiny) causal LM


def test_run_llm_backend_with_the_tiny_model(tiny_lm: Any, tmp_path: Path) -> None:
    sentences = [(1, S1, None), (2, S2, None)]
    before = tiny_lm.stats.requests
    accepted, rejected, counts = run_llm_backend(
        sentences, KINDS, 2, "tiny", "cpu", tmp_path / "tiny.sqlite", max_attempts=2,
        batch_size=4, max_new_tokens=16)
    assert isinstance(accepted, list) and isinstance(rejected, list)
    assert counts == {"generated": 10, "cached": 0}
    with RequestCache(tmp_path / "tiny.sqlite") as cache:
        keys = list(cache.keys(model=None))
        records = [cache.get(*k) for k in keys]
    assert len(keys) == 10 and {k[0] for k in keys} == {"causal-lm:tiny-v1-seed0"}
    attempts = sum(r["attempts"] for r in records)
    assert tiny_lm.stats.requests - before == attempts  # every attempt went to the model
    assert all(1 <= r["attempts"] <= 2 for r in records)
    failed = sum(r["distractors"] is None for r in records)
    # random weights with a 16-token cap: cut off at the limit (or, rarely, EOS: unparseable)
    assert sum(1 for r in rejected if r[3].startswith(("truncated: ", "unparseable: "))) == failed
    assert sum(1 for r in rejected if r[3].startswith("truncated: ")) == sum(
        bool(r.get("truncated")) for r in records)
    assert all(r[2] == "" for r in rejected if r[3].startswith("unparseable: "))
    # the parsed answers account for every other row (random weights: usually none)
    parsed = sum(len(r["distractors"]) for r in records if r["distractors"] is not None)
    assert len(accepted) + len(rejected) - failed <= parsed
    again = run_llm_backend(sentences, KINDS, 2, "tiny", "cpu", tmp_path / "tiny.sqlite",
                            max_attempts=2, batch_size=4, max_new_tokens=16)
    assert again == (accepted, rejected, {"generated": 0, "cached": 10})


# --------------------------------------------------------------------------------------------
# token budget and truncation (issue 17)


class RecordingGenerator(FakeGenerator):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.budgets: list[list[int]] = []

    def generate(self, prompts: list[str], max_new_tokens: object = 96,
                 batch_size: int = 8) -> list[str]:
        self.budgets.append(list(max_new_tokens))  # type: ignore[call-overload]
        return super().generate(prompts, batch_size=batch_size)


def test_run_llm_backend_budget_follows_each_sentence(tmp_path: Path) -> None:
    gen = RecordingGenerator()
    run_llm_backend([(1, "the man in red", None), (2, S1, None)], ["swap_color"], 2, "fake",
                    "cpu", tmp_path / "c.sqlite", generator=gen)
    assert gen.budgets == [[71, distractor_budget(S1, 2)]]
    assert distractor_budget(S1, 2) > 71  # a longer sentence gets more
    capped = RecordingGenerator()
    run_llm_backend([(1, "the man in red", None)], ["swap_color"], 2, "fake", "cpu",
                    tmp_path / "d.sqlite", generator=capped, max_new_tokens=50)
    assert capped.budgets == [[50]]


def test_run_llm_backend_names_truncated_answers(tmp_path: Path) -> None:
    class Cut(FakeGenerator):
        def generate(self, prompts: list[str], max_new_tokens: object = 96,
                     batch_size: int = 8) -> list[str]:
            return [Answer('{"distractors": ["the man in blue shirt on', truncated=True)
                    for _ in prompts]

    _, rejected, _ = run_llm_backend([(1, S1, None)], ["swap_color"], 2, "fake", "cpu",
                                     tmp_path / "c.sqlite", generator=Cut(), max_attempts=1)
    assert [r[3].split(":")[0] for r in rejected] == ["truncated"]
    assert "cut off at its token limit" in rejected[0][3]
    # the same broken text without the limit reached is unparseable
    _, rejected, _ = run_llm_backend(
        [(1, S1, None)], ["swap_color"], 2, "fake", "cpu", tmp_path / "d.sqlite",
        generator=FakeGenerator(default='{"distractors": ["the man in blue shirt on'),
        max_attempts=1)
    assert rejected[0][3].startswith("unparseable: the answer is not valid JSON")


# --------------------------------------------------------------------------------------------
# the vLLM text engine against strict stand-ins (tests/fake_vllm.py), both API shapes


@pytest.mark.parametrize("api", ["new", "old"])
def test_vllm_text_generator_strict_stand_ins_and_one_bos(
        api: str, tiny_work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm_cls = fake_vllm.install(monkeypatch, api)
    answers = {"the man in red shirt on left": ('{"distractors": ["the man in blue shirt on '
                                                'left"]}', "stop")}

    def respond(ids: list[int], sp: object) -> tuple[str, str]:
        text = tok.decode(ids)
        for sentence, answer in answers.items():
            if json.dumps(sentence) in text:
                return answer
        return '{"distractors": ["the woman', "length"

    monkeypatch.setenv("NEMO_WORK_DIR", str(tiny_work))
    llm_cls.respond = staticmethod(respond)
    gen = VLLMTextGenerator("tiny")
    llm = llm_cls.instances[-1]
    tok = llm.get_tokenizer()
    accepted, rejected, counts = run_llm_backend(
        [(1, S1, None), (2, S2, None)], ["swap_color"], 1, "tiny", "cpu",
        tmp_path / "c.sqlite", generator=gen, max_attempts=1)
    assert accepted == [(1, "swap_color", "the man in blue shirt on left")]
    assert [(r[0], r[3].split(":")[0]) for r in rejected] == [(2, "truncated")]
    assert gen.stats.truncated == 1 and counts["generated"] == 2
    # the ids vLLM got: the chat template's text encoded once, with exactly one BOS
    bos = tok.bos_token_id
    for seen, sentence in zip(llm.seen, (S1, S2), strict=True):
        ids = seen["ids"]
        assert "prompt" not in seen["prompt"] and ids[0] == bos and ids.count(bos) == 1
        text = tok.apply_chat_template(
            [{"role": "user", "content": build_kind_prompt("swap_color", sentence, 1)}],
            add_generation_prompt=True, tokenize=False)
        assert tok(text)["input_ids"][:2] == [bos, bos]  # what a text prompt would have given
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        params = seen["params"]
        holder = params.structured_outputs if api == "new" else params.guided_decoding
        assert holder.json == distractor_schema(1) and params.temperature == 0.0
        assert params.max_tokens == distractor_budget(sentence, 1, gen.count_tokens)

