"""stages.vlm: prompts, answer parsing and repair, padding, tiny models, HF and vLLM backends.

Every model here is built in code, saved with save_pretrained and loaded back with
from_pretrained (the path real checkpoints take); nothing touches the network.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fake_vllm
import pytest
from PIL import Image

from pipeline.errors import InputError
from stages import vlm
from stages.vlm import (
    CLIP_MEAN_RGB,
    VIEWS,
    Instance,
    ViewParseError,
    ViewSet,
    build_prompt,
    build_repair_prompt,
    generate_views,
    json_schema,
    pad_to_square,
    parse_views,
)

ROOT = Path(__file__).resolve().parents[1]

MAN = Instance(instance_id=101, category="person", bbox=(10, 40, 30, 50),
               expressions=[b"left", b"man", b"Man"])
LADY = Instance(instance_id="102", category="person", bbox=(60, 35, 30, 60),
                expressions=["lady", "Woman on right", "woman"])
INSTANCES = [MAN, LADY]
IDS = ["101", "102"]


def _entry(appearance: str = "the young man with glasses", action: str | None = "the man "
           "looking at the woman", spatial: str = "the man on the left",
           alt: str | None = None) -> dict[str, Any]:
    return {"appearance": appearance, "action": action, "spatial": spatial,
            "appearance_alt": alt}


VALID = {
    "101": _entry(),
    "102": _entry("the woman in a red dress", None, "the woman on the right",
                  "the woman with long dark hair"),
}


# --------------------------------------------------------------------------------------------
# prompts


def test_module_imports_without_torch_or_transformers() -> None:
    code = ("import sys, stages.vlm; "
            "print([m for m in ('torch', 'transformers', 'vllm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_instance_accepts_ann_ids_and_bytes() -> None:
    assert MAN.instance_id == "101" and MAN.expressions == ["left", "man", "Man"]
    with pytest.raises(ValueError):
        Instance(instance_id="  ", expressions=["x"])


def test_prompt_has_task_examples_instances_and_format() -> None:
    prompt = build_prompt(INSTANCES)
    # the notes' task text and the three worked examples, verbatim
    assert "Your task is to generate 3 diverse referring expressions for each instance" in prompt
    assert "1. Appearance (e.g., color, shape, texture)" in prompt
    assert "a tree is static and has no action" in prompt
    for text in ('Original Referring Expression: "woman"',
                 '- Action: "the woman adjusting the man\'s tie"',
                 'Original Referring Expression: "tree"',
                 "- Action: (none - object is static)",
                 '- Alternative from "Appearance": "the tree with green leaves"',
                 'Original Referring Expression: "red car"',
                 '- Spatial: "the car next to the black SUV"',
                 '"the car that is smaller between the two"'):
        assert text in prompt, text
    # every instance id with its category and original expressions
    for inst in INSTANCES:
        assert f'instance id "{inst.instance_id}"' in prompt
        assert json.dumps(inst.expressions) in prompt
    assert 'category "person"' in prompt
    # strict JSON format instruction, with all four keys
    assert "STRICT JSON" in prompt
    assert ('{"<instance_id>": {"appearance": str, "action": str|null, "spatial": str, '
            '"appearance_alt": str|null}, ...}') in prompt
    assert "every one of them" in prompt
    # and the JSON rendering of the examples is itself a valid answer
    rendered = prompt[prompt.rindex('{"ex1"'):]
    assert set(parse_views(rendered, ["ex1", "ex2"])) == {"ex1", "ex2"}


def test_prompt_boxes_are_relative_to_the_padded_square() -> None:
    # 200x100 image -> padded to 200x200 with 50 px on top; MAN's box moves down by 50
    prompt = build_prompt([MAN], image_size=(200, 100))
    assert "box [x1, y1, x2, y2] = [0.05, 0.45, 0.20, 0.70]" in prompt
    assert "box [x, y, w, h] = [10, 40, 30, 50] pixels" in build_prompt([MAN])


def test_per_instance_prompt_targets_one_instance() -> None:
    prompt = build_prompt([LADY, MAN], per_instance=True)
    target = prompt.index("The target instance:")
    context = prompt.index("Other instances in the image (context only")
    assert target < prompt.index('instance id "102"') < context < prompt.index('instance id "101"')
    assert 'only the target instance, "102"' in prompt
    assert "Original Referring Expression: \"red car\"" in prompt
    with pytest.raises(ValueError):
        build_prompt([])
    with pytest.raises(ValueError):
        build_prompt([MAN, MAN])


def test_prompt_defuses_control_tokens_in_dataset_text() -> None:
    inst = Instance(instance_id=1, expressions=["the <image> man", "end</s>"])
    prompt = build_prompt([inst])
    assert "<image>" not in prompt and "</s>" not in prompt
    assert '"the image man"' in prompt


def test_repair_prompt_has_error_and_previous_output() -> None:
    previous = 'Sure! {"101": {"appearance": "", '
    error = 'missing instance(s) "102": the answer needs an entry for every instance id'
    prompt = build_repair_prompt(previous, error, INSTANCES)
    assert prompt.startswith(build_prompt(INSTANCES))  # the full task again
    assert previous.strip() in prompt
    assert error in prompt
    assert prompt.rstrip().endswith("Answer again with the corrected JSON object only.")
    long = build_repair_prompt("x" * 10_000, "too long", INSTANCES)
    assert "[truncated]" in long and len(long) < len(build_prompt(INSTANCES)) + 4000


# --------------------------------------------------------------------------------------------
# parse_views


def test_parse_valid_json() -> None:
    views = parse_views(json.dumps(VALID), IDS)
    assert list(views) == IDS
    assert views["101"].action == "the man looking at the woman"
    assert views["101"].appearance_alt is None
    assert views["102"].action is None
    assert views["102"].expressions() == ["the woman in a red dress", "the woman on the right",
                                          "the woman with long dark hair"]
    assert VIEWS == ("appearance", "action", "spatial", "appearance_alt")


def test_parse_json_in_code_fence_and_after_prose() -> None:
    fenced = "```json\n" + json.dumps(VALID, indent=2) + "\n```"
    assert set(parse_views(fenced, IDS)) == set(IDS)
    prose = ("Here are the expressions {as requested} for both people:\n\n"
             + json.dumps(VALID) + "\nLet me know if you need more.")
    assert set(parse_views(prose, IDS)) == set(IDS)
    assert parse_views(prose, IDS)["102"].appearance_alt == "the woman with long dark hair"


def test_parse_missing_instance_is_named() -> None:
    with pytest.raises(ViewParseError, match=r'missing instance\(s\) "102"'):
        parse_views(json.dumps({"101": VALID["101"]}), IDS)


def test_parse_empty_appearance() -> None:
    bad = {**VALID, "101": _entry(appearance="  ")}
    with pytest.raises(ViewParseError, match=r'instance "101": "appearance" must be a non-empty'):
        parse_views(json.dumps(bad), IDS)
    missing_key = {**VALID, "101": {"action": "x", "spatial": "y", "appearance_alt": None}}
    with pytest.raises(ViewParseError, match=r'instance "101": "appearance" is missing'):
        parse_views(json.dumps(missing_key), IDS)


def test_parse_action_null_with_alt_ok_and_none_like_strings() -> None:
    views = parse_views(json.dumps({"101": _entry(action=None, alt="the man in white")}), ["101"])
    assert views["101"].action is None and views["101"].appearance_alt == "the man in white"
    # the examples' "(none - object is static)" and empty strings count as null
    echo = {"101": _entry(action="(none - object is static)", alt="the man in white"),
            "102": _entry(action="", alt="the tall woman")}
    views = parse_views(json.dumps(echo), IDS)
    assert views["101"].action is None and views["102"].action is None


def test_parse_both_null_is_an_error() -> None:
    with pytest.raises(ViewParseError, match=r'instance "101": "action" is null, so '
                                              r'"appearance_alt" .* is required'):
        parse_views(json.dumps({"101": _entry(action=None, alt=None)}), ["101"])


def test_parse_both_set_is_an_error() -> None:
    # exactly one of action / appearance_alt: the cluster gets exactly three expressions
    with pytest.raises(ViewParseError, match='both "action" and "appearance_alt" are set'):
        parse_views(json.dumps({"101": _entry(alt="another look")}), ["101"])


def test_parse_unknown_instance_is_an_error() -> None:
    # Decision: an id that was not asked for is rejected (not ignored): the model confused or
    # invented instances, and the structured-decoding schema forbids it too.
    extra = {**VALID, "999": _entry()}
    with pytest.raises(ViewParseError, match=r'unknown instance id\(s\) "999"; use only the ids '
                                              r'"101", "102"'):
        parse_views(json.dumps(extra), IDS)


def test_parse_malformed_json() -> None:
    truncated = json.dumps(VALID)[:-30]
    with pytest.raises(ViewParseError, match="not valid JSON"):
        parse_views(truncated, IDS)
    with pytest.raises(ViewParseError, match="not valid JSON"):
        parse_views("{'101': {'appearance': 'python dict'}}", IDS)
    with pytest.raises(ViewParseError, match="no JSON object"):
        parse_views("I cannot see any people in this image.", IDS)
    with pytest.raises(ViewParseError, match=r'instance "101": expected an object'):
        parse_views(json.dumps({"101": "the man", "102": VALID["102"]}), IDS)
    with pytest.raises(ViewParseError, match=r'"spatial" Input should be a valid string'):
        parse_views(json.dumps({"101": {**VALID["101"], "spatial": 3}}), ["101"])


def test_parse_reports_all_problems_at_once() -> None:
    bad = {"101": _entry(appearance=""), "777": _entry()}
    with pytest.raises(ViewParseError) as info:
        parse_views(json.dumps(bad), IDS)
    msg = str(info.value)
    assert '"102"' in msg and '"777"' in msg and 'instance "101"' in msg


def test_viewset_direct_construction_enforces_rules() -> None:
    assert ViewSet(appearance="a", action="b", spatial="c").expressions() == ["a", "b", "c"]
    with pytest.raises(ValueError):
        ViewSet(appearance="a", spatial="c")


def test_json_schema_shape() -> None:
    schema = json_schema(IDS)
    assert schema["required"] == IDS and schema["additionalProperties"] is False
    view = schema["properties"]["101"]
    assert list(view["properties"]) == list(VIEWS) == view["required"]
    assert view["additionalProperties"] is False
    assert view["properties"]["appearance"] == {"type": "string", "minLength": 1}
    assert {"type": "null"} in view["properties"]["action"]["anyOf"]
    json.dumps(schema)  # plain JSON, ready for vLLM


# --------------------------------------------------------------------------------------------
# generate_views with a scripted generator


class ScriptedGenerator:
    """Returns canned answers in order and records every request it got."""

    def __init__(self, outputs: list[str], supports_schema: bool = False) -> None:
        self.outputs = list(outputs)
        self.calls: list[dict[str, Any]] = []
        self.supports_schema = supports_schema

    def generate(self, requests: list[tuple[Image.Image, str]], max_new_tokens: int = 256,
                 batch_size: int = 8, **kwargs: Any) -> list[str]:
        self.calls.append({"requests": requests, "max_new_tokens": max_new_tokens, **kwargs})
        return [self.outputs.pop(0) for _ in requests]


IMAGE = Image.new("RGB", (120, 90), (20, 40, 60))


def test_generate_views_repairs_then_succeeds() -> None:
    malformed = '{"101": {"appearance": "the man", "action": null'
    gen = ScriptedGenerator([malformed, "```json\n" + json.dumps(VALID) + "\n```"])
    views, attempts, errors, failed = generate_views(gen, IMAGE, INSTANCES)
    assert attempts == 2 and list(views) == IDS and failed == {}
    assert len(errors) == 1 and errors[0].startswith("attempt 1: the answer is not valid JSON")
    first, second = (call["requests"][0][1] for call in gen.calls)
    assert first == build_prompt(INSTANCES, image_size=IMAGE.size)
    assert malformed in second and "not valid JSON" in second  # the repair prompt
    assert gen.calls[0]["requests"][0][0] is IMAGE


def test_generate_views_gives_up_after_max_attempts() -> None:
    gen = ScriptedGenerator(["no json here", '{"101": {}}', "{oops"])
    views, attempts, errors, failed = generate_views(gen, IMAGE, INSTANCES, max_attempts=3)
    assert views == {} and attempts == 3 and len(errors) == 3
    assert list(failed) == IDS and all(f.startswith("invalid: attempt 3: ") for f in
                                       failed.values())
    assert "no JSON object" in errors[0]
    assert 'missing instance(s) "102"' in errors[1]
    assert "not valid JSON" in errors[2]
    assert len(gen.calls) == 3


def test_generate_views_per_instance_retries_only_failures() -> None:
    ok_man = json.dumps({"101": VALID["101"]})
    ok_lady = json.dumps({"102": VALID["102"]})
    gen = ScriptedGenerator([ok_man, "garbage", ok_lady], supports_schema=True)
    views, attempts, errors, failed = generate_views(gen, IMAGE, INSTANCES, per_instance=True)
    assert list(views) == IDS and attempts == 2 and failed == {}
    assert [len(c["requests"]) for c in gen.calls] == [2, 1]
    assert len(errors) == 1 and errors[0].startswith("attempt 1 (instance 102): no JSON object")
    # a generator that supports structured decoding gets one schema per request
    assert [s["required"] for s in gen.calls[0]["schema"]] == [["101"], ["102"]]
    assert gen.calls[1]["schema"][0]["required"] == ["102"]
    assert "The target instance:" in gen.calls[1]["requests"][0][1]


def test_generate_views_no_instances() -> None:
    assert generate_views(ScriptedGenerator([]), IMAGE, []) == ({}, 0, [], {})


# --------------------------------------------------------------------------------------------
# pad_to_square


def test_pad_to_square_places_content_and_fills_with_clip_mean() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.putpixel((0, 0), (0, 255, 0))
    out, (left, top) = pad_to_square(img)
    assert out.size == (40, 40) and (left, top) == (0, 10)
    assert out.getpixel((0, 10)) == (0, 255, 0)  # original top-left corner, shifted down
    assert out.getpixel((39, 29)) == (255, 0, 0)
    assert out.getpixel((20, 5)) == CLIP_MEAN_RGB == out.getpixel((20, 35))
    assert CLIP_MEAN_RGB == (122, 116, 104)  # LLaVA-1.5: int(x * 255) of the CLIP mean
    tall, offset = pad_to_square(Image.new("RGB", (15, 30), (0, 0, 255)), fill=(1, 2, 3))
    assert tall.size == (30, 30) and offset == (7, 0)
    assert tall.getpixel((0, 0)) == (1, 2, 3) and tall.getpixel((7, 0)) == (0, 0, 255)


def test_pad_to_square_average_fill_and_modes() -> None:
    img = Image.new("RGB", (20, 10), (200, 100, 0))
    img.paste((0, 0, 100), (0, 0, 10, 10))  # left half
    out, _ = pad_to_square(img, fill="average")
    assert out.getpixel((0, 0)) == (100, 50, 50)
    square = Image.new("RGB", (16, 16))
    assert pad_to_square(square) == (square, (0, 0))
    gray, _ = pad_to_square(Image.new("L", (8, 4), 7))
    assert gray.mode == "RGB" and gray.size == (8, 8)


# --------------------------------------------------------------------------------------------
# tiny models through the real save_pretrained / from_pretrained path


def _saved_to_loaded_key(key: str) -> str:
    """transformers 5 saves LLaVA in the original hub layout; the module tree is different."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    return "model." + key  # vision_tower.*, multi_modal_projector.*


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return vlm.tiny_llava_dir(tmp_path_factory.mktemp("tiny-cache"), seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> vlm.HFGenerator:
    return vlm.HFGenerator("tiny", device="cpu", dtype="auto", cache_dir=tiny_dir.parent)


def _requests() -> list[tuple[Image.Image, str]]:
    """Three requests whose prompts differ in length, so a batch needs padding."""
    return [
        (Image.new("RGB", (64, 40), (200, 30, 30)), build_prompt([MAN])),
        (Image.new("RGB", (30, 50), (30, 200, 30)), "Describe the man on the left."),
        (Image.new("RGB", (48, 48), (30, 30, 200)), build_prompt(INSTANCES, per_instance=True)),
    ]


def test_tiny_llava_files_and_loaded_weights(tiny_dir: Path, tiny: vlm.HFGenerator) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    assert type(tiny.model) is LlavaForConditionalGeneration
    assert type(tiny.model.config) is LlavaConfig
    assert isinstance(tiny.processor, LlavaProcessor)
    assert tiny.path == tiny_dir and tiny.dtype == torch.float32
    # the loaded parameters are exactly the saved ones (not a fresh random init)
    raw = load_file(tiny_dir / "model.safetensors")
    saved = {_saved_to_loaded_key(k): v for k, v in raw.items()}
    loaded = tiny.model.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # the processor wiring: 16 image tokens = (32 / 8)^2 patches, CLS dropped
    assert tiny.model.config.image_seq_length == 16
    ids = tiny.processor(images=[Image.new("RGB", (32, 32))], text=["USER: <image>\nhi"])
    assert ids["input_ids"][0].count(tiny.model.config.image_token_id) == 16
    assert tiny.tokenizer.padding_side == "left"
    assert tiny.fill == CLIP_MEAN_RGB  # from the processor's image_mean
    expected = "USER: <image>\nhello ASSISTANT:"
    assert tiny.format_prompt("hello") == vlm.llava_prompt("hello") == expected


def test_tiny_llava_is_deterministic_per_seed(tmp_path: Path, tiny_dir: Path) -> None:
    from safetensors.torch import load_file

    again = vlm.build_tiny_llava(tmp_path / "again", seed=0)
    other = vlm.build_tiny_llava(tmp_path / "other", seed=1)
    ref = load_file(tiny_dir / "model.safetensors")
    same, diff = load_file(again / "model.safetensors"), load_file(other / "model.safetensors")
    assert all(ref[k].equal(same[k]) for k in ref)
    assert not all(ref[k].equal(diff[k]) for k in ref)
    assert (again / "tokenizer.json").read_text() == (tiny_dir / "tokenizer.json").read_text()
    # and the cache reuses the built directory
    assert vlm.tiny_llava_dir(tiny_dir.parent, seed=0) == tiny_dir


def test_generate_batched_equals_unbatched(tiny: vlm.HFGenerator) -> None:
    reqs = _requests()
    batched = tiny.generate(reqs, max_new_tokens=6, batch_size=3)
    single = tiny.generate(reqs, max_new_tokens=6, batch_size=1)
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    assert batched == single
    # results come back in request order (batches are formed by prompt length internally)
    assert len(set(batched)) > 1
    assert [tiny.generate([r], max_new_tokens=6)[0] for r in reqs[::2]] == batched[::2]
    assert tiny.stats.generated_tokens > 0 and tiny.stats.tokens_per_second > 0


def test_first_step_logits_batched_match_unbatched(tiny: vlm.HFGenerator) -> None:
    import torch

    reqs = _requests()
    batched = tiny.first_step_logits(reqs, batch_size=3)
    single = tiny.first_step_logits(reqs, batch_size=1)
    assert batched.shape == (3, tiny.model.config.text_config.vocab_size)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    assert not torch.allclose(single[0], single[2], atol=1e-3)  # rows are distinguishable
    # the check has teeth: with right padding the padded rows continue from a pad token
    tiny.tokenizer.padding_side = "right"
    try:
        wrong = tiny.first_step_logits(reqs, batch_size=3)
    finally:
        tiny.tokenizer.padding_side = "left"
    assert (wrong - single).abs().max() > 1e-2


def test_generate_views_with_tiny_model_never_raises(tiny: vlm.HFGenerator) -> None:
    views, attempts, errors, failed = generate_views(tiny, IMAGE, INSTANCES, max_attempts=2,
                                                     max_new_tokens=8)
    assert views == {} and attempts == 2 and len(errors) == 2  # random weights: no JSON
    assert list(failed) == IDS
    assert all(re.match(r"(truncated|invalid): attempt 2: ", f) for f in failed.values())


def test_tiny_causal_lm_loads_back_and_generates(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = vlm.build_tiny_causal_lm(tmp_path / "lm", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model) is LlamaForCausalLM
    messages = [{"role": "user", "content": 'Negate: "the man holding an umbrella"'}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == '<s>USER: Negate: "the man holding an umbrella" ASSISTANT:'
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert inputs["input_ids"][0].tolist().count(tokenizer.bos_token_id) == 1
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert len(new) == 5 and isinstance(tokenizer.decode(new, skip_special_tokens=True), str)


# --------------------------------------------------------------------------------------------
# vLLM without vLLM


def test_vllm_requests_groups_images_and_builds_params() -> None:
    a, b = Image.new("RGB", (40, 20), (9, 9, 9)), Image.new("RGB", (20, 20), (8, 8, 8))
    reqs = [(a, "p0"), (b, "p1"), (a, "p2"), (b, "p3")]
    schema = json_schema(["1"])
    items = vlm.vllm_requests(reqs, schema, max_new_tokens=77)
    assert [it["index"] for it in items] == [0, 2, 1, 3]  # views of one image adjacent
    first = items[0]
    assert first["inputs"]["prompt"] == "USER: <image>\np0 ASSISTANT:"
    img = first["inputs"]["multi_modal_data"]["image"]
    assert img.size == (40, 40) and img is items[1]["inputs"]["multi_modal_data"]["image"]
    assert first["sampling_params"] == {"temperature": 0.0, "max_tokens": 77,
                                        "structured_outputs": {"json": schema}}
    json.dumps([it["sampling_params"] for it in items])  # plain dicts
    # no schema -> free text; per-request schemas; explicit image keys
    free = vlm.vllm_requests(reqs[:1])
    assert "structured_outputs" not in free[0]["sampling_params"]
    per = vlm.vllm_requests(reqs[:2], [schema, None], image_keys=["x", "x"],
                            format_prompt=lambda p: f"<{p}>")
    assert [it["index"] for it in per] == [0, 1] and per[0]["inputs"]["prompt"] == "<p0>"
    assert "structured_outputs" not in per[1]["sampling_params"]
    with pytest.raises(ValueError):
        vlm.vllm_requests(reqs, [schema])


def test_parse_vllm_outputs_with_stand_ins() -> None:
    def out(text: str, n: int) -> SimpleNamespace:
        return SimpleNamespace(prompt_token_ids=[0] * 10,
                               outputs=[SimpleNamespace(text=text, token_ids=list(range(n)))])

    stats = vlm.GenerationStats()
    outputs = [out(' {"1": {}} ', 4), out("second", 2), SimpleNamespace(outputs=[])]
    assert vlm.parse_vllm_outputs(outputs, stats) == ['{"1": {}}', "second", ""]
    assert (stats.requests, stats.generated_tokens, stats.prompt_tokens) == (3, 6, 20)


def test_vllm_generator_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(InputError, match=r"pip install nemo-pipe\[vllm\]") as info:
        vlm.VLLMGenerator("tiny")
    assert "GPU" in str(info.value)


@pytest.fixture(params=["new", "old"])
def strict_vllm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                ) -> tuple[type, str]:
    """A strict fake `vllm` (tests/fake_vllm.py) in both API shapes: (its LLM class, shape)."""
    return fake_vllm.install(monkeypatch, request.param), request.param


def _schema_of(params: Any, api: str) -> dict[str, Any] | None:
    """The JSON schema a SamplingParams carries, under the shape's own name."""
    holder = params.structured_outputs if api == "new" else params.guided_decoding
    return None if holder is None else holder.json


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
    gen = vlm.VLLMGenerator("tiny", cache_dir=tiny_dir.parent)
    llm = llm_cls.instances[-1]
    assert llm.model == str(tiny_dir) and llm.kwargs["enable_prefix_caching"] is True
    assert llm.kwargs["max_model_len"] == 4096
    a, b = Image.new("RGB", (10, 10)), Image.new("RGB", (12, 10))
    schema = json_schema(["1"])
    texts = gen.generate([(a, "q0"), (b, "q1"), (a, "q2")], max_new_tokens=[9, 7, 11],
                         schema=[schema, None, schema])
    assert texts == ["answer 9", "answer 7", "answer 11"]  # request order
    assert [vlm.is_truncated(t) for t in texts] == [False, True, False]
    sent = llm.seen  # image-grouped: q0, q2, q1
    assert [s["prompt"]["prompt"] for s in sent] == [
        "USER: <image>\nq0 ASSISTANT:", "USER: <image>\nq2 ASSISTANT:",
        "USER: <image>\nq1 ASSISTANT:"]
    assert [s["params"].max_tokens for s in sent] == [9, 11, 7]
    assert [s["params"].temperature for s in sent] == [0.0] * 3
    assert [_schema_of(s["params"], api) for s in sent] == [schema, schema, None]
    bos = gen._tokenizer.bos_token_id
    assert all(s["ids"][0] == bos and s["ids"].count(bos) == 1 for s in sent)
    assert gen.stats.truncated == 1 and gen.describe()["backend"] == "vllm"


def test_vllm_generator_caps_max_tokens_by_the_context(monkeypatch: pytest.MonkeyPatch,
                                                       tiny_dir: Path,
                                                       tiny: vlm.HFGenerator) -> None:
    llm_cls = fake_vllm.install(monkeypatch, "new")
    req = (IMAGE, "Describe the man.")
    # the prompt's length as the HF processor feeds it (text, BOS and the expanded image)
    length = int(tiny._encode([req])["attention_mask"].sum())
    gen = vlm.VLLMGenerator("tiny", cache_dir=tiny_dir.parent, max_model_len=length + 5)
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
    ids = tok(vlm.without_leading_bos(written, tok))["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1
    assert vlm.without_leading_bos("USER: q", tok) == "USER: q"  # LLaVA-1.5: unchanged


def test_multiview_vllm_backend_end_to_end_with_strict_stand_ins(
        strict_vllm: tuple[type, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_model_backend -> get_generator -> VLLMGenerator -> SamplingParams of the installed
    shape; the stand-in answers exactly what the schema asks for, so every view is kept."""
    llm_cls, api = strict_vllm

    def respond(ids: list[int], sp: Any) -> tuple[str, str]:
        wanted = _schema_of(sp, api)["required"]
        return _answer([int(i) for i in wanted]), "stop"

    llm_cls.respond = staticmethod(respond)
    monkeypatch.setenv("NEMO_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setattr(vlm, "_GENERATORS", {})
    by_image, payload = _scene(tmp_path)
    rows, failures, counts = vlm.run_model_backend(_params(backend="vllm", max_new_tokens=None),
                                                   by_image, payload)
    assert failures == [] and len(rows) == 4 * 3 and counts["generated"] == 2
    assert [s["params"].max_tokens for s in llm_cls.instances[-1].seen] == [
        vlm.views_budget(2, vlm._GENERATORS[("vllm", "tiny", "cpu")].count_tokens)] * 2


def test_tiny_cache_goes_under_nemo_work_dir(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("NEMO_WORK_DIR", str(tmp_path))
    assert vlm._tiny_root(None) == tmp_path / ".cache" / "tiny-llava"
    assert vlm._tiny_root(tmp_path / "x") == tmp_path / "x"


# --------------------------------------------------------------------------------------------
# offline model resolution


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_uncached_hub_id_is_an_input_error_fast(tmp_path: Path, no_network: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers  # noqa: F401 - import cost is not part of "fast"
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    previous = constants.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(InputError, match="cannot download it; pass a local directory"):
        vlm.HFGenerator("llava-hf/llava-1.5-7b-hf", device="cpu")
    assert time.monotonic() - start < 5
    assert constants.HF_HUB_OFFLINE is previous  # offline only for the lookup
    with pytest.raises(InputError, match="no such directory"):
        vlm.resolve_model_path(str(tmp_path / "missing" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        vlm.resolve_model_path(str(tmp_path / "empty"))


def test_cached_hub_id_resolves_to_its_snapshot(tmp_path: Path, no_network: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    commit = "a" * 40
    repo = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    previous = constants.HF_HUB_OFFLINE
    path, revision = vlm.resolve_model_path("llava-hf/llava-1.5-7b-hf")
    assert path == snapshot and revision == commit
    assert constants.HF_HUB_OFFLINE is previous  # offline only for the lookup


def test_bad_device_and_dtype_are_input_errors(tiny_dir: Path) -> None:
    with pytest.raises(InputError, match="unknown dtype"):
        vlm.HFGenerator("tiny", device="cpu", dtype="int3", cache_dir=tiny_dir.parent)
    with pytest.raises(InputError, match="unknown device"):
        vlm.HFGenerator("tiny", device="tpu", cache_dir=tiny_dir.parent)


# --------------------------------------------------------------------------------------------
# the multiview stage's model backend (cache-first, resumable per image)


def _scene(tmp_path: Path) -> tuple[dict[int, list[dict[str, Any]]], dict[str, Any]]:
    """Two images with referents in the shape stages.multiview passes them."""
    images = tmp_path / "images"
    images.mkdir()
    by_image: dict[int, list[dict[str, Any]]] = {}
    for image_id, (w, h) in ((1, (64, 48)), (2, (40, 40))):
        Image.new("RGB", (w, h), (image_id * 60, 90, 30)).save(images / f"{image_id}.jpg")
        meta = {"image_id": image_id, "file_name": f"{image_id}.jpg", "width": w, "height": h}
        by_image[image_id] = [
            {"ref_id": 10 * image_id + k, "image_id": image_id, "ann_id": 100 * image_id + k,
             "category": "person", "bbox": [1.0, 2.0, 10.0, 20.0], "rle": None,
             "sentences": [f"person {k}", "someone"], "image": meta}
            for k in range(2)
        ]
    payload = {"image_ids": [1, 2], "images_dir": str(images),
               "cache": str(tmp_path / "cache" / "requests.sqlite")}
    return by_image, payload


def _params(**overrides: Any) -> SimpleNamespace:
    base = {"backend": "hf", "model": "tiny", "device": "cpu", "per_instance": False,
            "max_attempts": 2, "max_new_tokens": 8, "batch_size": 8}
    return SimpleNamespace(**{**base, **overrides})


def _answer(ann_ids: list[int], static: bool = False) -> str:
    return json.dumps({str(a): _entry(action=None, alt=f"alt {a}") if static else
                       _entry(appearance=f"look {a}") for a in ann_ids})


def test_run_model_backend_caches_every_finished_image(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    by_image, payload = _scene(tmp_path)
    # image 1 answers at once; image 2 is malformed, then its repair is static (no action)
    gen = ScriptedGenerator([_answer([100, 101]), "nope", _answer([200, 201], static=True)])
    monkeypatch.setitem(vlm._GENERATORS, ("hf", "tiny", "cpu"), gen)
    rows, failures, counts = vlm.run_model_backend(_params(), by_image, payload)
    assert counts == {"generated": 2, "cached": 0, "failure_reasons": {}} and failures == []
    assert [len(c["requests"]) for c in gen.calls] == [2, 1]  # both images in one batch
    by_ref = {(r["ref_id"], r["view"]): r for r in rows}
    assert len(rows) == 4 * 3  # three views per referent
    assert by_ref[(10, "appearance")]["text"] == "look 100"
    assert by_ref[(10, "action")]["attempts"] == 1
    assert by_ref[(21, "appearance_alt")]["text"] == "alt 201"
    assert by_ref[(21, "spatial")]["attempts"] == 2 and (21, "action") not in by_ref
    assert {r["model"] for r in rows} == {"tiny"} and {r["backend"] for r in rows} == {"hf"}
    # the prompt names every instance with the merged sentences of its referents
    assert 'instance id "100"' in gen.calls[0]["requests"][0][1]
    # rerun: everything comes from the cache, the generator is not called (nor loaded)
    monkeypatch.delitem(vlm._GENERATORS, ("hf", "tiny", "cpu"))
    monkeypatch.setattr(vlm, "get_generator", lambda *a: pytest.fail("model loaded"))
    again = vlm.run_model_backend(_params(), by_image, payload)
    assert again[2] == {"generated": 0, "cached": 2, "failure_reasons": {}}
    assert again[0] == rows and again[1] == []
    # a generation parameter that changes the output is part of the key
    monkeypatch.setattr(vlm, "get_generator", lambda *a: ScriptedGenerator(
        [_answer([100, 101]), _answer([200, 201])]))
    assert vlm.run_model_backend(_params(max_new_tokens=9), by_image, payload)[2] == {
        "generated": 2, "cached": 0, "failure_reasons": {}}


def test_run_model_backend_records_failures(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    by_image, payload = _scene(tmp_path)
    (Path(payload["images_dir"]) / "2.jpg").unlink()
    gen = ScriptedGenerator(["garbage", "still garbage"])
    monkeypatch.setitem(vlm._GENERATORS, ("hf", "tiny", "cpu"), gen)
    rows, failures, counts = vlm.run_model_backend(_params(), by_image, payload)
    assert rows == [] and counts["generated"] == 1 and counts["cached"] == 0
    assert counts["failure_reasons"] == {"invalid": 2, "unreadable_image": 2}
    bad_output, bad_image = failures
    assert bad_output["ann_ids"] == [100, 101] and bad_output["attempts"] == 2
    assert bad_output["reason"].startswith("invalid: attempt 2: no JSON object")
    assert bad_image["image_id"] == 2
    assert bad_image["reason"].startswith("unreadable_image: cannot read image")
    # the model failure is cached (not regenerated); the unreadable image is retried
    Image.new("RGB", (40, 40)).save(Path(payload["images_dir"]) / "2.jpg")
    gen2 = ScriptedGenerator([_answer([200, 201])])
    monkeypatch.setitem(vlm._GENERATORS, ("hf", "tiny", "cpu"), gen2)
    rows, failures, counts = vlm.run_model_backend(_params(), by_image, payload)
    assert (counts["generated"], counts["cached"]) == (1, 1) and len(gen2.calls) == 1
    assert [f["image_id"] for f in failures] == [1] and {r["image_id"] for r in rows} == {2}


def test_run_model_backend_with_the_tiny_model(tmp_path: Path, tiny_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    by_image, payload = _scene(tmp_path)
    payload["image_ids"] = [2]
    monkeypatch.setenv("NEMO_WORK_DIR", str(tmp_path / "work"))
    rows, failures, counts = vlm.run_model_backend(_params(max_attempts=1), by_image, payload)
    assert counts["generated"] == 1 and rows == []  # random weights write no JSON
    assert failures[0]["attempts"] == 1
    assert re.match(r"(invalid|truncated): attempt 1: ", failures[0]["reason"])
    assert (tmp_path / "work" / ".cache" / "tiny-llava").is_dir()


def test_instances_from_refs_merges_referents_of_one_object() -> None:
    refs = [{"ann_id": 5, "category": "dog", "bbox": [0, 0, 1, 1], "sentences": ["dog", "pup"]},
            {"ann_id": 5, "category": "dog", "bbox": [0, 0, 1, 1], "sentences": ["pup", "left"]},
            {"ann_id": 6, "category": "cat", "bbox": [1, 1, 1, 1], "sentences": []}]
    insts = vlm.instances_from_refs(refs)
    assert [(i.instance_id, i.expressions) for i in insts] == [
        ("5", ["dog", "pup", "left"]), ("6", [])]


def test_check_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    vlm.check_backend("template", "anything")
    vlm.check_backend("hf", "tiny")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(InputError, match="cannot download"):
        vlm.check_backend("hf", "llava-hf/llava-1.5-7b-hf")
    with pytest.raises(InputError, match="unknown multiview backend"):
        vlm.check_backend("openai", "tiny")
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(InputError, match=r"nemo-pipe\[vllm\]"):
        vlm.check_backend("vllm", "tiny")
    assert vlm.model_key("hf", "tiny") == "hf:tiny-v1-seed0"
    local = tmp_path / "my-llava"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert vlm.model_key("vllm", str(local)) == f"vllm:{local.resolve()}"


def test_multiview_params_have_what_the_backend_reads() -> None:
    multiview = pytest.importorskip("stages.multiview")
    params = multiview.MultiviewParams()
    for name in ("backend", "model", "device", "per_instance", "max_attempts",
                 "max_new_tokens", "batch_size"):
        assert hasattr(params, name), name


# --------------------------------------------------------------------------------------------
# token budget per request, per-instance validation, truncation (issue 17)

# The template backend's views of the worst-case instance `reference_answer` uses, written out
# by hand: "baseball glove" (the longest COCO name) in purple, box centre at (540, 390) of a
# 640x480 image (bottom right), its neighbour's centre at x = 560 (so "left of"), box area
# 6.25% of the image ("medium-sized").
TEMPLATE_ENTRY = ('{"appearance": "the purple baseball glove", "action": null, "spatial": '
                  '"the baseball glove on the bottom right, left of the orange baseball glove", '
                  '"appearance_alt": "the medium-sized purple baseball glove"}')
DOG = Instance(instance_id="103", category="dog", bbox=(5, 60, 20, 20), expressions=["dog"])


def test_budget_per_request_for_1_and_8_instances_by_hand() -> None:
    one = '{"2000000": ' + TEMPLATE_ENTRY + "}"
    assert vlm.reference_answer(1) == one and len(one) == 220
    eight = "{" + ", ".join(f'"{2000000 + k}": {TEMPLATE_ENTRY}' for k in range(8)) + "}"
    assert vlm.reference_answer(8) == eight and len(eight) == 1760  # 8 x 218 + 7 x 2 + 2
    # no tokenizer: ceil(chars / 3) tokens, x 1.5 rounded up, + 32
    assert vlm.views_budget(1) == 143  # ceil(220 / 3) = 74; ceil(111.0) = 111; + 32
    assert vlm.views_budget(8) == 913  # ceil(1760 / 3) = 587; ceil(880.5) = 881; + 32
    assert vlm.views_budget(2) == 253  # 440 chars: 147 tokens; ceil(220.5) = 221; + 32
    # the tokenizer in use when there is one
    assert vlm.views_budget(1, lambda t: len(t) // 10) == 65  # 22 tokens: 33 + 32
    assert vlm.views_budget(8, lambda t: len(t) // 10) == 296  # 176 tokens: 264 + 32
    # a configured max_new_tokens is a cap, not a replacement
    assert vlm.views_budget(8, cap=384) == 384 and vlm.views_budget(1, cap=384) == 143


def test_each_request_gets_the_budget_of_the_instances_it_asks_for() -> None:
    eight = [Instance(instance_id=str(200 + k), category="dog") for k in range(8)]
    good8 = {str(200 + k): VALID["101"] for k in range(8)}
    gen = ScriptedGenerator([json.dumps(VALID), json.dumps(good8)])
    vlm.generate_views_many(gen, [(IMAGE, INSTANCES), (IMAGE, eight)])
    assert gen.calls[0]["max_new_tokens"] == [253, 913]
    capped = ScriptedGenerator([json.dumps(VALID), json.dumps(good8)])
    vlm.generate_views_many(capped, [(IMAGE, INSTANCES), (IMAGE, eight)], max_new_tokens=384)
    assert capped.calls[0]["max_new_tokens"] == [253, 384]
    # a generator with a tokenizer counts with it
    counting = ScriptedGenerator([json.dumps(VALID)])
    counting.count_tokens = lambda t: len(t) // 10  # type: ignore[attr-defined]
    generate_views(counting, IMAGE, INSTANCES)
    assert counting.calls[0]["max_new_tokens"] == [98]  # 44 tokens: 66 + 32


def test_one_bad_instance_among_good_ones_is_repaired_alone() -> None:
    dog = _entry("the small brown dog", "the dog sitting on the grass", "the dog at the bottom")
    first = {"101": VALID["101"], "102": _entry(appearance=""), "103": dog}
    gen = ScriptedGenerator([json.dumps(first), json.dumps({"102": VALID["102"]})],
                            supports_schema=True)
    views, attempts, errors, failed = generate_views(gen, IMAGE, [MAN, LADY, DOG])
    assert failed == {} and attempts == 2 and list(views) == ["101", "102", "103"]
    assert views["101"] == ViewSet(**VALID["101"]) and views["103"] == ViewSet(**dog)
    assert views["102"] == ViewSet(**VALID["102"])
    assert errors == ['attempt 1: instance "102": "appearance" must be a non-empty string']
    (repair_image, repair), = gen.calls[1]["requests"]  # one request, for the bad one only
    assert 'one key per instance id of only these instances: "102" (the other' in repair
    assert all(f'instance id "{i}"' in repair for i in ("101", "102", "103"))  # context kept
    assert gen.calls[1]["schema"][0]["required"] == ["102"]
    assert gen.calls[1]["max_new_tokens"] == [143]  # the budget of one instance
    # no attempt left: the good ones keep their views, the bad one is a failure with its reason
    gen = ScriptedGenerator([json.dumps(first)])
    views, attempts, errors, failed = generate_views(gen, IMAGE, [MAN, LADY, DOG],
                                                     max_attempts=1)
    assert list(views) == ["101", "103"]
    assert failed == {"102": 'invalid: attempt 1: instance "102": "appearance" must be a '
                             "non-empty string"}


def test_parse_views_partial_keeps_valid_entries() -> None:
    good, bad = vlm.parse_views_partial(json.dumps({"101": VALID["101"]}), IDS)
    assert list(good) == ["101"] and list(bad) == ["102"] and "missing" in bad["102"]
    # a broken object keeps its complete entries
    cut = json.dumps(VALID)[:json.dumps(VALID).index('"102"') + 12]
    good, bad = vlm.parse_views_partial("Sure: " + cut, IDS)
    assert list(good) == ["101"] and bad["102"].startswith("the answer is not valid JSON")
    # an unknown id spoils the whole answer
    good, bad = vlm.parse_views_partial(json.dumps({**VALID, "9": VALID["101"]}), IDS)
    assert good == {} and set(bad) == set(IDS)


def test_truncated_answer_is_its_own_failure_reason() -> None:
    full = json.dumps(VALID)
    cut = full[:full.index('"102"') + 20]  # 101 complete, 102 cut off
    gen = ScriptedGenerator([vlm.Answer(cut, truncated=True)])
    views, _, errors, failed = generate_views(gen, IMAGE, INSTANCES, max_attempts=1)
    assert list(views) == ["101"] and list(failed) == ["102"]
    assert failed["102"].startswith("truncated: attempt 1: the answer was cut off at its limit "
                                    "of 253 tokens")
    # the same text ending without the token limit is a malformed answer, not a truncated one
    views, _, _, failed = generate_views(ScriptedGenerator([cut]), IMAGE, INSTANCES,
                                         max_attempts=1)
    assert list(views) == ["101"] and failed["102"].startswith("invalid: attempt 1: ")
    # with an attempt left, only the missing instance is asked again, with its own budget
    gen = ScriptedGenerator([vlm.Answer(cut, truncated=True), json.dumps({"102": VALID["102"]})])
    views, attempts, _, failed = generate_views(gen, IMAGE, INSTANCES)
    assert list(views) == IDS and failed == {} and attempts == 2
    assert gen.calls[1]["max_new_tokens"] == [143]
    assert "cut off at its limit of 253 tokens" in gen.calls[1]["requests"][0][1]


def test_run_model_backend_publishes_good_instances_and_counts_truncation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_image, payload = _scene(tmp_path)
    full = _answer([100, 101])
    cut = full[:full.index('"101"') + 15]  # image 1: 100 complete, cut off in 101
    bad = json.loads(_answer([200, 201]))
    bad["201"]["spatial"] = ""  # image 2: 201 invalid
    gen = ScriptedGenerator([vlm.Answer(cut, truncated=True), json.dumps(bad)])
    monkeypatch.setitem(vlm._GENERATORS, ("hf", "tiny", "cpu"), gen)
    rows, failures, counts = vlm.run_model_backend(_params(max_attempts=1), by_image, payload)
    assert {(r["ann_id"], r["view"]) for r in rows} == {
        (a, v) for a in (100, 200) for v in ("appearance", "action", "spatial")}
    assert [(f["image_id"], f["ann_ids"], f["reason"].split(":")[0]) for f in failures] == [
        (1, [101], "truncated"), (2, [201], "invalid")]
    assert counts["failure_reasons"] == {"truncated": 1, "invalid": 1}


def test_hf_truncation_eos_and_context_cap(tiny: vlm.HFGenerator,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    req = [(IMAGE, "Describe the man.")]
    config = tiny.model.generation_config
    monkeypatch.setattr(config, "eos_token_id", None)  # never stops: every limit is reached
    before = tiny.stats.generated_tokens
    (a,) = tiny.generate(req, max_new_tokens=5)
    assert vlm.is_truncated(a) and tiny.stats.generated_tokens - before == 5
    # per-request limits in one batch: each answer is cut at its own limit
    before = tiny.stats.generated_tokens
    short, long = tiny.generate(req * 2, max_new_tokens=[2, 6], batch_size=2)
    assert tiny.stats.generated_tokens - before == 8 and short.truncated and long.truncated
    assert short == tiny.generate(req, max_new_tokens=2)[0]
    # the context caps the limit: prompt length + 3 positions leave 3 new tokens
    length = int(tiny._encode(req)["attention_mask"].sum())
    monkeypatch.setattr(tiny, "context", length + 3)
    before = tiny.stats.generated_tokens
    (c,) = tiny.generate(req, max_new_tokens=50)
    assert c.truncated and tiny.stats.generated_tokens - before == 3
    monkeypatch.setattr(tiny, "context", length)  # no room at all: empty, truncated
    assert tiny.generate(req, max_new_tokens=50) == [""] and tiny.stats.truncated >= 4
    monkeypatch.setattr(tiny, "context", None)
    # EOS within the limit: not truncated (make the model's first greedy token the EOS)
    import torch

    with torch.inference_mode():
        out = tiny.model.generate(**tiny._encode(req), max_new_tokens=1, do_sample=False,
                                  pad_token_id=tiny.tokenizer.pad_token_id)
    monkeypatch.setattr(config, "eos_token_id", int(out[0, -1]))
    (d,) = tiny.generate(req, max_new_tokens=5)
    assert d == "" and not vlm.is_truncated(d)
