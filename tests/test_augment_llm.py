"""The augment stage's LLM backend: prompts, parsing, spans, the cached loop, the tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fake_vllm
import pytest

from pipeline.errors import InputError
from pipeline.request_cache import RequestCache
from stages import augment_llm
from stages.augment_llm import (
    CausalLMGenerator,
    DistractorParseError,
    build_distractor,
    build_kind_prompt,
    candidate_reason,
    diff_span,
    parse_distractors,
    run_llm_backend,
)
from stages.text.distractor_rules import KINDS, Distractor, SceneContext, validate

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# prompts


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_per_kind_has_sentence_json_instruction_and_examples(kind: str) -> None:
    prompt = build_kind_prompt(kind, "the  man in red\tshirt", 2)
    assert prompt.rstrip().endswith('Sentence: "the man in red shirt"\nAnswer:')
    assert f"Kind: {kind}" in prompt and "STRICT JSON" in prompt
    assert '{"distractors": ["...", ...]}' in prompt and "at most 2 different" in prompt
    examples = augment_llm._KIND_EXAMPLES[kind]
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
    repair = augment_llm.build_repair_prompt("negation", "dog on left", 2, "x" * 5000, "bad")
    assert repair.startswith(build_kind_prompt("negation", "dog on left", 2))
    assert "It could not be used: bad" in repair and "...[truncated]" in repair


# --------------------------------------------------------------------------------------------
# parsing


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


# --------------------------------------------------------------------------------------------
# spans


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


# --------------------------------------------------------------------------------------------
# the backend with a scripted generator

_PROMPT_RE = re.compile(r'Kind: (\w+)\nSentence: (".*")\nAnswer:')


class FakeGenerator:
    """Answers from a script keyed by (kind, sentence): one answer per attempt, in order."""

    cache_key = "fake:v1"

    def __init__(self, script: dict[tuple[str, str], list[str]] | None = None,
                 default: str = '{"distractors": []}') -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.default = default
        self.calls: list[list[str]] = []

    def generate(self, prompts: list[str], max_new_tokens: int = 96,
                 batch_size: int = 8) -> list[str]:
        self.calls.append(list(prompts))
        out = []
        for prompt in prompts:
            kind, sentence = _PROMPT_RE.search(prompt).groups()  # type: ignore[union-attr]
            answers = self.script.get((kind, json.loads(sentence)), [])
            out.append(answers.pop(0) if answers else self.default)
        return out


class NoGenerator:
    cache_key = "fake:v1"

    def generate(self, prompts: list[str], max_new_tokens: int = 96,
                 batch_size: int = 8) -> list[str]:
        raise AssertionError("a cached request was regenerated")


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
        from stages.augment_llm import run_llm_backend

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


def test_missing_models_are_input_errors_at_once(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="cannot download"):
        CausalLMGenerator("nobody-here/no-such-causal-lm")
    with pytest.raises(InputError, match="no such directory"):
        CausalLMGenerator(str(tmp_path / "missing-dir"))
    empty = tmp_path / "no-config"
    empty.mkdir()
    with pytest.raises(InputError, match="config.json"):
        CausalLMGenerator(str(empty))
    assert time.perf_counter() - t0 < 10


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-work")


@pytest.fixture
def tiny(tiny_work: Path, monkeypatch: pytest.MonkeyPatch) -> CausalLMGenerator:
    monkeypatch.setenv("NEMO_WORK_DIR", str(tiny_work))
    monkeypatch.setattr(augment_llm, "_GENERATORS", {})
    return augment_llm.get_causal_lm("tiny", "cpu")


def test_tiny_model_loads_through_from_pretrained(tiny: CausalLMGenerator,
                                                  tiny_work: Path) -> None:
    from transformers import LlamaForCausalLM

    path = tiny_work / ".cache" / "tiny-llava" / "causal-lm-v1-seed0"
    assert tiny.path == path and (path / "config.json").is_file()
    assert type(tiny.model) is LlamaForCausalLM
    assert Path(tiny.model.name_or_path) == path
    assert tiny.cache_key == "causal-lm:tiny-v1-seed0"
    assert tiny.tokenizer.padding_side == "left" and tiny.has_chat_template
    assert tiny.format_prompt("hi") == "<s>USER: hi ASSISTANT:"
    assert augment_llm.get_causal_lm("tiny", "cpu") is tiny  # one load per process


def test_tiny_model_batched_equals_one_by_one(tiny: CausalLMGenerator) -> None:
    prompts = [build_kind_prompt("negation", "man holding an umbrella", 2),
               build_kind_prompt("swap_color", "the man in red", 2), "short"]
    batched = tiny.generate(prompts, max_new_tokens=12, batch_size=3)
    single = [tiny.generate([p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single and all(isinstance(t, str) for t in batched)
    assert tiny.generate([], max_new_tokens=4) == []


def test_run_llm_backend_with_the_tiny_model(tiny: CausalLMGenerator, tmp_path: Path) -> None:
    sentences = [(1, S1, None), (2, S2, None)]
    before = tiny.stats.requests
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
    assert tiny.stats.requests - before == attempts  # every attempt went to the model
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


def test_vllm_text_requests_and_missing_vllm() -> None:
    from pipeline.errors import InputError
    from stages.augment_llm import VLLMTextGenerator, distractor_schema, vllm_text_requests

    schema = distractor_schema(2)
    items = vllm_text_requests([[1, 5, 6], [1, 7]], [64, 70], schema)
    assert [it["inputs"] for it in items] == [{"prompt_token_ids": [1, 5, 6]},
                                              {"prompt_token_ids": [1, 7]}]
    assert items[0]["sampling_params"] == {"temperature": 0.0, "max_tokens": 64,
                                           "structured_outputs": {"json": schema}}
    assert items[1]["sampling_params"]["max_tokens"] == 70
    assert schema["properties"]["distractors"]["maxItems"] == 2
    with pytest.raises(InputError, match="vllm"):
        VLLMTextGenerator("tiny")


# --------------------------------------------------------------------------------------------
# token budget and truncation (issue 17)


def test_distractor_budget_by_hand() -> None:
    from stages.augment_llm import distractor_budget

    # '{"distractors": ["the man in red in front of", "the man in red in front of"]}'
    # is 17 + 28 + 2 + 28 + 2 = 77 characters: ceil(77 / 3) = 26 tokens; 1.5 x 26 = 39; + 32
    assert distractor_budget("the man in red", 2) == 71
    # one item: 17 + 28 + 2 = 47 characters: 16 tokens; 24; + 32
    assert distractor_budget("the man in red", 1) == 56
    # whitespace words of that answer: 1 + 7 + 7 = 15; ceil(22.5) = 23; + 32
    assert distractor_budget("the man in red", 2, lambda t: len(t.split())) == 55
    assert distractor_budget("the man in red", 2, cap=60) == 60


class RecordingGenerator(FakeGenerator):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.budgets: list[list[int]] = []

    def generate(self, prompts: list[str], max_new_tokens: object = 96,
                 batch_size: int = 8) -> list[str]:
        self.budgets.append(list(max_new_tokens))  # type: ignore[call-overload]
        return super().generate(prompts, batch_size=batch_size)


def test_run_llm_backend_budget_follows_each_sentence(tmp_path: Path) -> None:
    from stages.augment_llm import distractor_budget

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
    from stages.vlm import Answer

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
    from stages.augment_llm import VLLMTextGenerator, distractor_budget, distractor_schema

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
    gen = VLLMTextGenerator("tiny", per_kind=1)
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
