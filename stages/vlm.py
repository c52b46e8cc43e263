"""Vision-language model helpers for multi-view referring expressions.

The `multiview` stage asks a VLM (LLaVA-1.5 by default) to describe every instance of an image
from three views -- appearance, action, spatial -- plus a second appearance expression when a
view does not apply (a parked car has no action). This module holds everything that stage needs
and that can be tested without a GPU or network:

* the prompt (task text and the three worked examples of the hard-negative notes, verbatim),
  the repair prompt sent after an unusable answer, the strict JSON answer format, its parsers
  (`parse_views_partial` per instance, `parse_views` all or nothing) and its JSON schema (for
  structured decoding);
* the token budget of a request (`views_budget`: from the instances it asks for, measured on
  the template backend's answers, capped by the model's context and an optional setting);
* `pad_to_square`: the LLaVA-1.5 preprocessing, so the processor's center crop never cuts an
  instance off the image;
* generators: `HFGenerator` (transformers, batched with left padding, greedy) and
  `VLLMGenerator` (vLLM, optional extra), whose answers say when they were cut off at their
  token limit (`Answer.truncated`), plus `generate_views`, which prompts, parses, repairs only
  the instances still without valid views, and never raises for bad model output;
* `build_tiny_llava` / `build_tiny_causal_lm`: tiny randomly initialised models built in code,
  saved with ``save_pretrained`` and loaded back with ``from_pretrained`` -- the real loading
  path -- so tests and the demo run offline in seconds (``model="tiny"``).

Nothing is ever downloaded: a hub id is used only when it is already in the local Hugging Face
cache, otherwise the user gets an `InputError` telling them to pass a local directory.

torch and transformers are imported inside functions only, so importing this module is cheap
(the pipeline imports every stage module to build its registry).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from PIL import Image, ImageStat
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pipeline.errors import InputError
from stages.hub import hf_offline

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUDGET_VERSION",
    "CLIP_MEAN_RGB",
    "DEFAULT_MODEL",
    "LLAVA_CHAT_TEMPLATE",
    "VIEWS",
    "Answer",
    "GenerationStats",
    "HFGenerator",
    "Instance",
    "TextGenerator",
    "VLLMGenerator",
    "ViewParseError",
    "ViewSet",
    "ViewsOutcome",
    "build_prompt",
    "build_repair_prompt",
    "build_tiny_causal_lm",
    "budget_for",
    "build_tiny_llava",
    "check_backend",
    "context_length",
    "estimate_tokens",
    "generate_views",
    "generate_views_many",
    "get_generator",
    "instances_from_refs",
    "is_truncated",
    "json_schema",
    "llava_prompt",
    "model_key",
    "pad_to_square",
    "parse_views",
    "parse_views_partial",
    "parse_vllm_outputs",
    "resolve_model_path",
    "run_model_backend",
    "tiny_llava_dir",
    "views_budget",
    "vllm_requests",
    "vllm_sampling_params",
    "without_leading_bos",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
VIEWS: tuple[str, ...] = ("appearance", "action", "spatial", "appearance_alt")

# LLaVA-1.5's chat template, exactly as shipped with llava-hf/llava-1.5-7b-hf
# (chat_template.json): "USER: <image>\n{prompt} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# LLaVA-1.5 pads images to a square with the CLIP normalisation mean (its `expand2square` is
# called with `tuple(int(x * 255) for x in image_processor.image_mean)`): after normalisation
# the padding is exactly zero, which is what the model saw in training.
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_MEAN_RGB: tuple[int, int, int] = tuple(int(x * 255) for x in _OPENAI_CLIP_MEAN)  # type: ignore[assignment]

_TINY_VERSION = 1  # bump when build_tiny_llava changes, so cached tiny models are rebuilt
_TINY_LOCK = threading.Lock()
_TINY_TMP: tempfile.TemporaryDirectory[str] | None = None

# --------------------------------------------------------------------------------------------
# prompt text (task text and worked examples: the hard-negative notes, verbatim)

_PERSPECTIVES = """\
following perspectives:

1. Appearance (e.g., color, shape, texture)
2. Action (e.g., doing something or interacting)
3. Spatial (e.g., position or relation to others/background)

Note:

- If a perspective is not applicable (e.g., a tree is static and has no action), provide a \
second description from another applicable view."""

_TASK_ALL = """\
You will be shown an image and a list of lists of short referring expressions that identifies \
a specific instance, for each instance in the image.

Your task is to generate 3 diverse referring expressions for each instance, based on the \
""" + _PERSPECTIVES

_TASK_ONE = """\
You will be shown an image and a list of short referring expressions that identifies a \
specific instance in the image (the target instance).

Your task is to generate 3 diverse referring expressions for the target instance, based on the \
""" + _PERSPECTIVES

_EXAMPLES = """\
Example 1:

Image Description: "A woman is adjusting a man's tie, the man is on the left side of the image."

Original Referring Expression: "woman"

Multi-view expressions:

- Appearance: "the woman with short gray hair and glasses"
- Action: "the woman adjusting the man's tie"
- Spatial: "the woman on the right side of the image"

Example 2:

Image Description: "A large tree standing alone in a field, the tree is tall with green leaves"

Original Referring Expression: "tree"

Multi-view expressions:

- Appearance: "the tall tree with a thick trunk"
- Action: (none - object is static)
- Spatial: "the tree in the center of the field"
- Alternative from "Appearance": "the tree with green leaves"

Example 3:

Image Description: "A red car parked beside a black SUV."

Original Referring Expression: "red car"

Multi-view expressions:

- Appearance: "the shiny red car with silver rims"
- Action: (none - car is parked)
- Spatial: "the car next to the black SUV"
- Alternative from "Appearance": "the car that is smaller between the two\""""

# The worked examples rendered in the answer format, so the model sees how "(none ...)" and
# "Alternative from Appearance" map to JSON. The ids are deliberately not ann-id-like.
_EXAMPLES_JSON = json.dumps(
    {
        "ex1": {
            "appearance": "the woman with short gray hair and glasses",
            "action": "the woman adjusting the man's tie",
            "spatial": "the woman on the right side of the image",
            "appearance_alt": None,
        },
        "ex2": {
            "appearance": "the tall tree with a thick trunk",
            "action": None,
            "spatial": "the tree in the center of the field",
            "appearance_alt": "the tree with green leaves",
        },
    }
)

_FORMAT = """\
Answer format: answer with STRICT JSON only -- a single JSON object, with no text before or \
after it, no code fences and no comments. It has one key per instance id {which}, and each \
maps to an object with exactly these keys:
{{"<instance_id>": {{"appearance": str, "action": str|null, "spatial": str, \
"appearance_alt": str|null}}, ...}}
- "appearance" and "spatial": non-empty strings.
- "action": what the instance is doing, or null if it does nothing (a static object).
- "appearance_alt": null when "action" is given; when "action" is null, a second, different \
appearance expression ("Alternative from Appearance").
- Every expression must refer to that instance only, not to the other instances.
For example, Examples 1 and 2 (with instance ids "ex1" and "ex2") would be answered:
{examples}"""

_CONTROL_TOKEN = re.compile(r"<\s*(/?\s*[A-Za-z_|][^<>\n]{0,40}?)\s*>")


def _clean_text(text: str) -> str:
    """Collapse whitespace and defuse ``<token>``-like strings from dataset text.

    A literal ``<image>`` in an expression would be taken as a second image placeholder by the
    processor (and ``</s>`` as end of sequence), so angle brackets around words are dropped.
    """
    text = _CONTROL_TOKEN.sub(r"\1", text)
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# instances and prompts


class Instance(BaseModel):
    """One annotated object of an image, as the prompt presents it to the model."""

    model_config = ConfigDict(frozen=True)

    instance_id: str  # e.g. the COCO ann id, as a string (the JSON answer is keyed by it)
    category: str = ""  # category name, e.g. "person"
    bbox: tuple[float, float, float, float] | None = None  # COCO [x, y, w, h], pixels
    expressions: list[str] = []  # the original referring expressions

    @field_validator("instance_id", "category", mode="before")
    @classmethod
    def _to_str(cls, value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # ann ids are ints in COCO/REFER files
        return value

    @field_validator("instance_id")
    @classmethod
    def _id_not_empty(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("instance_id must not be empty")
        return value

    @field_validator("expressions", mode="before")
    @classmethod
    def _decode_expressions(cls, value: Any) -> Any:
        # REFER / tfds files store sentences as bytes (b'left', b'Man'); accept those too.
        if isinstance(value, (str, bytes)):
            value = [value]
        if isinstance(value, Sequence):
            return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
        return value


def _square_offset(width: int, height: int) -> tuple[int, int, int]:
    """(side, left, top) of the centered square that `pad_to_square` produces."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def _describe_box(bbox: tuple[float, float, float, float],
                  image_size: tuple[int, int] | None) -> str:
    x, y, w, h = bbox
    if image_size is None:
        return f"box [x, y, w, h] = [{x:.0f}, {y:.0f}, {w:.0f}, {h:.0f}] pixels"
    # The model sees the padded square image: give the box as fractions of that square, the
    # format LLaVA-1.5 was trained on for region-level data ([x1, y1, x2, y2] in 0..1).
    side, left, top = _square_offset(*image_size)
    coords = [(x + left) / side, (y + top) / side, (x + w + left) / side, (y + h + top) / side]
    coords = [min(max(c, 0.0), 1.0) for c in coords]
    return "box [x1, y1, x2, y2] = [" + ", ".join(f"{c:.2f}" for c in coords) + "]"


def _instance_line(inst: Instance, image_size: tuple[int, int] | None) -> str:
    parts = [f"- instance id {json.dumps(inst.instance_id)}"]
    if inst.category:
        parts.append(f"category {json.dumps(_clean_text(inst.category))}")
    if inst.bbox is not None:
        parts.append(_describe_box(inst.bbox, image_size))
    exprs = [_clean_text(e) for e in inst.expressions]
    exprs = [e for e in exprs if e]
    parts.append("original referring expressions: " + json.dumps(exprs, ensure_ascii=False))
    return ", ".join(parts)


def build_prompt(instances: Sequence[Instance], per_instance: bool = False, *,
                 image_size: tuple[int, int] | None = None,
                 targets: Sequence[str] | None = None) -> str:
    """The multi-view prompt: task text, the three worked examples, the instances, the format.

    One prompt covers every instance of the image (the default: the model sees all of them at
    once, so it can write expressions that tell them apart). With ``per_instance=True`` the
    first instance is the target and the others are listed as context only; the answer then
    covers the target alone.

    `image_size` is the (width, height) of the original image; when given, boxes are written as
    fractions of the padded square image the model actually sees (see `pad_to_square`),
    otherwise as COCO pixel boxes.

    `targets` (one-prompt mode): the ids the answer must cover, when only some instances still
    need views (a repair after a partly valid answer); every instance is still listed, so the
    model can tell them apart, but the format line asks for the targets only.
    """
    if not instances:
        raise ValueError("build_prompt needs at least one instance")
    ids = [inst.instance_id for inst in instances]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate instance ids in {ids}")
    if per_instance:
        target, others = instances[0], instances[1:]
        lines = ["The target instance:", _instance_line(target, image_size)]
        if others:
            lines += ["", "Other instances in the image (context only, do not describe them):"]
            lines += [_instance_line(o, image_size) for o in others]
        which = f"(only the target instance, {json.dumps(target.instance_id)})"
        task = _TASK_ONE
    else:
        lines = ["The instances in the image:"]
        lines += [_instance_line(inst, image_size) for inst in instances]
        which = "listed above (every one of them, and no others)"
        if targets is not None and list(targets) != ids:
            unknown = [t for t in targets if t not in ids]
            if unknown or not targets:
                raise ValueError(f"targets {list(targets)} must be some of the ids {ids}")
            which = ("of only these instances: " + ", ".join(json.dumps(t) for t in targets)
                     + " (the other instances are done: do not include them)")
        task = _TASK_ALL
    fmt = _FORMAT.format(which=which, examples=_EXAMPLES_JSON)
    return "\n\n".join([task, _EXAMPLES, "\n".join(lines), fmt])


_MAX_ECHO_CHARS = 3000


def build_repair_prompt(previous_output: str, error_message: str,
                        instances: Sequence[Instance], per_instance: bool = False, *,
                        image_size: tuple[int, int] | None = None,
                        targets: Sequence[str] | None = None) -> str:
    """The prompt again, plus the rejected answer and why it was rejected.

    Each request is independent (no chat history is kept across batches), so the full task is
    repeated; the previous answer is truncated so a runaway output cannot blow up the prompt.
    `targets`: the instances whose entries were unusable (see `build_prompt`); the valid ones
    are kept and not asked for again.
    """
    previous = previous_output.strip()
    if len(previous) > _MAX_ECHO_CHARS:
        previous = previous[:_MAX_ECHO_CHARS] + " ...[truncated]"
    return "\n\n".join([
        build_prompt(instances, per_instance, image_size=image_size, targets=targets),
        "Your previous answer was:\n<<<\n" + _clean_text_keep_lines(previous) + "\n>>>",
        f"It could not be used: {error_message}",
        "Answer again with the corrected JSON object only.",
    ])


def _clean_text_keep_lines(text: str) -> str:
    return _CONTROL_TOKEN.sub(r"\1", text)


# --------------------------------------------------------------------------------------------
# parsing the answer

_NONE_LIKE = re.compile(
    r"^\(?\s*(none|null|nil|n/?a|not applicable|no action|static)\b.*$", re.IGNORECASE | re.DOTALL
)


class ViewParseError(ValueError):
    """The model's answer cannot be used; the message is written for the repair prompt."""


class ViewSet(BaseModel):
    """The multi-view expressions of one instance.

    `action` is None for an instance that does nothing, and then `appearance_alt` (a second
    appearance expression) takes its place: exactly one of the two is set, so every instance
    gets exactly three expressions for its cluster.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    appearance: str
    action: str | None = None
    spatial: str
    appearance_alt: str | None = None

    @field_validator("appearance", "spatial")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("action", "appearance_alt")
    @classmethod
    def _none_like(cls, value: str | None) -> str | None:
        # Models often echo the examples' "(none - object is static)" instead of null.
        if value is None:
            return None
        value = " ".join(value.split())
        return None if not value or _NONE_LIKE.match(value) else value

    @model_validator(mode="after")
    def _one_of_action_or_alt(self) -> ViewSet:
        if self.action is None and self.appearance_alt is None:
            raise ValueError('"action" is null, so "appearance_alt" (a second appearance '
                             "expression) is required")
        if self.action is not None and self.appearance_alt is not None:
            raise ValueError('both "action" and "appearance_alt" are set: "appearance_alt" is '
                             'only for instances with no action (set it to null)')
        return self

    def expressions(self) -> list[str]:
        """The three expressions of the cluster, in VIEWS order."""
        return [v for v in (self.appearance, self.action, self.spatial, self.appearance_alt)
                if v is not None]


def _json_candidates(text: str) -> Iterator[dict[str, Any] | json.JSONDecodeError]:
    """Every JSON object that starts at a ``{`` of `text`, in order (errors included)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError as exc:
            yield exc
            continue
        if isinstance(obj, dict):
            yield obj


def _partial_object(text: str, start: int) -> dict[str, Any]:
    """The complete ``"key": value`` pairs of the JSON object opening at `start`, in order, up
    to where it breaks off (a cut-off answer, or a syntax error further on)."""
    decoder = json.JSONDecoder()
    space = re.compile(r"\s*")
    out: dict[str, Any] = {}
    i = start + 1
    while True:
        i = space.match(text, i).end()  # type: ignore[union-attr]
        if not text.startswith('"', i):
            return out
        try:
            key, i = decoder.raw_decode(text, i)
            i = space.match(text, i).end()  # type: ignore[union-attr]
            if not text.startswith(":", i):
                return out
            value, i = decoder.raw_decode(text, space.match(text, i + 1).end())  # type: ignore[union-attr]
        except json.JSONDecodeError:
            return out
        out[key] = value
        i = space.match(text, i).end()  # type: ignore[union-attr]
        if not text.startswith(",", i):
            return out
        i += 1


def _extract_answer(text: str, instance_ids: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """The answer object in `text`, tolerating code fences and prose around it, and whether it
    is only the salvaged part of a broken object (then the JSON error, for the message).

    The first decodable object that has an instance id as a key wins, so a brace in leading
    prose or an inner object of a truncated answer is not mistaken for the answer; failing
    that, the complete entries of a broken answer object (cut off at the token limit, or a
    syntax error after some instances), so valid instances keep their views; failing that, the
    first decodable object (its keys will be reported as wrong).
    """
    wanted = set(instance_ids)
    first_obj: dict[str, Any] | None = None
    first_err: json.JSONDecodeError | None = None
    for cand in _json_candidates(text):
        if isinstance(cand, json.JSONDecodeError):
            first_err = first_err or cand
            continue
        if wanted & set(cand):
            return cand, None
        if first_obj is None:
            first_obj = cand
    if first_obj is not None and first_err is None:
        return first_obj, None
    if first_err is not None:
        message = (
            f"the answer is not valid JSON ({first_err.msg} at line {first_err.lineno} column "
            f"{first_err.colno}); write one complete JSON object with double-quoted keys and "
            "strings, null for missing values, and no trailing commas"
        )
        best: dict[str, Any] = {}
        for match in re.finditer(r"\{", text):
            part = _partial_object(text, match.start())
            if len(wanted & set(part)) > len(wanted & set(best)):
                best = part
        if best:
            return best, message
        raise ViewParseError(message)
    raise ViewParseError("no JSON object found in the answer; answer with a single JSON object "
                         "keyed by instance id")


def _format_validation(iid: str, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is missing"
        out.append(f'instance "{iid}": ' + (f'"{where}" {msg}' if where else msg))
    return out


def join_problems(problems: Iterable[str]) -> str:
    """One message from per-instance problems: each distinct one once, at most 8."""
    unique = list(dict.fromkeys(problems))
    more = f" (and {len(unique) - 8} more problems)" if len(unique) > 8 else ""
    return "; ".join(unique[:8]) + more


def parse_views_partial(text: str, instance_ids: Sequence[str],
                        ) -> tuple[dict[str, ViewSet], dict[str, str]]:
    """Validate a model answer per instance: ``(views, problems)``.

    `views` holds the instances whose entries are valid ViewSets, `problems` maps every other
    id of `instance_ids` to why (in words the repair prompt can pass back to the model). One
    bad entry does not spoil the others: an answer with a valid entry for instance A and an
    empty appearance for B gives A's views and a problem for B only; a broken or cut-off JSON
    object keeps its complete entries. The whole answer is rejected (every id gets the same
    problem) when it has no usable JSON object at all, or when it has an id the prompt did not
    list: the model then confused or invented instances, so its other entries may be attached
    to the wrong objects too (the JSON schema used for structured decoding forbids extra ids as
    well, so both backends accept exactly the same answers). Extra keys inside an instance's
    object are ignored (harmless).
    """
    ids = [str(i) for i in instance_ids]
    try:
        data, broken = _extract_answer(text, ids)
    except ViewParseError as exc:
        return {}, dict.fromkeys(ids, str(exc))
    problems: dict[str, str] = {}
    missing = [i for i in ids if i not in data]
    if missing:
        names = ", ".join(f'"{i}"' for i in missing)
        message = (f"{broken}; it has no complete entry for instance(s) {names}" if broken else
                   f"missing instance(s) {names}: the answer needs an entry for every "
                   "instance id")
        problems.update(dict.fromkeys(missing, message))
    views: dict[str, ViewSet] = {}
    for iid in ids:
        if iid not in data:
            continue
        entry = data[iid]
        if not isinstance(entry, dict):
            problems[iid] = (f'instance "{iid}": expected an object with keys '
                             f"{', '.join(VIEWS)}, got {type(entry).__name__}")
            continue
        try:
            views[iid] = ViewSet.model_validate(entry)
        except ValidationError as exc:
            problems[iid] = "; ".join(_format_validation(iid, exc))
    problems = {i: problems[i] for i in ids if i in problems}
    known = set(ids)
    unknown = [k for k in data if k not in known]
    if unknown:
        message = ("unknown instance id(s) " + ", ".join(json.dumps(k) for k in unknown)
                   + "; use only the ids " + ", ".join(f'"{i}"' for i in ids))
        return {}, dict.fromkeys(ids, join_problems([message, *problems.values()]))
    return views, problems


def parse_views(text: str, instance_ids: Sequence[str]) -> dict[str, ViewSet]:
    """Validate a model answer: ``{instance_id: ViewSet}`` for exactly `instance_ids`.

    All or nothing (`parse_views_partial` keeps the valid instances of a partly bad answer):
    raises `ViewParseError` listing every problem (missing instance, empty expression, ...)
    in words the repair prompt can pass back to the model.
    """
    views, problems = parse_views_partial(text, instance_ids)
    if problems:
        raise ViewParseError(join_problems(problems.values()))
    return views


def json_schema(instance_ids: Sequence[str]) -> dict[str, Any]:
    """JSON schema of the answer, for structured (guided) decoding.

    Kept to the subset every guided-decoding backend supports (no oneOf / if-then): the
    "exactly one of action / appearance_alt" rule is checked by `parse_views` afterwards.
    Properties are listed in VIEWS order, which is the order constrained decoders emit them.
    """
    text = {"type": "string", "minLength": 1}
    nullable = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]}
    view = {
        "type": "object",
        "properties": {"appearance": text, "action": nullable, "spatial": text,
                       "appearance_alt": nullable},
        "required": list(VIEWS),
        "additionalProperties": False,
    }
    ids = [str(i) for i in instance_ids]
    return {
        "type": "object",
        "properties": {i: view for i in ids},
        "required": ids,
        "additionalProperties": False,
    }


# --------------------------------------------------------------------------------------------
# images


def pad_to_square(image: Image.Image,
                  fill: tuple[int, int, int] | Literal["average"] | None = None,
                  ) -> tuple[Image.Image, tuple[int, int]]:
    """Pad to a centered square; return ``(square_image, (left, top))`` offset of the original.

    CLIP-style processors resize the short side and center-crop, which would cut off instances
    near the long edges (the model would then be asked about objects it cannot see). LLaVA-1.5
    pads to a square first (`expand2square`), with the CLIP normalisation mean as fill: that is
    the default here (`CLIP_MEAN_RGB`; `HFGenerator` passes its own processor's mean).
    ``fill="average"`` uses the picture's own average colour instead; or pass an RGB tuple.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if fill is None:
        color: tuple[int, ...] = CLIP_MEAN_RGB
    elif fill == "average":
        color = tuple(int(round(c)) for c in ImageStat.Stat(image).mean[:3])
    else:
        color = tuple(int(c) for c in fill)
    width, height = image.size
    side, left, top = _square_offset(width, height)
    if width == height:
        return image, (0, 0)
    canvas = Image.new("RGB", (side, side), color)  # type: ignore[arg-type]
    canvas.paste(image, (left, top))
    return canvas, (left, top)


# --------------------------------------------------------------------------------------------
# tiny models (built in code; the real save_pretrained / from_pretrained path)

_TOKENIZER_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_IMAGE_TOKEN = "<image>"
_CAUSAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% else %}{{ message['role'].upper() + ': ' + message['content'] + ' ' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: the prompt itself, answers and JSON punctuation."""
    example = Instance(instance_id="123", category="person", bbox=(1, 2, 3, 4),
                       expressions=["left", "man", "Man"])
    answer = json.dumps({"123": {"appearance": "the man in a white shirt", "action": None,
                                 "spatial": "the man on the left", "appearance_alt": "x"}})
    return [
        build_prompt([example]), build_prompt([example], per_instance=True), answer,
        _EXAMPLES_JSON, "USER: ASSISTANT: SYSTEM: {}[]\":,.0123456789 null true false",
        "the man woman person car tree dog cat left right front back middle top bottom",
    ]


def _build_tokenizer(image_token: bool) -> Any:
    """A small byte-level BPE (any text encodes; decoding round-trips) with Llama's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _TOKENIZER_SPECIALS + ([_IMAGE_TOKEN] if image_token else [])
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer)
    # Like Llama: prepend <s> to every encoded text (the LLaVA template has no bos_token).
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    kwargs: dict[str, Any] = {}
    if image_token:
        # Registers `tokenizer.image_token`, which LlavaProcessor reads.
        kwargs["extra_special_tokens"] = {"image_token": _IMAGE_TOKEN}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", **kwargs,
    )


def _tiny_llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for a random init without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_llava(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random LLaVA (model + processor) to `out_dir`; deterministic for a seed.

    Same architecture and files as llava-1.5-7b-hf, scaled down: CLIP vision tower (32 px,
    8 px patches -> 16 image tokens, 2 layers, hidden 32), Llama text model (hidden 64, 2
    layers), a byte-level BPE tokenizer with ``<image>``, a CLIPImageProcessor, LLaVA-1.5's
    chat template, all combined in a LlavaProcessor.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out_dir = Path(out_dir)
    tokenizer = _build_tokenizer(image_token=True)
    image_size, patch = 32, 8
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )
    n_image_tokens = (image_size // patch) ** 2  # CLS dropped by the "default" strategy
    config = LlavaConfig(
        vision_config=vision, text_config=_tiny_llama_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN),
        image_seq_length=n_image_tokens, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    with _seeded(seed):
        model = LlavaForConditionalGeneration(config)
    model.generation_config.do_sample = False
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_causal_lm(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama causal LM + tokenizer with a chat template to `out_dir`.

    For the text-augmentation stage's tests (attribute substitution, negation, ...), which use
    a text-only model through the same from_pretrained / apply_chat_template path.
    """
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = _build_tokenizer(image_token=False)
    tokenizer.chat_template = _CAUSAL_CHAT_TEMPLATE
    with _seeded(seed):
        model = LlamaForCausalLM(_tiny_llama_config(tokenizer))
    model.generation_config.do_sample = False
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _tiny_root(cache_dir: Path | None) -> Path:
    global _TINY_TMP
    if cache_dir is not None:
        return Path(cache_dir)
    work = os.environ.get("NEMO_WORK_DIR")
    if work:
        return Path(work) / ".cache" / "tiny-llava"
    with _TINY_LOCK:
        if _TINY_TMP is None:
            _TINY_TMP = tempfile.TemporaryDirectory(prefix="nemo-tiny-llava-")
        return Path(_TINY_TMP.name)


def build_once(root: Path, name: str, build: Callable[[Path], Any]) -> Path:
    """`root/name` built by `build(dir)` on first use, in a private directory renamed into
    place, so concurrent processes never see (or load) a half-written model."""
    final = root / name
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / f".build-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(scratch)
        try:
            os.rename(scratch, final)
        except OSError:
            if not (final / "config.json").is_file():  # not "someone else won the race"
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def tiny_llava_dir(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny LLaVA's directory, built on first use.

    Lives in `cache_dir`, else ``$NEMO_WORK_DIR/.cache/tiny-llava``, else a temp dir removed at
    exit.
    """
    return build_once(_tiny_root(cache_dir), f"v{_TINY_VERSION}-seed{seed}",
                      lambda d: build_tiny_llava(d, seed=seed))


# --------------------------------------------------------------------------------------------
# model resolution (offline)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model: str, *, cache_dir: Path | None = None,
                       seed: int = 0) -> tuple[Path, str | None]:
    """A local directory for `model` and its hub revision (None when not from the hub cache).

    `model` is ``"tiny"`` (built locally), a local directory, or a hub id already in the local
    Hugging Face cache. Anything else is an `InputError` raised at once: the pipeline runs
    offline and never tries (and waits for) the network.
    """
    name = str(model).strip()
    if name.lower() == "tiny":
        return tiny_llava_dir(cache_dir, seed), None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model directory {str(path)!r} has no config.json: pass a "
                             "directory written by save_pretrained (model + processor)")
        return path.resolve(), None
    if not _HUB_ID.match(name) or path.exists():
        raise InputError(f"model {name!r}: no such directory (pass a local model directory, "
                         "a Hugging Face id already in the local cache, or 'tiny')")
    from huggingface_hub import constants, snapshot_download

    try:
        with hf_offline():
            snapshot = Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, or anything else from a partial cache
        raise InputError(
            f"model {name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "and this offline pipeline cannot download it; pass a local directory instead "
            "(e.g. --set multiview.model=/models/llava-1.5-7b-hf, made with `hf download "
            f"{name} --local-dir /models/llava-1.5-7b-hf` on a machine with network) "
            f"[{type(exc).__name__}]"
        ) from None
    if not (snapshot / "config.json").is_file():
        raise InputError(f"the cached snapshot of {name!r} ({snapshot}) has no config.json: "
                         "the download was incomplete; pass a complete local directory")
    return snapshot, snapshot.name


def _resolve_device(device: str) -> torch.device:
    import torch

    text = str(device).strip().lower()
    if text in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but CUDA is not available; use "
                             "'cpu' or 'auto'")
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise InputError(
                f"device {device!r} is not valid: use auto, cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} does not exist ({torch.cuda.device_count()} "
                             "CUDA devices)")
        return dev
    raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA when supported, else fp16 on CUDA; fp32 on CPU (no fast half there)."""
    import torch

    text = str(dtype).strip().lower()
    if text in ("", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if text not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[text])


def load_local_pretrained(what: str, model: str, path: Path, processor_cls: Any,
                          model_cls: Any, dtype: Any, device: Any) -> tuple[Any, Any]:
    """(processor or tokenizer, model in eval mode) from a resolved local dir, offline, for
    left-padded batched generation; a load failure is an InputError naming `what` and both
    the model and the dir."""
    try:
        with hf_offline():
            processor = processor_cls.from_pretrained(path)
            # device_map loads the weights straight onto the device (no CPU copy first)
            net = model_cls.from_pretrained(path, dtype=dtype, device_map=str(device))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load {what} {model!r} from {path}: {exc}") from exc
    net.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # a decoder continues from each row's last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor, net


# --------------------------------------------------------------------------------------------
# generators

Request = tuple[Image.Image, str]


class Answer(str):
    """A generated text that also says whether it was cut off at its token limit.

    vLLM reports ``finish_reason == "length"``; for transformers ``generate`` it is an answer
    that reached its `max_new_tokens` without writing EOS. A plain ``str`` (e.g. from a
    scripted test generator) counts as not truncated: see `is_truncated`.
    """

    truncated: bool

    def __new__(cls, text: str = "", truncated: bool = False) -> Answer:
        obj = super().__new__(cls, text)
        obj.truncated = bool(truncated)
        return obj


def is_truncated(text: str) -> bool:
    """Was this answer cut off at its token limit (an `Answer` that says so)?"""
    return bool(getattr(text, "truncated", False))


class TextGenerator(Protocol):
    """What `generate_views` needs: one answer per (image, prompt), in order.

    `max_new_tokens` is one limit for all requests or one per request; answers may be
    `Answer`s that say whether they were cut off at that limit.
    """

    def generate(self, requests: list[Request], max_new_tokens: int | Sequence[int] = 256,
                 batch_size: int = 8) -> list[str]: ...


# -- token budget of an answer ---------------------------------------------------------------
# A request's max_new_tokens follows what it asks for: the tokens of a reference answer of
# the same size (the template backend's views of a worst-case instance, written as the JSON the
# prompt asks for, with the tokenizer in use), times ANSWER_MARGIN, plus ANSWER_SLACK. Measured
# with the tiny BPE and the character estimate, an instance entry is 60-75 tokens; LLaVA's
# expressions run longer than the template's (the worked examples' appearance is 42 characters
# against the template's 25) and an answer may be pretty-printed (newlines and indentation), so
# 1.5x; the slack covers a code fence, a short preamble and EOS. Without a tokenizer,
# CHARS_PER_TOKEN estimates: Llama's tokenizer writes this JSON at about 3.3 characters per
# token, 3 errs on the long side. The model's context (minus the prompt) and a configured
# max_new_tokens cap it; nothing else does.
ANSWER_MARGIN = 1.5
ANSWER_SLACK = 32
CHARS_PER_TOKEN = 3.0
BUDGET_VERSION = 1  # bump when the budget rule changes: part of the request-cache keys


def estimate_tokens(text: str) -> int:
    """Tokens of `text` without a tokenizer: one per CHARS_PER_TOKEN characters, rounded up."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def budget_for(reference: str, count_tokens: Callable[[str], int] | None = None,
               cap: int | None = None) -> int:
    """max_new_tokens for an answer like `reference`: its tokens (`count_tokens`, else
    `estimate_tokens`) x ANSWER_MARGIN + ANSWER_SLACK, at most `cap` when given.
    Shared by the view and the distractor generators."""
    count = count_tokens or estimate_tokens
    budget = math.ceil(ANSWER_MARGIN * count(reference)) + ANSWER_SLACK
    return min(budget, int(cap)) if cap is not None else budget


def reference_answer(n_instances: int) -> str:
    """The JSON answer for `n_instances` that the budget is measured on: each entry is the
    template backend's views (`stages.multiview.template_views`) of a worst-case instance -- a
    7-digit COCO ann id, the longest COCO category name and colour words, a position with both
    a vertical and a side word, a neighbour -- written like the prompt's example answer."""
    from stages.multiview import template_views

    image = {"width": 640, "height": 480}
    cat = "baseball glove"
    neighbour = {"ann_id": 1, "category": cat, "bbox": [500.0, 20.0, 120.0, 90.0],
                 "image": image}
    inst = {"ann_id": 2, "category": cat, "bbox": [460.0, 330.0, 160.0, 120.0], "image": image}
    entry = template_views(inst, [neighbour], "purple", {1: "orange"})
    return json.dumps({str(2_000_000 + k): entry for k in range(n_instances)})


def views_budget(n_instances: int, count_tokens: Callable[[str], int] | None = None,
                 cap: int | None = None) -> int:
    """max_new_tokens of a request whose answer covers `n_instances` (see `budget_for`)."""
    return budget_for(reference_answer(max(1, n_instances)), count_tokens, cap)


def _per_request(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    if isinstance(max_new_tokens, int):
        return [int(max_new_tokens)] * n
    budgets = [int(b) for b in max_new_tokens]
    if len(budgets) != n:
        raise ValueError(f"{len(budgets)} max_new_tokens for {n} requests")
    return budgets


def context_length(model: Any) -> int | None:
    """The model's context (positions) from its config (LLaVA: its text model's), or None."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


@dataclass
class GenerationStats:
    """Running totals, for the stage's log line and its benchmark (tokens/s)."""

    requests: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    truncated: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def _eos_ids(model: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


def greedy_generate(model: Any, tokenizer: Any, inputs: Any,
                    max_new_tokens: int | Sequence[int], stats: GenerationStats, torch: Any,
                    pad_id: int, context: int | None = None) -> list[Answer]:
    """One greedy `generate` call on a left-padded batch: only the new text, stripped, and the
    call's requests, tokens and seconds added to `stats` (shared by the VLM and LLM backends).

    `max_new_tokens` is one limit or one per row; each row's limit is also capped by
    `context` minus its prompt length. The call generates up to the largest limit; a row's
    answer is cut at its own limit (greedy decoding: the same tokens as a call with that
    limit) and is `truncated` when no EOS came within it.
    """
    n = int(inputs["input_ids"].shape[0])
    budgets = _per_request(max_new_tokens, n)
    if context is not None:
        lengths = [int(x) for x in inputs["attention_mask"].sum(dim=1).tolist()]
        budgets = [max(0, min(b, context - length)) for b, length in zip(budgets, lengths,
                                                                           strict=True)]
    limit = max(budgets, default=0)
    t0 = time.perf_counter()
    if limit > 0:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=limit, do_sample=False,
                                 num_beams=1, pad_token_id=pad_id)
        rows = out[:, inputs["input_ids"].shape[1]:].tolist()
    else:  # every prompt fills the context: nothing can be generated
        rows = [[] for _ in range(n)]
    stats.seconds += time.perf_counter() - t0
    stats.batches += 1
    stats.requests += n
    stats.prompt_tokens += int(inputs["attention_mask"].sum())
    eos = _eos_ids(model)
    answers = []
    for row, budget in zip(rows, budgets, strict=True):
        row = row[:budget]
        stop = next((k for k, tok in enumerate(row) if tok in eos), None)
        tokens = row if stop is None else row[:stop]
        stats.generated_tokens += len(tokens) + (stop is not None)
        stats.truncated += stop is None
        answers.append(Answer(tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                              truncated=stop is None))
    return answers


def llava_prompt(prompt: str) -> str:
    """LLaVA-1.5's chat format for one user turn with one image (what its template renders)."""
    return f"USER: {_IMAGE_TOKEN}\n{prompt} ASSISTANT:"


def _conversation(image: Image.Image | None, prompt: str) -> list[dict[str, Any]]:
    block: dict[str, Any] = {"type": "image"}
    if image is not None:
        block["image"] = image
    content: list[dict[str, Any]] = [block]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


class HFGenerator:
    """Greedy batched generation with a transformers image-text-to-text model.

    Batches are LEFT padded (a decoder-only model continues from the last position of each row,
    which must be the prompt's last token, not a pad), images are padded to a square, the
    model's own chat template is applied through its processor, and only the new tokens are
    decoded.
    """

    supports_schema = False  # no structured decoding here: parse_views + repair instead

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
                 *, cache_dir: Path | None = None, seed: int = 0) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_name = model
        self.path, self.revision = resolve_model_path(model, cache_dir=cache_dir, seed=seed)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.processor, self.model = load_local_pretrained(
            "model", model, self.path, AutoProcessor, AutoModelForImageTextToText, self.dtype,
            self.device)
        self.tokenizer = self.processor.tokenizer
        if getattr(self.processor, "chat_template", None) is None:
            log.warning("%s has no chat template; using LLaVA-1.5's", model)
            self.processor.chat_template = LLAVA_CHAT_TEMPLATE
        mean = getattr(getattr(self.processor, "image_processor", None), "image_mean", None)
        self.fill: tuple[int, int, int] = (
            tuple(int(x * 255) for x in mean[:3]) if mean else CLIP_MEAN_RGB  # type: ignore[assignment]
        )
        self.stats = GenerationStats()
        self.context = context_length(self.model)
        self._torch = torch

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` with this model's tokenizer (no special tokens): answer budgets."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict[str, Any]:
        """JSON-able identity, for manifests and cache keys."""
        return {"backend": "hf", "model": self.model_name, "path": str(self.path),
                "revision": self.revision, "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device)}

    def format_prompt(self, prompt: str) -> str:
        """The chat-formatted text for one (image, prompt) request, image placeholder included."""
        return self.processor.apply_chat_template(_conversation(None, prompt),
                                                  add_generation_prompt=True)

    def _encode(self, batch: Sequence[Request]) -> Any:
        conversations = [_conversation(pad_to_square(img, self.fill)[0], text)
                         for img, text in batch]
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True},
        )
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _run(self, requests: Sequence[Request], batch_size: int,
             step: Callable[[Any, list[int]], list[Any]]) -> list[Any]:
        """Apply `step(inputs, request indices)` to batches of similar prompt length; results
        in request order."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        # Sorting by prompt length keeps padding (wasted compute) low; order is restored.
        order = sorted(range(len(requests)), key=lambda i: len(requests[i][1]))
        results: list[Any] = [None] * len(requests)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            results_ = step(self._encode([requests[i] for i in idx]), idx)
            for i, res in zip(idx, results_, strict=True):
                results[i] = res
        return results

    def generate(self, requests: list[Request], max_new_tokens: int | Sequence[int] = 256,
                 batch_size: int = 8) -> list[Answer]:
        """One greedy answer per (image, prompt), in order; only the new text is returned.

        `max_new_tokens`: one limit or one per request, each capped by the model's context
        minus the request's prompt; an answer that hits its limit is `truncated`.
        """
        torch = self._torch
        pad_id = self.tokenizer.pad_token_id
        budgets = _per_request(max_new_tokens, len(requests))

        def step(inputs: Any, idx: list[int]) -> list[Answer]:
            return greedy_generate(self.model, self.tokenizer, inputs,
                                   [budgets[i] for i in idx], self.stats, torch, pad_id,
                                   self.context)

        return self._run(requests, batch_size, step)

    def first_step_logits(self, requests: list[Request], batch_size: int = 8) -> torch.Tensor:
        """Logits of the first generated position, one row per request (float32, CPU).

        Computed by `generate` itself (``output_logits``), i.e. with its own attention mask
        and position ids; used to check that batching (left padding) does not change results.
        """
        torch = self._torch

        def step(inputs: Any, idx: list[int]) -> list[torch.Tensor]:
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs, max_new_tokens=1, do_sample=False, num_beams=1,
                    pad_token_id=self.tokenizer.pad_token_id, output_logits=True,
                    return_dict_in_generate=True,
                )
            return list(out.logits[0].float().cpu())

        return torch.stack(self._run(requests, batch_size, step))


# --------------------------------------------------------------------------------------------
# vLLM (optional): request building and output parsing work without vLLM installed


def vllm_requests(requests: Sequence[Request],
                  schema: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
                  *, max_new_tokens: int | Sequence[int] = 256,
                  format_prompt: Callable[[str], str] = llava_prompt,
                  image_keys: Sequence[Hashable] | None = None,
                  fill: tuple[int, int, int] | Literal["average"] | None = None,
                  ) -> list[dict[str, Any]]:
    """Build vLLM ``LLM.generate`` inputs and sampling parameters as plain dicts.

    Each item is ``{"index": i, "inputs": {"prompt": text, "multi_modal_data": {"image": img}},
    "sampling_params": {...}}``, where `index` is the position in `requests`. Requests of the
    same image are made adjacent (first-appearance order, stable within an image) so vLLM's
    prefix cache reuses the image tokens, which come first in LLaVA's prompt. Images are
    grouped by `image_keys` (e.g. image ids) or else by object identity, and padded to a
    square once per image. `schema` is one JSON schema for all requests or one per request
    (None: free text); it goes under ``"structured_outputs": {"json": schema}`` (vLLM >= 0.10.2
    naming; `vllm_sampling_params` converts for older versions). `max_new_tokens` is one limit
    or one per request (``max_tokens``).
    """
    n = len(requests)
    budgets = _per_request(max_new_tokens, n)
    keys = list(image_keys) if image_keys is not None else [id(img) for img, _ in requests]
    if len(keys) != n:
        raise ValueError(f"{len(keys)} image_keys for {n} requests")
    if schema is None or isinstance(schema, Mapping):
        schemas: list[Mapping[str, Any] | None] = [schema] * n
    else:
        schemas = list(schema)
        if len(schemas) != n:
            raise ValueError(f"{len(schemas)} schemas for {n} requests")
    first_seen: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        first_seen.setdefault(key, i)
    order = sorted(range(n), key=lambda i: (first_seen[keys[i]], i))
    padded: dict[Hashable, Image.Image] = {}
    out = []
    for i in order:
        image, text = requests[i]
        if keys[i] not in padded:
            padded[keys[i]] = pad_to_square(image, fill)[0]
        params: dict[str, Any] = {"temperature": 0.0, "max_tokens": budgets[i]}
        if schemas[i] is not None:
            params["structured_outputs"] = {"json": dict(schemas[i])}  # type: ignore[arg-type]
        out.append({
            "index": i,
            "inputs": {"prompt": format_prompt(text),
                       "multi_modal_data": {"image": padded[keys[i]]}},
            "sampling_params": params,
        })
    return out


def parse_vllm_outputs(outputs: Sequence[Any],
                       stats: GenerationStats | None = None) -> list[Answer]:
    """Texts of vLLM ``RequestOutput``-like objects (``.outputs[0].text``), in order, as
    `Answer`s: truncated when ``.outputs[0].finish_reason == "length"`` (the max_tokens limit
    or the model's context was reached before the answer ended).

    Token counts (``.outputs[0].token_ids``, ``.prompt_token_ids``) go into `stats` when given,
    for tokens/s. A request with no completion yields "" (parse_views then reports it).
    """
    texts = []
    for out in outputs:
        completions = getattr(out, "outputs", None) or []
        first = completions[0] if completions else None
        text = (getattr(first, "text", "") or "").strip() if first is not None else ""
        truncated = getattr(first, "finish_reason", None) == "length"
        texts.append(Answer(text, truncated=truncated))
        if stats is not None:
            stats.requests += 1
            stats.truncated += truncated
            stats.prompt_tokens += len(getattr(out, "prompt_token_ids", None) or [])
            if first is not None:
                stats.generated_tokens += len(getattr(first, "token_ids", None) or [])
    return texts


def without_leading_bos(text: str, tokenizer: Any) -> str:
    """`text` without a BOS its chat template wrote, when the tokenizer adds one itself.

    vLLM tokenizes a text prompt with the tokenizer's special tokens, so a template that writes
    BOS (``{{ bos_token }}...``) would give the model two; LLaVA-1.5's template writes none
    and is unchanged.
    """
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None or not text.startswith(bos):
        return text
    adds_bos = tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos_id]
    return text[len(bos):] if adds_bos else text


_VLLM_HINT = ("vLLM is not installed: pip install nemo-pipe[vllm] (quoted in zsh: "
              "'nemo-pipe[vllm]'); it needs a CUDA GPU and pins its own torch, so use a separate "
              "environment. Or use the hf backend (multiview.backend=hf)")


def vllm_sampling_params(vllm: Any, params: Mapping[str, Any]) -> Any:
    """vLLM SamplingParams from a plain dict, with the JSON schema under whichever name the
    installed vLLM uses: ``SamplingParams(structured_outputs=StructuredOutputsParams(json=...))``
    from vLLM 0.10.2 (vllm-project/vllm#22772), ``SamplingParams(guided_decoding=
    GuidedDecodingParams(json=...))`` before (that name was deprecated in 0.10.2 and removed in
    0.12.0, vllm-project/vllm#29326)."""
    params = dict(params)
    structured = params.pop("structured_outputs", None)
    sp = vllm.SamplingParams
    if structured is None:
        return sp(**params)
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:  # vLLM < 0.10.2
        from vllm.sampling_params import GuidedDecodingParams

        return sp(**params, guided_decoding=GuidedDecodingParams(**structured))
    return sp(**params, structured_outputs=StructuredOutputsParams(**structured))


def _image_token_count(processor: Any) -> int | None:
    """Tokens one square image takes in a prompt (its ``<image>`` expanded), measured once
    with the model's processor (LLaVA-1.5: 576); None when the processor cannot say."""
    try:
        text = llava_prompt("x")
        image = Image.new("RGB", (336, 336), CLIP_MEAN_RGB)
        expanded = processor(text=[text], images=[image])["input_ids"][0]
        return len(expanded) - len(processor.tokenizer(text)["input_ids"]) + 1
    except Exception:  # another processor API: vLLM's own length cap still applies
        return None


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise InputError(f"{_VLLM_HINT} [{exc}]") from None
    return vllm


class VLLMGenerator:
    """Generation with vLLM: continuous batching, prefix caching, JSON-schema decoding."""

    supports_schema = True

    def __init__(self, model: str = DEFAULT_MODEL, *, dtype: str = "auto",
                 max_model_len: int = 4096, gpu_memory_utilization: float = 0.9,
                 tensor_parallel_size: int = 1, seed: int = 0,
                 cache_dir: Path | None = None, **llm_kwargs: Any) -> None:
        vllm = _import_vllm()  # first: the most likely problem, and the cheapest check
        self.model_name = model
        self.path, self.revision = resolve_model_path(model, cache_dir=cache_dir, seed=seed)
        self._vllm = vllm
        with hf_offline():
            self.llm = vllm.LLM(
                model=str(self.path), dtype=dtype, max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size, seed=seed,
                enable_prefix_caching=True, limit_mm_per_prompt={"image": 1}, **llm_kwargs,
            )
        self._format: Callable[[str], str] = llava_prompt
        self._tokenizer: Any = None
        self.max_model_len = int(max_model_len)
        self._image_tokens: int | None = None
        try:
            from transformers import AutoProcessor

            with hf_offline():
                processor = AutoProcessor.from_pretrained(self.path)
            self._tokenizer = getattr(processor, "tokenizer", None)
            self._image_tokens = _image_token_count(processor)
            if getattr(processor, "chat_template", None):
                self._format = lambda p: without_leading_bos(processor.apply_chat_template(
                    _conversation(None, p), add_generation_prompt=True), self._tokenizer)
        except Exception:  # no processor files: LLaVA-1.5's format is the right default
            log.warning("no processor chat template in %s; using LLaVA-1.5's format", self.path)
        self.stats = GenerationStats()

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` with the model's tokenizer (answer budgets); an estimate without."""
        if self._tokenizer is None:
            return estimate_tokens(text)
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict[str, Any]:
        return {"backend": "vllm", "model": self.model_name, "path": str(self.path),
                "revision": self.revision, "vllm": getattr(self._vllm, "__version__", None)}

    def _sampling_params(self, params: Mapping[str, Any]) -> Any:
        return vllm_sampling_params(self._vllm, params)

    def generate(self, requests: list[Request], max_new_tokens: int | Sequence[int] = 256,
                 batch_size: int = 8,
                 schema: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
                 ) -> list[Answer]:
        """One greedy answer per request, in order (`batch_size` is vLLM's business: ignored).

        Each request's max_tokens is capped by `max_model_len` minus its prompt (text tokens
        plus the image's, `_image_token_count`); vLLM also stops a request at `max_model_len`
        itself (finish_reason "length"). Either way the answer is `truncated`.
        """
        del batch_size
        items = vllm_requests(requests, schema, max_new_tokens=max_new_tokens,
                              format_prompt=self._format)
        if self._tokenizer is not None and self._image_tokens is not None:
            for it in items:  # cap by the context minus the prompt (text + image tokens)
                text_ids = self._tokenizer(it["inputs"]["prompt"])["input_ids"]
                room = self.max_model_len - (len(text_ids) - 1 + self._image_tokens)
                params = it["sampling_params"]
                params["max_tokens"] = max(1, min(params["max_tokens"], room))
        t0 = time.perf_counter()
        outputs = self.llm.generate([it["inputs"] for it in items],
                                    [self._sampling_params(it["sampling_params"]) for it in items],
                                    use_tqdm=False)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.batches += 1
        texts = parse_vllm_outputs(outputs, self.stats)
        result = [Answer("")] * len(requests)
        for item, text in zip(items, texts, strict=True):
            result[item["index"]] = text
        return result


# --------------------------------------------------------------------------------------------
# prompt -> parse -> repair


# Failure reasons of an instance (the first word of its `failures` row's reason).
TRUNCATED = "truncated"  # the last answer was cut off at its token limit before this instance
INVALID = "invalid"  # the last answer had no usable entry for it (bad JSON, empty view, ...)
UNREADABLE_IMAGE = "unreadable_image"  # the image file could not be read: nothing generated


class ViewsOutcome(NamedTuple):
    """What the model gave for one image.

    `views`: the instances with valid views (a partly bad answer keeps its valid instances);
    `attempts`: generation rounds used; `errors`: one message per rejected answer
    (``"attempt N: ..."``), also when a later attempt succeeded; `failed`: instance id ->
    ``"<reason>: attempt N: <why>"`` for every instance still without views after the last
    attempt, reason `TRUNCATED` or `INVALID`.
    """

    views: dict[str, ViewSet]
    attempts: int
    errors: list[str]
    failed: dict[str, str]


@dataclass
class _Prompt:
    """One request in flight: the instances it shows, those it asks for, its text."""

    group: list[Instance]
    targets: list[str]
    text: str


@dataclass
class _Job:
    """One image's requests in flight and its results so far."""

    image: Image.Image
    ids: list[str]
    prompts: dict[int, _Prompt]  # group index -> request still to answer
    views: dict[str, ViewSet]
    errors: list[str]
    failed: dict[str, str]
    attempts: int = 0

    def outcome(self) -> ViewsOutcome:
        return ViewsOutcome({i: self.views[i] for i in self.ids if i in self.views},
                            self.attempts, list(self.errors),
                            {i: self.failed[i] for i in self.ids if i in self.failed})


def _new_job(image: Image.Image, instances: Sequence[Instance], per_instance: bool) -> _Job:
    instances = list(instances)
    ids = [inst.instance_id for inst in instances]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate instance ids in {ids}")
    if per_instance:
        groups = [[inst, *[o for o in instances if o is not inst]] for inst in instances]
    else:
        groups = [instances] if instances else []
    prompts = {gi: _Prompt(g, [g[0].instance_id] if per_instance else list(ids),
                           build_prompt(g, per_instance, image_size=image.size))
               for gi, g in enumerate(groups)}
    return _Job(image, ids, prompts, {}, [], {})


def _rejection(problems: Mapping[str, str], truncated: bool, budget: int) -> str:
    """Why an answer's unusable part was rejected, for the error log and the repair prompt."""
    text = join_problems(problems.values())
    if truncated:
        return (f"the answer was cut off at its limit of {budget} tokens before it was "
                f"complete; answer with the compact JSON object only ({text})")
    return text


def generate_views_many(generator: TextGenerator,
                        jobs: Sequence[tuple[Image.Image, Sequence[Instance]]],
                        max_attempts: int = 3, *, per_instance: bool = False,
                        max_new_tokens: int | None = None, batch_size: int = 8,
                        on_done: Callable[[int, ViewsOutcome], None] | None = None,
                        ) -> list[ViewsOutcome]:
    """`generate_views` for several images at once, one outcome per image, in order.

    Each round sends the pending requests of every image in a single `generator.generate`
    call, so the generator can batch across images (one request per image would leave a batch
    of one). Each request's max_new_tokens is `views_budget` of the instances it asks for
    (counted with ``generator.count_tokens`` when it has one), at most `max_new_tokens` when
    that is given; the generator caps it further by its context. `on_done(i, outcome)` is
    called as soon as image `i` is finished (all views, or the last attempt), e.g. to put it
    in a request cache before the other images are done.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    state = [_new_job(image, instances, per_instance) for image, instances in jobs]
    use_schema = bool(getattr(generator, "supports_schema", False))
    count_tokens = getattr(generator, "count_tokens", None)
    done: set[int] = set()

    def finish(i: int) -> None:
        done.add(i)
        if on_done is not None:
            on_done(i, state[i].outcome())

    for i, job in enumerate(state):
        if not job.prompts:  # no instances
            finish(i)
    for attempt in range(1, max_attempts + 1):
        pending = [(i, gi) for i, job in enumerate(state) if i not in done for gi in job.prompts]
        if not pending:
            break
        asked = [state[i].prompts[gi] for i, gi in pending]
        budgets = [views_budget(len(p.targets), count_tokens, max_new_tokens) for p in asked]
        kwargs: dict[str, Any] = {"max_new_tokens": budgets, "batch_size": batch_size}
        if use_schema:
            kwargs["schema"] = [json_schema(p.targets) for p in asked]
        outputs = generator.generate([(state[i].image, p.text)
                                      for (i, _), p in zip(pending, asked, strict=True)],
                                     **kwargs)
        if len(outputs) != len(pending):
            raise RuntimeError(f"generator returned {len(outputs)} answers for "
                               f"{len(pending)} requests")
        for i in {i for i, _ in pending}:
            state[i].attempts = attempt
        for (i, gi), req, text, budget in zip(pending, asked, outputs, budgets, strict=True):
            job = state[i]
            views, problems = parse_views_partial(text, req.targets)
            job.views.update(views)
            if not problems:
                del job.prompts[gi]
                continue
            truncated = is_truncated(text)
            why = _rejection(problems, truncated, budget)
            tag = f" (instance {req.targets[0]})" if per_instance else ""
            job.errors.append(f"attempt {attempt}{tag}: {why}")
            if attempt < max_attempts:  # repair only the instances without valid views
                req.targets = [t for t in req.targets if t in problems]
                req.text = build_repair_prompt(text, why, req.group, per_instance,
                                               image_size=job.image.size, targets=req.targets)
                continue
            reason = TRUNCATED if truncated else INVALID
            for iid, problem in problems.items():
                job.failed[iid] = (f"{reason}: attempt {attempt}{tag}: "
                                   + (why if truncated else problem))
            del job.prompts[gi]
        for i in sorted({i for i, _ in pending}):
            if not state[i].prompts:
                finish(i)
    return [job.outcome() for job in state]


def generate_views(generator: TextGenerator, image: Image.Image, instances: Sequence[Instance],
                   max_attempts: int = 3, *, per_instance: bool = False,
                   max_new_tokens: int | None = None, batch_size: int = 8,
                   ) -> ViewsOutcome:
    """Multi-view expressions for every instance of one image, as a `ViewsOutcome`.

    Each answer is validated per instance (`parse_views_partial`): the valid instances keep
    their views, and only the others are asked again, with the repair prompt (the previous
    answer, why it was rejected, and the ids still needed), up to `max_attempts` rounds in
    all; what is still missing then is in `failed` with its reason (`TRUNCATED` when the last
    answer was cut off at its token limit, else `INVALID`). Bad model output never raises;
    errors of the generator itself (OOM, ...) do. `max_new_tokens`: an extra cap on each
    request's budget (`views_budget`), None for none.

    With ``per_instance=True`` each instance gets its own prompt (the others as context), all
    sent in one batch per round.
    """
    return generate_views_many(generator, [(image, instances)], max_attempts,
                               per_instance=per_instance, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)[0]


# --------------------------------------------------------------------------------------------
# the multiview stage's model backends (hf, vllm): cache-first, resumable per image

_GENERATORS: dict[tuple[str, str, str], Any] = {}
_GENERATORS_LOCK = threading.Lock()
_BACKENDS = ("hf", "vllm")


def check_backend(backend: str, model: str) -> None:
    """Fail before any work when `backend` cannot run `model` here; loads nothing heavy.

    vLLM missing, an unknown backend, a model that is neither a local directory nor in the
    local Hugging Face cache: all `InputError`s at preflight, not after hours of other stages.
    """
    if backend == "template":
        return
    if backend not in _BACKENDS:
        raise InputError(f"unknown multiview backend {backend!r}: use hf, vllm or template")
    if backend == "vllm":
        _import_vllm()
    if str(model).strip().lower() != "tiny":
        resolve_model_path(model)


def model_key(backend: str, model: str) -> str:
    """The model's identity in the request cache: backend + hub revision or local path.

    A hub snapshot is pinned by its commit, so a re-downloaded newer revision is a new key. A
    local directory is identified by its path only: replace its weights and you should clear
    the cache (or use a new directory).
    """
    name = str(model).strip()
    if name.lower() == "tiny":
        return f"{backend}:tiny-v{_TINY_VERSION}-seed0"
    path, revision = resolve_model_path(name)
    return f"{backend}:{name}@{revision}" if revision else f"{backend}:{path}"


def get_generator(backend: str, model: str, device: str = "auto") -> TextGenerator:
    """The process's generator for (backend, model, device), loaded on first use.

    Shards run in worker processes; each loads the model once and reuses it for every shard it
    gets (nothing large is pickled between processes).
    """
    key = (backend, str(model), str(device))
    with _GENERATORS_LOCK:
        if key not in _GENERATORS:
            if backend == "hf":
                _GENERATORS[key] = HFGenerator(model, device=device)
            elif backend == "vllm":
                _GENERATORS[key] = VLLMGenerator(model)  # vLLM places itself on the GPUs
            else:
                raise InputError(f"unknown multiview backend {backend!r}: use hf or vllm")
        return _GENERATORS[key]


def instances_from_refs(refs: Sequence[Mapping[str, Any]]) -> list[Instance]:
    """One Instance per annotation of an image, from the stage's referent rows.

    Referents are grouped by ``ann_id`` (the instance id in the prompt and the answer): if two
    referents point at the same object their sentences are merged, so the model is never asked
    about one object twice under two ids.
    """
    by_ann: dict[str, dict[str, Any]] = {}
    for ref in refs:
        entry = by_ann.setdefault(str(ref["ann_id"]), {
            "instance_id": str(ref["ann_id"]), "category": ref.get("category") or "",
            "bbox": tuple(ref["bbox"]) if ref.get("bbox") is not None else None,
            "expressions": [],
        })
        for sent in ref.get("sentences") or []:
            if sent not in entry["expressions"]:
                entry["expressions"].append(sent)
    return [Instance(**entry) for entry in by_ann.values()]


def _load_image(images_dir: Path, meta: Mapping[str, Any]) -> Image.Image:
    path = images_dir / str(meta["file_name"])
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:  # missing, unreadable, truncated
        raise InputError(f"cannot read image {path}: {exc}") from None


def _outcome_record(outcome: ViewsOutcome) -> dict[str, Any]:
    return {"views": {k: v.model_dump() for k, v in outcome.views.items()},
            "attempts": outcome.attempts, "errors": outcome.errors, "failed": outcome.failed}


KILL_HOOK_ENV = "NEMO_PIPE_TEST_KILL_AFTER_REQUESTS"


def _kill_hook(done: int) -> None:
    """Test hook for crash drills: SIGKILL this process after `done` requests were cached."""
    limit = os.environ.get(KILL_HOOK_ENV)
    if limit and done >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def run_model_backend(p: Any, by_image: Mapping[int, Sequence[Mapping[str, Any]]],
                      payload: Mapping[str, Any],
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """The multiview stage's `hf` / `vllm` work for one shard: ``(rows, failures, counts)``.

    `p` carries backend, model, device, per_instance, max_attempts, max_new_tokens and
    batch_size; `by_image` maps image id -> the image's referent rows (ref_id, image_id,
    ann_id, category, bbox, sentences, image metadata); `payload` has ``image_ids``,
    ``images_dir`` and the request cache path ``cache``.

    Every finished image -- success or final failure -- is put in the request cache, keyed by
    (`model_key`, hash of the prompt and generation params, image id), before the next chunk
    starts; a rerun (after a kill, or with more images) generates only what is not there, and
    loads no model at all when everything is cached. An unreadable image is a failure row but is
    not cached, so fixing the file and rerunning retries it.
    """
    from pipeline.request_cache import RequestCache, prompt_hash

    images_dir = Path(payload["images_dir"])
    key = model_key(p.backend, p.model)
    cap = None if p.max_new_tokens is None else int(p.max_new_tokens)
    gen_params = {"backend": p.backend, "per_instance": bool(p.per_instance),
                  "max_attempts": int(p.max_attempts), "max_new_tokens": cap,
                  "budget": BUDGET_VERSION}
    counts: dict[str, Any] = {"generated": 0, "cached": 0}
    plans: list[tuple[int, Sequence[Mapping[str, Any]], list[Instance], str]] = []
    records: dict[int, dict[str, Any]] = {}
    with RequestCache(payload["cache"]) as cache:
        todo = []
        for image_id in payload["image_ids"]:
            refs = by_image.get(image_id) or []
            if not refs:
                continue
            instances = instances_from_refs(refs)
            meta = refs[0]["image"]
            size = (int(meta["width"]), int(meta["height"]))
            phash = prompt_hash(build_prompt(instances, image_size=size), gen_params)
            plan = (image_id, refs, instances, phash)
            plans.append(plan)
            hit = cache.get(key, phash, str(image_id))
            if hit is not None:
                records[image_id] = hit
                counts["cached"] += 1
            else:
                todo.append(plan)
        generator = get_generator(p.backend, p.model, p.device) if todo else None
        stats = getattr(generator, "stats", None)
        before = ((stats.generated_tokens, stats.seconds, stats.requests, stats.truncated)
                  if stats else (0, 0.0, 0, 0))
        chunk = max(1, int(p.batch_size))  # images per round trip: bounds what a kill loses
        for start in range(0, len(todo), chunk):
            jobs, live = [], []
            for plan in todo[start:start + chunk]:
                try:
                    image = _load_image(images_dir, plan[1][0]["image"])
                except InputError as exc:
                    why = f"{UNREADABLE_IMAGE}: {exc}"
                    records[plan[0]] = {"views": {}, "attempts": 0, "errors": [str(exc)],
                                        "failed": {i.instance_id: why for i in plan[2]}}
                    continue
                jobs.append((image, plan[2]))
                live.append(plan)

            def on_done(j: int, outcome: ViewsOutcome, live: list[Any] = live) -> None:
                image_id, _, _, phash = live[j]
                record = _outcome_record(outcome)
                cache.put(key, phash, str(image_id), record)
                records[image_id] = record
                counts["generated"] += 1
                _kill_hook(counts["generated"])

            generate_views_many(generator, jobs, int(p.max_attempts),  # type: ignore[arg-type]
                                per_instance=bool(p.per_instance),
                                max_new_tokens=cap,
                                batch_size=int(p.batch_size), on_done=on_done)
        if stats is not None:  # this shard's share of the process-wide generator totals
            counts["generated_tokens"] = stats.generated_tokens - before[0]
            counts["generation_seconds"] = round(stats.seconds - before[1], 3)
            counts["model_requests"] = stats.requests - before[2]
            counts["truncated_answers"] = stats.truncated - before[3]
    rows, failures, reasons = _rows_and_failures(p, plans, records)
    counts["failure_reasons"] = reasons
    return rows, failures, counts


def _rows_and_failures(p: Any, plans: Sequence[tuple[int, Sequence[Mapping[str, Any]],
                                                     list[Instance], str]],
                       records: Mapping[int, Mapping[str, Any]],
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """View rows of every instance with views; one failure row per (image, reason message)
    with the instances that share it; failed instances counted per reason word."""
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    reasons: dict[str, int] = {}
    for image_id, refs, _, phash in plans:
        record = records[image_id]
        views_of = record.get("views") or {}
        failed = record.get("failed") or {}
        attempts = int(record["attempts"])
        by_reason: dict[str, set[int]] = {}
        for ref in refs:
            views = views_of.get(str(ref["ann_id"]))
            if views is None:
                why = failed.get(str(ref["ann_id"])) or f"{INVALID}: no answer"
                by_reason.setdefault(why, set()).add(int(ref["ann_id"]))
                continue
            rows.extend({"ref_id": ref["ref_id"], "image_id": image_id, "ann_id": ref["ann_id"],
                         "view": view, "text": views[view], "backend": p.backend,
                         "model": p.model, "prompt_hash": phash, "attempts": attempts}
                        for view in VIEWS if views.get(view))
        for why, ann_ids in by_reason.items():
            failures.append({"image_id": image_id, "ann_ids": sorted(ann_ids), "reason": why,
                             "attempts": attempts, "prompt_hash": phash})
            word = why.split(":", 1)[0]
            reasons[word] = reasons.get(word, 0) + len(ann_ids)
    return rows, failures, reasons
