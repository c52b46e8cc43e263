"""Stand-ins and fixtures shared by the tests of the LLM stages and the model layer.

* `ScriptedGenerator`: canned answers, in order, for view requests (``(image, prompt)``);
  records every call (requests, budgets, schemas);
* `FakeGenerator` / `NoGenerator`: answers keyed by (kind, sentence) for distractor prompts;
  the second fails if asked anything (a cached request regenerated);
* `view_entry` / `VALID`: hand-written view answers for the instances `MAN` and `LADY`;
* fixtures: `tiny_dir` (the tiny LLaVA, built once per session), `tiny` (it, loaded by the HF
  generator, once per module), `tiny_work` / `tiny_lm` (the tiny causal LM under a work dir
  of the module, loaded by `get_generator`), `strict_vllm` (tests/fake_vllm.py in both API
  shapes), and `fresh_generators` (an empty per-process generator cache before and after).

tests/conftest.py registers the fixtures for every test (``pytest_plugins``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import fake_vllm
import pytest
from PIL import Image

from pipeline import process_cache


def _instances() -> tuple[Any, Any]:
    from stages.text.view_prompts import Instance

    return (Instance(instance_id=101, category="person", bbox=(10, 40, 30, 50),
                     expressions=[b"left", b"man", b"Man"]),
            Instance(instance_id="102", category="person", bbox=(60, 35, 30, 60),
                     expressions=["lady", "Woman on right", "woman"]))


MAN, LADY = _instances()
INSTANCES = [MAN, LADY]
IDS = ["101", "102"]


def view_entry(appearance: str = "the young man with glasses", action: str | None = "the man "
               "looking at the woman", spatial: str = "the man on the left",
               alt: str | None = None) -> dict[str, Any]:
    return {"appearance": appearance, "action": action, "spatial": spatial,
            "appearance_alt": alt}


VALID = {
    "101": view_entry(),
    "102": view_entry("the woman in a red dress", None, "the woman on the right",
                      "the woman with long dark hair"),
}


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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.models.tiny import tiny_llava_dir

    return tiny_llava_dir(tmp_path_factory.mktemp("tiny-cache"), seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Any:
    from stages.models.generation.hf_engine import HFVisionGenerator

    return HFVisionGenerator("tiny", device="cpu", dtype="auto", cache_dir=tiny_dir.parent)


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-work")


@pytest.fixture
def tiny_lm(tiny_work: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The tiny causal LM as the augment stage gets it (built under `tiny_work`)."""
    from stages.models.generation.engines import get_generator

    monkeypatch.setenv("NEMO_WORK_DIR", str(tiny_work))
    process_cache.clear("generator")  # loaded afresh under this NEMO_WORK_DIR
    yield get_generator("hf", "tiny", "cpu", images=False)
    process_cache.clear("generator")


@pytest.fixture(params=["new", "old"])
def strict_vllm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                ) -> tuple[type, str]:
    """A strict fake `vllm` (tests/fake_vllm.py) in both API shapes: (its LLM class, shape)."""
    return fake_vllm.install(monkeypatch, request.param), request.param


@pytest.fixture
def fresh_generators() -> Any:
    """No generator loaded by an earlier test (or left behind by this one)."""
    process_cache.clear("generator")
    yield
    process_cache.clear("generator")


def schema_of(params: Any, api: str) -> dict[str, Any] | None:
    """The JSON schema a SamplingParams carries, under the shape's own name."""
    holder = params.structured_outputs if api == "new" else params.guided_decoding
    return None if holder is None else holder.json
