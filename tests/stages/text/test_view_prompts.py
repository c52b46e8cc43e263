"""stages.text.view_prompts: the view prompt, answer parsing, budgets, and the view task in
the request loop (with scripted generators; the real tiny models are in tests/stages/models).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from llm_stand_ins import IDS, INSTANCES, LADY, MAN, VALID, ScriptedGenerator
from llm_stand_ins import view_entry as _entry
from PIL import Image

from stages.models.generation.answers import Answer
from stages.text import view_prompts as vp
from stages.text.view_prompts import (
    VIEWS,
    Instance,
    ViewParseError,
    ViewSet,
    build_prompt,
    build_repair_prompt,
    generate_views,
    json_schema,
    parse_views,
)

ROOT = Path(__file__).resolve().parents[3]

IMAGE = Image.new("RGB", (120, 90), (20, 40, 60))


# --------------------------------------------------------------------------------------------
# prompts


def test_module_imports_without_torch_or_transformers() -> None:
    code = ("import sys, stages.text.view_prompts, stages.text.distractor_prompts, "
            "stages.models.generation.engines, stages.models.generation.hf_engine, "
            "stages.models.generation.vllm_engine, stages.multiview, stages.augment; "
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
    # (real words: a lone article such as "a" is no expression, it normalises to nothing)
    assert ViewSet(appearance="red cup", action="cup falling", spatial="left cup").expressions() \
        == ["red cup", "cup falling", "left cup"]
    with pytest.raises(ValueError):
        ViewSet(appearance="red cup", spatial="left cup")


@pytest.mark.parametrize("placeholder", [
    "(none - not visible)", "N/A", "n/a", "none", "None.", "NULL", "unknown", "Unknown.",
    "not visible", "(not applicable)", "-", "...", "?", "the", "nothing",
])
@pytest.mark.parametrize("field", ["appearance", "spatial"])
def test_parse_placeholder_appearance_or_spatial_is_an_error(placeholder: str,
                                                            field: str) -> None:
    # Appearance and spatial always apply: a placeholder there is no view of the instance and
    # goes back to the model (repair) rather than into the instance's cluster.
    entry = {**VALID["101"], field: placeholder}
    views, problems = vp.parse_views_partial(json.dumps({"101": entry, "102": VALID["102"]}),
                                             IDS)
    assert list(views) == ["102"]
    assert list(problems) == ["101"]
    assert problems["101"].startswith(f'instance "101": "{field}" ')
    assert "placeholder" in problems["101"] or "non-empty" in problems["101"]


def test_parse_placeholder_action_and_alt_count_as_null() -> None:
    # action "N/A" is null, so the given alt is the third view; alt "unknown" next to a real
    # action is null too; both placeholders leave no third view: an error.
    views = parse_views(json.dumps({"101": _entry(action="N/A", alt="the man in white"),
                                    "102": _entry(alt="unknown")}), IDS)
    assert views["101"].expressions() == ["the young man with glasses", "the man on the left",
                                          "the man in white"]
    assert views["102"].expressions() == ["the young man with glasses",
                                          "the man looking at the woman", "the man on the left"]
    with pytest.raises(ViewParseError, match=r'"action" is null, so "appearance_alt"'):
        parse_views(json.dumps({"101": _entry(action="unknown", alt="(none - not visible)")}),
                    ["101"])


def test_placeholder_words_inside_an_expression_are_fine() -> None:
    # only the whole text (or its start, for "none ..."/"not visible ...") is a placeholder
    views = parse_views(json.dumps({"101": _entry(appearance="the unknown dog with no collar",
                                                  spatial="the dog with nothing next to it")}),
                        ["101"])
    assert views["101"].appearance == "the unknown dog with no collar"
    assert views["101"].spatial == "the dog with nothing next to it"
    # "static", "null" and "nil" are placeholders alone, words at the start of an expression
    views = parse_views(json.dumps({"101": _entry(appearance="static bike by the wall",
                                                  spatial="null set sign on the left")}),
                        ["101"])
    assert views["101"].appearance == "static bike by the wall"
    assert views["101"].spatial == "null set sign on the left"
    for placeholder in ("static", "Null", "nil."):
        with pytest.raises(ViewParseError, match="placeholder"):
            parse_views(json.dumps({"101": _entry(appearance=placeholder)}), ["101"])


@pytest.mark.parametrize(("entry", "field", "repeats"), [
    (_entry(action=None, appearance="the man in red", alt="the man in red"),
     "appearance_alt", "appearance"),
    (_entry(action=None, appearance="the man in red", alt="The man in red."),
     "appearance_alt", "appearance"),  # equal after normalising (case, punctuation)
    (_entry(action=None, appearance="a man in red", alt="the man  in red"),
     "appearance_alt", "appearance"),  # articles and spaces carry no identity
    (_entry(spatial="the young man with glasses"), "spatial", "appearance"),
    (_entry(action="the man on the left"), "spatial", "action"),
])
def test_parse_repeated_expression_is_an_error(entry: dict, field: str, repeats: str) -> None:
    # three views of one instance: a repeated one would leave two distinct expressions
    views, problems = vp.parse_views_partial(json.dumps({"101": entry, "102": VALID["102"]}),
                                             IDS)
    assert list(views) == ["102"]
    shown = " ".join(entry[field].split())  # as parsed: whitespace collapsed
    assert problems == {"101": f'instance "101": "{field}" repeats "{repeats}" '
                               f'({json.dumps(shown)}): the three expressions must differ'}


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
    assert vp.reference_answer(1) == one and len(one) == 220
    eight = "{" + ", ".join(f'"{2000000 + k}": {TEMPLATE_ENTRY}' for k in range(8)) + "}"
    assert vp.reference_answer(8) == eight and len(eight) == 1760  # 8 x 218 + 7 x 2 + 2
    # no tokenizer: ceil(chars / 3) tokens, x 1.5 rounded up, + 32
    assert vp.views_budget(1) == 143  # ceil(220 / 3) = 74; ceil(111.0) = 111; + 32
    assert vp.views_budget(8) == 913  # ceil(1760 / 3) = 587; ceil(880.5) = 881; + 32
    assert vp.views_budget(2) == 253  # 440 chars: 147 tokens; ceil(220.5) = 221; + 32
    # the tokenizer in use when there is one
    assert vp.views_budget(1, lambda t: len(t) // 10) == 65  # 22 tokens: 33 + 32
    assert vp.views_budget(8, lambda t: len(t) // 10) == 296  # 176 tokens: 264 + 32
    # a configured max_new_tokens is a cap, not a replacement
    assert vp.views_budget(8, cap=384) == 384 and vp.views_budget(1, cap=384) == 143


def test_each_request_gets_the_budget_of_the_instances_it_asks_for() -> None:
    eight = [Instance(instance_id=str(200 + k), category="dog") for k in range(8)]
    good8 = {str(200 + k): VALID["101"] for k in range(8)}
    gen = ScriptedGenerator([json.dumps(VALID), json.dumps(good8)])
    vp.generate_views_many(gen, [(IMAGE, INSTANCES), (IMAGE, eight)])
    assert gen.calls[0]["max_new_tokens"] == [253, 913]
    capped = ScriptedGenerator([json.dumps(VALID), json.dumps(good8)])
    vp.generate_views_many(capped, [(IMAGE, INSTANCES), (IMAGE, eight)], max_new_tokens=384)
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
    good, bad = vp.parse_views_partial(json.dumps({"101": VALID["101"]}), IDS)
    assert list(good) == ["101"] and list(bad) == ["102"] and "missing" in bad["102"]
    # a broken object keeps its complete entries
    cut = json.dumps(VALID)[:json.dumps(VALID).index('"102"') + 12]
    good, bad = vp.parse_views_partial("Sure: " + cut, IDS)
    assert list(good) == ["101"] and bad["102"].startswith("the answer is not valid JSON")
    # an unknown id spoils the whole answer
    good, bad = vp.parse_views_partial(json.dumps({**VALID, "9": VALID["101"]}), IDS)
    assert good == {} and set(bad) == set(IDS)


def test_truncated_answer_is_its_own_failure_reason() -> None:
    full = json.dumps(VALID)
    cut = full[:full.index('"102"') + 20]  # 101 complete, 102 cut off
    gen = ScriptedGenerator([Answer(cut, truncated=True)])
    views, _, errors, failed = generate_views(gen, IMAGE, INSTANCES, max_attempts=1)
    assert list(views) == ["101"] and list(failed) == ["102"]
    assert failed["102"].startswith("truncated: attempt 1: the answer was cut off at its limit "
                                    "of 253 tokens")
    # the same text ending without the token limit is a malformed answer, not a truncated one
    views, _, _, failed = generate_views(ScriptedGenerator([cut]), IMAGE, INSTANCES,
                                         max_attempts=1)
    assert list(views) == ["101"] and failed["102"].startswith("invalid: attempt 1: ")
    # with an attempt left, only the missing instance is asked again, with its own budget
    gen = ScriptedGenerator([Answer(cut, truncated=True), json.dumps({"102": VALID["102"]})])
    views, attempts, _, failed = generate_views(gen, IMAGE, INSTANCES)
    assert list(views) == IDS and failed == {} and attempts == 2
    assert gen.calls[1]["max_new_tokens"] == [143]
    assert "cut off at its limit of 253 tokens" in gen.calls[1]["requests"][0][1]

