"""What the LLM stages share about text going to a model and answers coming back.

Going in: `clean_text` (dataset text in a prompt: whitespace collapsed, ``<token>``-like strings
defused) and `repair_prompt` (the one repair prompt: the task's prompt again, the rejected
answer, why it was rejected). Coming back: `json_candidates` / `scan_json` (the JSON objects in
an answer, tolerating code fences and prose around them), `partial_object` (the complete
entries of an object cut off or broken further on), `json_error_message`,
`validation_problems` (a pydantic error in words the repair prompt can pass back to the model)
and `join_problems`. The view and distractor parsers build on these.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import ValidationError

__all__ = ["clean_text", "defuse_control_tokens", "join_problems", "json_candidates",
           "json_error_message", "partial_object", "repair_prompt", "scan_json",
           "validation_problems"]

_CONTROL_TOKEN = re.compile(r"<\s*(/?\s*[A-Za-z_|][^<>\n]{0,40}?)\s*>")


def defuse_control_tokens(text: str) -> str:
    """`text` with angle brackets around words dropped, line breaks kept.

    A literal ``<image>`` would be taken as a second image placeholder by a processor (and
    ``</s>`` as end of sequence).
    """
    return _CONTROL_TOKEN.sub(r"\1", text)


def clean_text(text: str) -> str:
    """Dataset text for a prompt: control-token-like strings defused, whitespace collapsed."""
    return " ".join(defuse_control_tokens(text).split())


def repair_prompt(prompt: str, previous_output: str, error_message: str, *,
                  echo_chars: int, closing: str) -> str:
    """The repair prompt: `prompt` (the task again: each request is independent, no chat
    history is kept), the previous answer cut to `echo_chars` characters (a runaway output
    cannot blow up the prompt), why it could not be used, and the task's `closing` line."""
    previous = previous_output.strip()
    if len(previous) > echo_chars:
        previous = previous[:echo_chars] + " ...[truncated]"
    return "\n\n".join([
        prompt,
        "Your previous answer was:\n<<<\n" + defuse_control_tokens(previous) + "\n>>>",
        f"It could not be used: {error_message}",
        closing,
    ])


def json_candidates(text: str) -> Iterator[dict[str, Any] | json.JSONDecodeError]:
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


def scan_json(text: str, wanted: Iterable[str],
              ) -> tuple[dict[str, Any] | None, dict[str, Any] | None,
                         json.JSONDecodeError | None]:
    """``(hit, first object, first error)`` of the JSON objects in `text`.

    `hit` is the first decodable object with a key in `wanted` (the scan stops there, so a
    brace in leading prose or an inner object is not mistaken for the answer); `first object`
    the first decodable object at all (the hit when there is one) and `first error` the first
    decode error before the hit (or anywhere, without one).
    """
    keys = set(wanted)
    first_obj: dict[str, Any] | None = None
    first_err: json.JSONDecodeError | None = None
    for cand in json_candidates(text):
        if isinstance(cand, json.JSONDecodeError):
            first_err = first_err or cand
            continue
        if keys & set(cand):
            return cand, first_obj if first_obj is not None else cand, first_err
        if first_obj is None:
            first_obj = cand
    return None, first_obj, first_err


def json_error_message(err: json.JSONDecodeError, advice: str) -> str:
    """``the answer is not valid JSON (<what> at line L column C); <advice>``."""
    return (f"the answer is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            + advice)


def partial_object(text: str, start: int) -> dict[str, Any]:
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


def validation_problems(exc: ValidationError, missing: str = "is missing") -> list[str]:
    """One ``"<field>" <message>`` per pydantic error (just the message for the object
    itself), a missing field worded as `missing`."""
    out = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = missing
        out.append(f'"{where}" {msg}' if where else msg)
    return out


def join_problems(problems: Iterable[str]) -> str:
    """One message from per-item problems: each distinct one once, at most 8."""
    unique = list(dict.fromkeys(problems))
    more = f" (and {len(unique) - 8} more problems)" if len(unique) > 8 else ""
    return "; ".join(unique[:8]) + more
