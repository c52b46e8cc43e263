"""stages.models.generation.batching: batches sized by memory, halved after a CUDA
out-of-memory without losing or repeating a request, and the request cache after an
out-of-memory at batch 1. The model is a stand-in that runs out of memory above a threshold
(torch.cuda.OutOfMemoryError can be raised on CPU)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from stages.models.generation.answers import GenerationStats
from stages.models.generation.batching import Batcher
from stages.models.generation.loop import Plan, run_cached
from stages.models.generation.memory import (
    GenerationMemoryError,
    MemoryShape,
    estimate_bytes,
)
from stages.text.distractor_prompts import DistractorJob, DistractorTask

FIX = "lower multiview.max_new_tokens or use a smaller model/dtype"


class OOMAbove:
    """A model call that runs out of CUDA memory when given more than `limit` requests."""

    def __init__(self, limit: int, error: type[Exception] = torch.cuda.OutOfMemoryError) -> None:
        self.limit = limit
        self.error = error
        self.tried: list[int] = []  # the size of every call, failed or not
        self.answered: list[int] = []  # every request index of a call that returned

    def __call__(self, idx: list[int]) -> list[str]:
        self.tried.append(len(idx))
        if len(idx) > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.answered.extend(idx)
        return [f"answer {i}" for i in idx]


def _batcher(**kwargs: Any) -> Batcher:
    return Batcher(None, 0, torch.device("cpu"), what="model stand-in", fix=FIX, **kwargs)


def test_oom_halves_until_it_fits_and_every_request_is_answered_once(
        caplog: pytest.LogCaptureFixture) -> None:
    batcher, call, stats = _batcher(), OOMAbove(20), GenerationStats()
    n = 100
    order = list(range(n))[::-1]  # any run order: results still come back by request
    with caplog.at_level(logging.INFO, logger="stages.models.generation.batching"):
        results = batcher.run(order, [10] * n, [5] * n, 64, call, stats)
    assert results == [f"answer {i}" for i in range(n)]
    assert sorted(call.answered) == list(range(n))  # each exactly once
    assert call.tried[:3] == [64, 32, 16]  # two halvings, then 16 = 20's power-of-two floor
    assert call.tried[3:] == [16] * 5 + [4]
    assert batcher.ceiling == 16 and stats.oom_retries == 2
    assert stats.batch_sizes == {16: 6, 4: 1}
    assert "out of cpu memory at batch 64" in caplog.text
    assert "batch of 16 requests" in caplog.text and "settled after out of memory" in caplog.text
    # the next call starts at the settled batch: no new out-of-memory
    call2 = OOMAbove(20)
    assert batcher.run(list(range(40)), [10] * 40, [5] * 40, 64, call2, stats) == [
        f"answer {i}" for i in range(40)]
    assert call2.tried == [16, 16, 8] and stats.oom_retries == 2


def test_a_runtime_error_saying_out_of_memory_is_retried_too() -> None:
    call = OOMAbove(3, error=RuntimeError)
    results = _batcher().run(list(range(8)), [1] * 8, [1] * 8, 8, call, GenerationStats())
    assert results == [f"answer {i}" for i in range(8)] and call.tried == [8, 4, 2, 2, 2, 2]


def test_out_of_memory_at_batch_one_is_an_error_naming_the_fix() -> None:
    call = OOMAbove(0)
    with pytest.raises(GenerationMemoryError) as info:
        _batcher().run([0, 1, 2], [1641, 1641, 1641], [160, 160, 160], 4, call,
                       GenerationStats())
    assert call.tried == [3, 1] and call.answered == []
    message = str(info.value)
    assert "ran out of cpu memory with a single request (1641 prompt tokens + 160 new " \
           "tokens)" in message
    assert FIX in message and info.value.exit_code == 2


def test_other_errors_are_not_retried() -> None:
    def broken(idx: list[int]) -> list[str]:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        _batcher().run([0, 1], [1, 1], [1, 1], 2, broken, GenerationStats())
    with pytest.raises(ValueError):
        _batcher().run([0], [1], [1], 0, broken, GenerationStats())


def test_batches_sized_by_the_memory_estimate() -> None:
    """Rows of growing prompt length (sorted order): each batch is the largest whose estimate,
    with its longest prompt and largest budget, fits the budget -- checked by brute force."""
    shape = MemoryShape(layers=32, kv_heads=32, head_dim=128, heads=32, hidden=4096,
                        intermediate=11008, vocab=32064, dtype_bytes=2)
    weights, budget_gib = 14 * 2**30, 40.0
    lengths = [600 + 40 * i for i in range(60)]
    budgets = [100 + (i % 7) * 20 for i in range(60)]
    batcher = Batcher(shape, weights, torch.device("cpu"), memory_gib=budget_gib)
    seen: list[list[int]] = []

    def call(idx: list[int]) -> list[int]:
        seen.append(idx)
        return idx

    assert batcher.run(list(range(60)), lengths, budgets, 64, call, GenerationStats()) == list(
        range(60))
    start = 0
    for idx in seen:
        fits = [b for b in range(1, 61 - start) if estimate_bytes(
            shape, b, max(lengths[start:start + b]), max(budgets[start:start + b]),
            weights) <= budget_gib * 2**30]
        assert idx == list(range(start, start + max(fits)))
        start += len(idx)
    assert len(seen) > 2 and len(seen[0]) > len(seen[-2])  # longer prompts, smaller batches


def test_one_row_over_the_estimate_is_still_tried(caplog: pytest.LogCaptureFixture) -> None:
    shape = MemoryShape(32, 32, 128, 32, 4096, 11008, 32064, 2)
    batcher = Batcher(shape, 0, torch.device("cpu"), memory_gib=0.5)
    with caplog.at_level(logging.WARNING, logger="stages.models.generation.batching"):
        assert batcher.run([0, 1], [4000, 4000], [100, 100], 8, lambda idx: idx,
                           GenerationStats()) == [0, 1]
    assert "trying anyway" in caplog.text


# -- behind the request cache ----------------------------------------------------------------
def _sentence(prompt: str) -> str:
    return json.loads(prompt.rsplit("Sentence: ", 1)[1].split("\n")[0])


class OOMGenerator:
    """A generator on `Batcher` whose model call runs out of memory on any batch holding a
    sentence with "huge" in it, even alone (unless `fits`); records the sentences it
    answered."""

    def __init__(self, fits: bool = False) -> None:
        self.fits = fits
        self.stats = GenerationStats()
        self.batcher = _batcher()
        self.answered: list[str] = []

    def generate(self, prompts: list[str], max_new_tokens: Any = 96,
                 batch_size: int | None = 8) -> list[str]:
        def call(idx: list[int]) -> list[str]:
            if not self.fits and any("huge" in _sentence(prompts[i]) for i in idx):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            self.answered.extend(_sentence(prompts[i]) for i in idx)
            return ['{"distractors": []}'] * len(idx)

        n = len(prompts)
        return self.batcher.run(list(range(n)), [1] * n, [1] * n, batch_size or 256, call,
                                self.stats)


def _run(generator: Any, sentences: list[str], cache: Path) -> Any:
    plans = [Plan(s, "h", lambda s=s: DistractorJob(s, "negation")) for s in sentences]
    return run_cached(DistractorTask(per_kind=1), plans, cache=cache, model_key="stand-in",
                      load_generator=lambda: generator,
                      to_record=lambda job, outcome: {"values": outcome.values},
                      max_attempts=1, batch_size=2)


def test_oom_at_batch_one_keeps_what_was_finished_and_the_rerun_does_the_rest(
        tmp_path: Path) -> None:
    sentences = ["a cat", "a dog", "a huge bird", "a fish", "a cow"]
    cache = tmp_path / "requests.sqlite"
    first = OOMGenerator()
    with pytest.raises(GenerationMemoryError):
        _run(first, sentences, cache)
    # two jobs per call: the first call finished and was cached; the second ran out of
    # memory at 2, then at 1 ("a huge bird" alone): nothing of it was answered or cached
    assert first.answered == ["a cat", "a dog"] and first.stats.oom_retries == 1
    # the rerun, where everything fits: only the three not cached are generated, once each
    second = OOMGenerator(fits=True)
    records, counts, usage = _run(second, sentences, cache)
    assert counts == {"generated": 3, "cached": 2}
    assert second.answered == ["a huge bird", "a fish", "a cow"]
    assert usage is not None and usage["batch_sizes"] == {"1": 1, "2": 1}
    assert usage["oom_retries"] == 0
    assert sorted(records) == sorted(sentences)


def test_a_static_cache_is_estimated_at_the_longest_earlier_length() -> None:
    """transformers sizes a static cache for the longest call so far: after a 3,000-token
    request, a batch of 1,000-token prompts is estimated with caches of 3,160 tokens."""
    shape = MemoryShape(32, 32, 128, 32, 4096, 11008, 32064, 2)
    weights, budget = 14 * 2**30, 60.0
    batcher = Batcher(shape, weights, torch.device("cpu"), memory_gib=budget,
                      cache_implementation="static")

    def brute(new: int) -> int:
        return max(b for b in range(1, 200) if estimate_bytes(
            shape, b, 1000, new, weights, "sdpa", "static") <= budget * 2**30)

    assert batcher.size([1000] * 199, [160] * 199, 199) == brute(160)
    batcher.run([0], [3000], [160], 1, lambda idx: idx, GenerationStats())
    assert batcher.size([1000] * 199, [160] * 199, 199) == brute(2160) < brute(160)
    dynamic = Batcher(shape, weights, torch.device("cpu"), memory_gib=budget)
    dynamic.run([0], [3000], [160], 1, lambda idx: idx, GenerationStats())
    assert dynamic.static_tokens == 0  # a dynamic cache is sized per call
