"""stages.models.generation.vllm_engine without vLLM: request building and output parsing as
plain data, and both generators against strict stand-ins of both vLLM API shapes
(tests/fake_vllm.py), on the tiny models."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fake_vllm
import pytest
from llm_stand_ins import schema_of
from PIL import Image

from pipeline.errors import InputError
from stages.models.generation.answers import GenerationStats, is_truncated
from stages.models.generation.vllm_engine import (
    VLLMTextGenerator,
    VLLMVisionGenerator,
    image_prompts,
    parse_vllm_outputs,
    vllm_requests,
    without_leading_bos,
)
from stages.text.distractor_prompts import distractor_schema
from stages.text.view_prompts import json_schema

IMAGE = Image.new("RGB", (120, 90), (20, 40, 60))


def test_vllm_requests_groups_images_and_builds_params() -> None:
    a, b = Image.new("RGB", (40, 20), (9, 9, 9)), Image.new("RGB", (20, 20), (8, 8, 8))
    reqs = [(a, "p0"), (b, "p1"), (a, "p2"), (b, "p3")]
    schema = json_schema(["1"])
    inputs, keys = image_prompts(reqs)
    items = vllm_requests(inputs, schema, max_new_tokens=77, group_keys=keys)
    assert [it["index"] for it in items] == [0, 2, 1, 3]  # views of one image adjacent
    first = items[0]
    assert first["inputs"]["prompt"] == "USER: <image>\np0 ASSISTANT:"
    img = first["inputs"]["multi_modal_data"]["image"]
    assert img.size == (40, 40) and img is items[1]["inputs"]["multi_modal_data"]["image"]
    assert first["sampling_params"] == {"temperature": 0.0, "max_tokens": 77,
                                        "structured_outputs": {"json": schema}}
    json.dumps([it["sampling_params"] for it in items])  # plain dicts
    # no schema -> free text; per-request schemas; explicit image keys
    free = vllm_requests(image_prompts(reqs[:1])[0])
    assert "structured_outputs" not in free[0]["sampling_params"]
    inputs, keys = image_prompts(reqs[:2], image_keys=["x", "x"], format_prompt=lambda p: f"<{p}>")
    per = vllm_requests(inputs, [schema, None], group_keys=keys)
    assert [it["index"] for it in per] == [0, 1] and per[0]["inputs"]["prompt"] == "<p0>"
    assert "structured_outputs" not in per[1]["sampling_params"]
    with pytest.raises(ValueError):
        vllm_requests(image_prompts(reqs)[0], [schema])


def test_parse_vllm_outputs_with_stand_ins() -> None:
    def out(text: str, n: int) -> SimpleNamespace:
        return SimpleNamespace(prompt_token_ids=[0] * 10,
                               outputs=[SimpleNamespace(text=text, token_ids=list(range(n)))])

    stats = GenerationStats()
    outputs = [out(' {"1": {}} ', 4), out("second", 2), SimpleNamespace(outputs=[])]
    assert parse_vllm_outputs(outputs, stats) == ['{"1": {}}', "second", ""]
    assert (stats.requests, stats.generated_tokens, stats.prompt_tokens) == (3, 6, 20)


def test_vllm_generator_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(InputError, match=r"pip install nemo-pipe\[vllm\]") as info:
        VLLMVisionGenerator("tiny")
    assert "GPU" in str(info.value)


def test_strict_stand_ins_reject_the_other_api_and_unknown_names(
        monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> None:
    """The stand-ins are strict, so the code's calls below are checked against real names."""
    for api, other in (("new", "guided_decoding"), ("old", "structured_outputs")):
        fake_vllm.install(monkeypatch, api)
        import vllm
        import vllm.sampling_params as sp

        with pytest.raises(TypeError):
            vllm.SamplingParams(max_tokens=5, **{other: None})
        with pytest.raises(TypeError):
            vllm.SamplingParams(temperature=0.0, max_new_tokens=5)
        with pytest.raises(TypeError):
            vllm.LLM(model=str(tiny_dir), not_an_engine_arg=1)
        assert hasattr(sp, "StructuredOutputsParams") is (api == "new")
        assert hasattr(sp, "GuidedDecodingParams") is (api == "old")


def test_vllm_generator_against_strict_stand_ins(strict_vllm: tuple[type, str],
                                                 tiny_dir: Path) -> None:
    """VLLMGenerator in both API shapes: schema under the right name, per-request max_tokens,
    finish_reason "length" -> truncated, request order restored, one BOS."""
    llm_cls, api = strict_vllm
    llm_cls.respond = staticmethod(lambda ids, sp: (
        f" answer {sp.max_tokens} ", "length" if sp.max_tokens == 7 else "stop"))
    gen = VLLMVisionGenerator("tiny", cache_dir=tiny_dir.parent)
    llm = llm_cls.instances[-1]
    assert llm.model == str(tiny_dir) and llm.kwargs["enable_prefix_caching"] is True
    assert llm.kwargs["max_model_len"] == 4096
    a, b = Image.new("RGB", (10, 10)), Image.new("RGB", (12, 10))
    schema = json_schema(["1"])
    texts = gen.generate([(a, "q0"), (b, "q1"), (a, "q2")], max_new_tokens=[9, 7, 11],
                         schema=[schema, None, schema])
    assert texts == ["answer 9", "answer 7", "answer 11"]  # request order
    assert [is_truncated(t) for t in texts] == [False, True, False]
    sent = llm.seen  # image-grouped: q0, q2, q1
    assert [s["prompt"]["prompt"] for s in sent] == [
        "USER: <image>\nq0 ASSISTANT:", "USER: <image>\nq2 ASSISTANT:",
        "USER: <image>\nq1 ASSISTANT:"]
    assert [s["params"].max_tokens for s in sent] == [9, 11, 7]
    assert [s["params"].temperature for s in sent] == [0.0] * 3
    assert [schema_of(s["params"], api) for s in sent] == [schema, schema, None]
    bos = gen.tokenizer.bos_token_id
    assert all(s["ids"][0] == bos and s["ids"].count(bos) == 1 for s in sent)
    assert gen.stats.truncated == 1 and gen.describe()["backend"] == "vllm"


def test_vllm_generator_caps_max_tokens_by_the_context(monkeypatch: pytest.MonkeyPatch,
                                                       tiny_dir: Path,
                                                       tiny: Any) -> None:
    llm_cls = fake_vllm.install(monkeypatch, "new")
    req = (IMAGE, "Describe the man.")
    # the prompt's length as the HF processor feeds it (text, BOS and the expanded image)
    length = int(tiny._encode([req])["attention_mask"].sum())
    gen = VLLMVisionGenerator("tiny", cache_dir=tiny_dir.parent, max_model_len=length + 5)
    assert gen._image_tokens == 16  # the tiny LLaVA: (32 / 8) ** 2 patches
    gen.generate([req], max_new_tokens=50)
    gen.generate([req], max_new_tokens=3)
    assert [s["params"].max_tokens for s in llm_cls.instances[-1].seen] == [5, 3]


def test_vlm_prompt_never_gets_a_second_bos(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    bos = tok.bos_token_id
    written = tok.bos_token + "USER: <image>\nq ASSISTANT:"  # a template that writes BOS
    assert tok(written)["input_ids"][:2] == [bos, bos]  # what vLLM would have tokenized
    ids = tok(without_leading_bos(written, tok))["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1
    assert without_leading_bos("USER: q", tok) == "USER: q"  # LLaVA-1.5: unchanged


def test_vllm_text_requests_and_missing_vllm() -> None:
    schema = distractor_schema(2)
    items = vllm_requests([{"prompt_token_ids": [1, 5, 6]}, {"prompt_token_ids": [1, 7]}], schema,
                          max_new_tokens=[64, 70])
    assert [it["inputs"] for it in items] == [{"prompt_token_ids": [1, 5, 6]},
                                              {"prompt_token_ids": [1, 7]}]
    assert items[0]["sampling_params"] == {"temperature": 0.0, "max_tokens": 64,
                                           "structured_outputs": {"json": schema}}
    assert items[1]["sampling_params"]["max_tokens"] == 70
    assert schema["properties"]["distractors"]["maxItems"] == 2
    with pytest.raises(InputError, match="vllm"):
        VLLMTextGenerator("tiny")



@pytest.mark.parametrize("api", ["new", "old"])
def test_a_prompt_that_fills_the_context_is_a_truncated_answer_not_a_crash(
        api: str, tiny_work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM refuses a call holding a prompt longer than max_model_len, which would have
    failed every request of the batch with a traceback. Such a request gets an empty,
    truncated answer without being sent (as on the transformers path), the others theirs."""
    from stages.models.generation.hf_engine import chat_prompt_ids
    from stages.models.generation.vllm_engine import VLLMTextGenerator

    llm_cls = fake_vllm.install(monkeypatch, api)
    llm_cls.respond = staticmethod(lambda ids, sp: ("fine", "stop"))
    monkeypatch.setenv("NEMO_WORK_DIR", str(tiny_work))
    probe = VLLMTextGenerator("tiny")
    short, long = "a short question", "word " * 300
    n_short = len(chat_prompt_ids(probe.tokenizer, short))
    n_long = len(chat_prompt_ids(probe.tokenizer, long))
    assert n_short + 10 < n_long
    gen = VLLMTextGenerator("tiny", max_model_len=n_short + 10)
    answers = gen.generate([short, long, short], max_new_tokens=50)
    assert list(answers) == ["fine", "", "fine"]
    assert [is_truncated(a) for a in answers] == [False, True, False]
    seen = llm_cls.instances[-1].seen
    assert len(seen) == 2 and all(len(s["ids"]) == n_short for s in seen)
    assert [s["params"].max_tokens for s in seen] == [10, 10]  # capped by the context
    assert gen.stats.truncated == 1
    # a batch of nothing but such prompts sends nothing
    assert list(gen.generate([long], max_new_tokens=5)) == [""] and len(seen) == 2
