"""The transformers generator's batches on the tiny LLaVA (CPU, fp32): an out-of-memory
halves them without losing, repeating or reordering an answer; sorting by prompt length,
static KV cache and eager attention give the same answers as the defaults; bad options are
clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from llm_stand_ins import INSTANCES, MAN
from PIL import Image

from pipeline.errors import InputError
from stages.models.generation.engines import get_generator
from stages.models.generation.hf_engine import HFVisionGenerator
from stages.text.view_prompts import build_prompt


def _requests(n: int) -> list[tuple[Image.Image, str]]:
    """`n` requests whose prompts differ in length (and so in padding)."""
    prompts = [build_prompt([MAN]), "Describe the man on the left.",
               build_prompt(INSTANCES, per_instance=True), "Who is on the right?"]
    return [(Image.new("RGB", (40 + i, 30 + 2 * i), (10 * i % 255, 90, 30)),
             prompts[i % len(prompts)] + " " + "please " * (i % 5)) for i in range(n)]


def _load(tiny_dir: Path, **options: Any) -> HFVisionGenerator:
    return HFVisionGenerator("tiny", device="cpu", cache_dir=tiny_dir.parent, **options)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> list[str]:
    """The answers to `_requests(24)`, one request at a time."""
    answers = _load(tiny_dir).generate(_requests(24), max_new_tokens=4, batch_size=1)
    assert len(set(answers)) > 4  # distinguishable: a reordering would show
    return answers


class Recording:
    """Wraps a model's `generate`: records each call's batch size and padded width, and runs
    out of CUDA memory (as torch raises it; constructible on CPU) above `limit` rows."""

    def __init__(self, model: Any, limit: int | None = None) -> None:
        self.real = model.generate
        self.limit = limit
        self.tried: list[int] = []
        self.rows = 0  # rows of the calls that returned
        self.widths: list[int] = []

    def __call__(self, **inputs: Any) -> Any:
        n, width = inputs["input_ids"].shape
        self.tried.append(int(n))
        if self.limit is not None and n > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        out = self.real(**inputs)
        self.rows += int(n)
        self.widths.append(int(width))
        return out


def test_oom_halves_and_every_request_is_answered_once_in_order(
        tiny_dir: Path, reference: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _load(tiny_dir)
    spy = Recording(gen.model, limit=5)
    monkeypatch.setattr(gen.model, "generate", spy)
    answers = gen.generate(_requests(24), max_new_tokens=4, batch_size=16)
    assert answers == reference  # every request, in request order, the same greedy answer
    assert spy.rows == 24  # none answered twice (a failed call answers nothing)
    assert spy.tried == [16, 8] + [4] * 6  # settles on 4, the power-of-two floor of 5
    assert gen.batcher.ceiling == 4 and gen.stats.oom_retries == 2
    assert gen.stats.batch_sizes == {4: 6} and gen.stats.requests == 24
    # the next call starts at the settled batch
    spy.tried.clear()
    assert gen.generate(_requests(8), max_new_tokens=4, batch_size=16) == reference[:8]
    assert spy.tried == [4, 4]


def test_oom_at_batch_one_names_the_fix(tiny_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _load(tiny_dir)
    monkeypatch.setattr(gen.model, "generate", Recording(gen.model, limit=0))
    with pytest.raises(InputError, match=r"ran out of cpu memory with a single request "
                       r"\(\d+ prompt tokens \+ 4 new tokens\): lower multiview.max_new_tokens "
                       r"or use a smaller model/dtype"):
        gen.generate(_requests(2), max_new_tokens=4, batch_size=2)


def test_sorting_by_length_gives_the_same_answers(tiny_dir: Path, reference: list[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sorted_gen, plain = _load(tiny_dir), _load(tiny_dir, sort_by_length=False)
    spies = []
    for gen in (sorted_gen, plain):
        spies.append(Recording(gen.model))
        monkeypatch.setattr(gen.model, "generate", spies[-1])
    requests = _requests(12)
    assert sorted_gen.generate(requests, max_new_tokens=4, batch_size=4) == reference[:12]
    assert plain.generate(requests, max_new_tokens=4, batch_size=4) == reference[:12]
    # the batches really differ: sorted ones need less padding
    assert sum(spies[0].widths) < sum(spies[1].widths)
    assert plain.describe()["sort_by_length"] is False


def test_prompt_lengths_are_what_the_model_sees(tiny: Any) -> None:
    requests = _requests(5)
    assert tiny.prompt_lengths(requests) == [int(tiny._encode([r])["attention_mask"].sum())
                                             for r in requests]
    assert tiny.image_tokens == 16  # 32 px / 8 px patches, squared


def test_static_cache_and_eager_attention_give_the_same_answers(
        tiny_dir: Path, reference: list[str]) -> None:
    static = _load(tiny_dir, cache_implementation="static")
    eager = _load(tiny_dir, attn_implementation="eager")
    sdpa = _load(tiny_dir, attn_implementation="sdpa")
    requests = _requests(6)
    assert static.generate(requests, max_new_tokens=4, batch_size=3) == reference[:6]
    assert eager.generate(requests, max_new_tokens=4, batch_size=3) == reference[:6]
    torch.testing.assert_close(eager.first_step_logits(requests, batch_size=3),
                               sdpa.first_step_logits(requests, batch_size=3),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(static.first_step_logits(requests, batch_size=3),
                               sdpa.first_step_logits(requests, batch_size=3),
                               atol=1e-4, rtol=0)
    assert (eager.describe()["attn_implementation"], sdpa.attn_implementation) == (
        "eager", "sdpa")
    assert static.describe()["cache_implementation"] == "static"
    assert _load(tiny_dir).attn_implementation == "sdpa"  # auto: SDPA where supported


def test_unknown_or_unavailable_options_are_clear_errors(tiny_dir: Path) -> None:
    with pytest.raises(InputError, match="unknown attn_implementation 'flash': use auto, "
                                         "sdpa, eager, flash_attention_2"):
        _load(tiny_dir, attn_implementation="flash")
    with pytest.raises(InputError, match="unknown cache_implementation 'offloaded': use "
                                         "dynamic, static"):
        _load(tiny_dir, cache_implementation="offloaded")
    with pytest.raises(InputError, match="memory_gib must be > 0"):
        _load(tiny_dir, memory_gib=0)
    try:
        import flash_attn  # noqa: F401
    except ImportError:  # the usual case on CPU: the package is missing
        with pytest.raises(InputError, match=r"attention implementation 'flash_attention_2' "
                                             r"is not available .*use auto, sdpa or eager"):
            _load(tiny_dir, attn_implementation="flash_attention_2")


def test_get_generator_keys_the_process_cache_by_the_options(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, fresh_generators: None) -> None:
    monkeypatch.setattr("stages.models.tiny.tiny_root", lambda cache_dir=None: tiny_dir.parent)
    a = get_generator("hf", "tiny", "cpu", options={"memory_gib": 2.0})
    assert get_generator("hf", "tiny", "cpu", options={"memory_gib": 2.0}) is a
    b = get_generator("hf", "tiny", "cpu", options={"cache_implementation": "static"})
    assert b is not a and b.cache_implementation == "static"
    assert a.batcher.memory_gib == 2.0 and a.describe()["memory_gib"] == 2.0
