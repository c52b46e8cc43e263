"""The multiview task's text: the view prompt, its answer format, parsing and budget.

The `multiview` stage asks a VLM (LLaVA-1.5 by default) to describe every instance of an image
from three views -- appearance, action, spatial -- plus a second appearance expression when a
view does not apply (a parked car has no action). This module holds the task's side of that
conversation, testable without a model:

* the prompt (task text and the three worked examples of the hard-negative notes, verbatim),
  the strict JSON answer format, its parsers (`parse_views_partial` per instance,
  `parse_views` all or nothing) and its JSON schema (for structured decoding);
* the token budget of a request (`views_budget`: from the instances it asks for, measured on
  the template backend's answers, capped by the model's context and an optional setting);
* `ViewTask`: those pieces as the task of the shared request loop
  (`stages.models.generation.loop`), which asks, validates per instance, repairs only the
  instances still without valid views and records the rest; `generate_views` runs it for one
  image, `generate_views_many` for several.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from stages.models.generation.answers import budget_for
from stages.models.generation.loop import Outcome, Request, run_requests
from stages.models.llava import square_offset
from stages.text.llm_output import (
    clean_text,
    join_problems,
    json_error_message,
    partial_object,
    repair_prompt,
    scan_json,
    validation_problems,
)
from stages.text.normalise import normalise_sentence

__all__ = ["EXAMPLES_JSON", "VIEWS", "Instance", "ViewJob", "ViewParseError", "ViewSet",
           "ViewTask", "build_prompt", "build_repair_prompt", "generate_views",
           "generate_views_many", "json_schema", "parse_views", "parse_views_partial",
           "reference_answer", "views_budget"]

VIEWS: tuple[str, ...] = ("appearance", "action", "spatial", "appearance_alt")

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
EXAMPLES_JSON = json.dumps(
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


def _describe_box(bbox: tuple[float, float, float, float],
                  image_size: tuple[int, int] | None) -> str:
    x, y, w, h = bbox
    if image_size is None:
        return f"box [x, y, w, h] = [{x:.0f}, {y:.0f}, {w:.0f}, {h:.0f}] pixels"
    # The model sees the padded square image: give the box as fractions of that square, the
    # format LLaVA-1.5 was trained on for region-level data ([x1, y1, x2, y2] in 0..1).
    side, left, top = square_offset(*image_size)
    coords = [(x + left) / side, (y + top) / side, (x + w + left) / side, (y + h + top) / side]
    coords = [min(max(c, 0.0), 1.0) for c in coords]
    return "box [x1, y1, x2, y2] = [" + ", ".join(f"{c:.2f}" for c in coords) + "]"


def _instance_line(inst: Instance, image_size: tuple[int, int] | None) -> str:
    parts = [f"- instance id {json.dumps(inst.instance_id)}"]
    if inst.category:
        parts.append(f"category {json.dumps(clean_text(inst.category))}")
    if inst.bbox is not None:
        parts.append(_describe_box(inst.bbox, image_size))
    exprs = [clean_text(e) for e in inst.expressions]
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
    fractions of the padded square image the model actually sees (see
    `stages.models.llava.pad_to_square`), otherwise as COCO pixel boxes.

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
    fmt = _FORMAT.format(which=which, examples=EXAMPLES_JSON)
    return "\n\n".join([task, _EXAMPLES, "\n".join(lines), fmt])


# The repair prompt's own parts (see `stages.text.llm_output.repair_prompt`).
ECHO_CHARS = 3000
CLOSING = "Answer again with the corrected JSON object only."


def build_repair_prompt(previous_output: str, error_message: str,
                        instances: Sequence[Instance], per_instance: bool = False, *,
                        image_size: tuple[int, int] | None = None,
                        targets: Sequence[str] | None = None) -> str:
    """The prompt again (for `targets`, the instances whose entries were unusable: the valid
    ones are kept and not asked for again), plus the rejected answer and why it was rejected:
    what the request loop sends after an unusable answer."""
    return repair_prompt(build_prompt(instances, per_instance, image_size=image_size,
                                      targets=targets),
                         previous_output, error_message, echo_chars=ECHO_CHARS, closing=CLOSING)


# --------------------------------------------------------------------------------------------
# parsing the answer

# Placeholders models write instead of an expression (often echoing the examples' "(none -
# object is static)"), matched on the normalised text (`normalise_sentence`: case, punctuation
# and articles gone, so "N/A" is "na" and "(none - not visible)" is "none not visible"). A
# prefix marks the whole text ("none of the above", "not visible in the image"); the full
# forms only count alone ("unknown dog", "static bike", "null set" are expressions).
_NONE_LIKE = re.compile(
    r"^(?:(?:none|na|n a|not applicable|no action|no spatial|no appearance|"
    r"not visible|not shown|not available|no description|no expression|not sure)\b.*"
    r"|unknown|unclear|unavailable|nothing|nan|tbd|empty|same|same as above|see above|ditto"
    r"|null|nil|static|object is static)$",
    re.DOTALL,
)


def _placeholder(value: str) -> bool:
    """Whether `value` says "no expression" (or is only punctuation) rather than being one."""
    norm = normalise_sentence(value)
    return not norm or _NONE_LIKE.match(norm) is not None


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
        # Appearance and spatial always apply: a placeholder ("N/A", "(none - not visible)")
        # there would become a "view" of the instance, so it is rejected (and repaired).
        value = " ".join(value.split())
        if not value:
            raise ValueError("must be a non-empty string")
        if _placeholder(value):
            raise ValueError(f"{json.dumps(value)} is a placeholder, not an expression: write "
                             "an expression that refers to the instance")
        return value

    @field_validator("action", "appearance_alt")
    @classmethod
    def _none_like(cls, value: str | None) -> str | None:
        # Models often echo the examples' "(none - object is static)" instead of null; that
        # means "no such view", the same as null (then the other of the two must be given).
        if value is None:
            return None
        value = " ".join(value.split())
        return None if _placeholder(value) else value

    @model_validator(mode="after")
    def _one_of_action_or_alt(self) -> ViewSet:
        if self.action is None and self.appearance_alt is None:
            raise ValueError('"action" is null, so "appearance_alt" (a second appearance '
                             "expression) is required")
        if self.action is not None and self.appearance_alt is not None:
            raise ValueError('both "action" and "appearance_alt" are set: "appearance_alt" is '
                             'only for instances with no action (set it to null)')
        # Three views of one instance: a repeated one (normalised, as "the same text"
        # everywhere) would leave the cluster two expressions, one of them counted twice.
        seen: dict[str, str] = {}
        for name in VIEWS:
            value = getattr(self, name)
            if value is None:
                continue
            norm = normalise_sentence(value)
            if norm in seen:
                raise ValueError(f'"{name}" repeats "{seen[norm]}" ({json.dumps(value)}): the '
                                 "three expressions must differ")
            seen[norm] = name
        return self

    def expressions(self) -> list[str]:
        """The three expressions of the cluster, in VIEWS order."""
        return [v for v in (self.appearance, self.action, self.spatial, self.appearance_alt)
                if v is not None]


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
    hit, first_obj, first_err = scan_json(text, wanted)
    if hit is not None:
        return hit, None
    if first_obj is not None and first_err is None:
        return first_obj, None
    if first_err is not None:
        message = json_error_message(
            first_err, "write one complete JSON object with double-quoted keys and strings, "
                       "null for missing values, and no trailing commas")
        best: dict[str, Any] = {}
        for match in re.finditer(r"\{", text):
            part = partial_object(text, match.start())
            if len(wanted & set(part)) > len(wanted & set(best)):
                best = part
        if best:
            return best, message
        raise ViewParseError(message)
    raise ViewParseError("no JSON object found in the answer; answer with a single JSON object "
                         "keyed by instance id")


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
            problems[iid] = "; ".join(f'instance "{iid}": {p}' for p in validation_problems(exc))
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
# token budget of a request


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
    """max_new_tokens of a request whose answer covers `n_instances` (see
    `stages.models.generation.answers.budget_for`)."""
    return budget_for(reference_answer(max(1, n_instances)), count_tokens, cap)


# --------------------------------------------------------------------------------------------
# the task of the request loop


@dataclass(eq=False)
class ViewJob:
    """One image and its instances: one job of the request loop (one request-cache entry)."""

    image: Image.Image
    instances: list[Instance]


@dataclass(frozen=True)
class ViewTask:
    """The multiview task for `stages.models.generation.loop`: one request per image (or one
    per instance with `per_instance`, the others as context), answers validated per instance,
    budgets from the instances a request asks for, the JSON schema when the generator decodes
    with one."""

    per_instance: bool = False
    echo_chars: int = ECHO_CHARS
    closing: str = CLOSING
    names_budget: bool = True  # "cut off at its limit of N tokens"

    def requests(self, job: ViewJob) -> list[Request]:
        instances = list(job.instances)
        ids = [inst.instance_id for inst in instances]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate instance ids in {ids}")
        if not self.per_instance:
            return [Request(list(ids), data=instances)] if instances else []
        return [Request([inst.instance_id], label=f" (instance {inst.instance_id})",
                        data=[inst, *[o for o in instances if o is not inst]])
                for inst in instances]

    def prompt(self, job: ViewJob, request: Request) -> str:
        return build_prompt(request.data, self.per_instance, image_size=job.image.size,
                            targets=request.targets)

    def model_input(self, job: ViewJob, text: str) -> tuple[Image.Image, str]:
        return job.image, text

    def budget(self, job: ViewJob, request: Request,
               count_tokens: Callable[[str], int] | None, cap: int | None) -> int:
        return views_budget(len(request.targets), count_tokens, cap)

    def schema(self, job: ViewJob, request: Request) -> dict[str, Any]:
        return json_schema(request.targets)

    def parse(self, job: ViewJob, request: Request,
              text: str) -> tuple[dict[str, ViewSet], dict[str, str]]:
        return parse_views_partial(text, request.targets)


def generate_views_many(generator: Any, jobs: Sequence[tuple[Image.Image, Sequence[Instance]]],
                        max_attempts: int = 3, *, per_instance: bool = False,
                        max_new_tokens: int | None = None, batch_size: int = 8,
                        ) -> list[Outcome]:
    """`generate_views` for several images, one outcome per image, in order: the request loop
    batches the requests of up to `batch_size` images per `generator.generate` call."""
    return run_requests(generator, ViewTask(per_instance),
                        [ViewJob(image, list(instances)) for image, instances in jobs],
                        max_attempts=max_attempts, batch_size=batch_size,
                        max_new_tokens=max_new_tokens)


def generate_views(generator: Any, image: Image.Image, instances: Sequence[Instance],
                   max_attempts: int = 3, *, per_instance: bool = False,
                   max_new_tokens: int | None = None, batch_size: int = 8) -> Outcome:
    """Multi-view expressions for every instance of one image, as an `Outcome` (views by
    instance id, attempts, errors, failed).

    Each answer is validated per instance (`parse_views_partial`): the valid instances keep
    their views, and only the others are asked again, with the repair prompt (the previous
    answer, why it was rejected, and the ids still needed), up to `max_attempts` rounds in
    all; what is still missing then is in `failed` with its reason (``truncated`` when the
    last answer was cut off at its token limit, else ``invalid``). Bad model output never
    raises; errors of the generator itself (OOM, ...) do. `max_new_tokens`: an extra cap on
    each request's budget (`views_budget`), None for none. With ``per_instance=True`` each
    instance gets its own prompt (the others as context), all sent in one batch per round.
    """
    return generate_views_many(generator, [(image, instances)], max_attempts,
                               per_instance=per_instance, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)[0]
