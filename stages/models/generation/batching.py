"""The batches of a transformers generator: as large as memory allows, smaller after an OOM.

`Batcher` cuts a generator's requests (already in the order they are to run: by prompt
length, or as given) into consecutive batches and runs each through the generator's own call.
Each batch is the largest that

* is at most the configured cap (``multiview.batch_size``; `AUTO_BATCH_CAP` for ``auto``),
* is at most the batch this generator last settled on after running out of memory,
* and fits, by `memory.estimate_bytes`, in the memory available now (`memory.available_bytes`)
  with the batch's longest prompt and largest answer budget (left padding makes every row that
  long).

A call that runs out of CUDA memory is retried on the first half of the same requests, after
the cache is emptied; nothing is answered until a call returns, so no request is lost or
answered twice. The halved size becomes the generator's ceiling for its later calls (it
settles: one OOM per process, not one per call). At one request, out of memory is a
`GenerationMemoryError` that says what to lower. The batch sizes that ran and the number of
halvings go to the generator's `GenerationStats` (and from there to the stage's manifest); a
change of batch size is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from stages.models.generation.answers import GenerationStats
from stages.models.generation.memory import (
    GenerationMemoryError,
    MemoryShape,
    available_bytes,
    estimate_bytes,
    is_out_of_memory,
    release_memory,
)

__all__ = ["AUTO_BATCH_CAP", "Batcher"]

log = logging.getLogger(__name__)

AUTO_BATCH_CAP = 256  # batch_size=auto: beyond this, decoding is no faster per request
_GIB = 2**30


class Batcher:
    """Batch sizes for one loaded model (see the module docstring).

    `shape`: the model's `MemoryShape`; `weights`: its resident bytes; `device`: where it
    runs; `memory_gib`: a budget (None: free CUDA memory, or the host's available RAM on CPU);
    `attn_implementation` / `cache_implementation`: as loaded and generated, for the estimate;
    `fix`: what the batch-1 out-of-memory message tells the user to change.
    """

    def __init__(self, shape: MemoryShape | None, weights: int, device: Any, *,
                 memory_gib: float | None = None, attn_implementation: str = "sdpa",
                 cache_implementation: str = "dynamic", what: str = "model",
                 fix: str = "lower max_new_tokens or use a smaller model/dtype") -> None:
        self.shape = shape
        self.weights = int(weights)
        self.device = device
        self.memory_gib = memory_gib
        self.attn_implementation = attn_implementation
        self.cache_implementation = cache_implementation
        self.what = what
        self.fix = fix
        self.ceiling: int | None = None  # the batch settled on after running out of memory
        self.failed_at: int | None = None  # the batch that last ran out of memory
        self.last: int | None = None  # the last batch size that ran (for the log)
        # transformers sizes a static cache for the longest (prompt + new tokens) of any earlier
        # call too (so that a compiled model is not recompiled): the estimate does the same
        self.static_tokens = 0

    def size(self, lengths: Sequence[int], budgets: Sequence[int], cap: int) -> int:
        """The next batch's size for requests with these prompt `lengths` and answer
        `budgets` (in run order, from the next one on): see the module docstring. Never 0:
        when not even one request fits by the estimate, one is tried anyway (the estimate
        errs on the large side; a real OOM then says what to change)."""
        limit = min(cap, len(lengths), self.ceiling or cap)
        available = (None if self.shape is None else
                     available_bytes(self.device, self.memory_gib, self.weights))
        if available is None or limit < 1:
            return max(1, limit)
        longest = 0
        largest = 0
        fits = 0
        for rows in range(1, limit + 1):  # the estimate grows with the rows: stop at a miss
            longest = max(longest, int(lengths[rows - 1]))
            largest = max(largest, int(budgets[rows - 1]))
            need = estimate_bytes(self.shape, rows, longest, self._new_tokens(longest, largest),
                                  self.weights, self.attn_implementation,
                                  self.cache_implementation)
            if need > available:
                break
            fits = rows
        if fits == 0:
            need = estimate_bytes(self.shape, 1, int(lengths[0]), int(budgets[0]), self.weights,
                                  self.attn_implementation, self.cache_implementation)
            log.warning("%s: one request (%d prompt + %d new tokens) needs about %.1f GiB by "
                        "the estimate, %.1f GiB are available; trying anyway", self.what,
                        lengths[0], budgets[0], need / _GIB, available / _GIB)
        return max(1, fits)

    def run(self, order: Sequence[int], lengths: Sequence[int], budgets: Sequence[int],
            cap: int, call: Callable[[list[int]], list[Any]],
            stats: GenerationStats) -> list[Any]:
        """``call(indices)`` on consecutive batches of `order` (request indices, in run
        order); results by request index (a list as long as `lengths`, which with `budgets` is
        indexed by request)."""
        if cap < 1:
            raise ValueError("batch_size must be >= 1")
        results: list[Any] = [None] * len(lengths)
        pos = 0
        while pos < len(order):
            rest = order[pos:pos + min(cap, self.ceiling or cap)]
            size = self.size([lengths[i] for i in rest], [budgets[i] for i in rest], cap)
            idx = list(rest[:size])
            self._log_size(size, max(lengths[i] for i in idx), max(budgets[i] for i in idx))
            t0 = time.perf_counter()
            try:
                answers = call(idx)
            except Exception as exc:  # only an out-of-memory is retried
                if not is_out_of_memory(exc):
                    raise
                stats.seconds += time.perf_counter() - t0  # the lost time counts too
                release_memory()
                self._halve(size, max(lengths[i] for i in idx), max(budgets[i] for i in idx),
                            exc, stats)
                continue
            for i, answer in zip(idx, answers, strict=True):
                results[i] = answer
            if self.cache_implementation == "static":
                self.static_tokens = max(self.static_tokens, max(
                    lengths[i] for i in idx) + max(budgets[i] for i in idx))
            stats.batch_sizes[size] = stats.batch_sizes.get(size, 0) + 1
            pos += size
        return results

    def _new_tokens(self, prompt: int, new: int) -> int:
        """The answer budget the estimate counts: with a static cache, enough to reach the
        longest earlier call's length."""
        if self.cache_implementation != "static":
            return new
        return max(new, self.static_tokens - prompt)

    def _halve(self, size: int, prompt: int, new: int, exc: BaseException,
               stats: GenerationStats) -> None:
        if size <= 1:
            raise GenerationMemoryError(
                f"{self.what} ran out of {self.device} memory with a single request "
                f"({prompt} prompt tokens + {new} new tokens): {self.fix} "
                f"[{type(exc).__name__}: {str(exc)[:200]}]") from exc
        self.ceiling = size // 2
        self.failed_at = size
        stats.oom_retries += 1
        log.warning("%s: out of %s memory at batch %d (prompt %d + %d new tokens); retrying "
                    "the same requests at batch %d", self.what, self.device, size, prompt, new,
                    self.ceiling)

    def _log_size(self, size: int, prompt: int, new: int) -> None:
        if size == self.last:
            return
        self.last = size
        log.info("%s: batch of %d requests (prompt <= %d tokens, <= %d new tokens%s)", self.what,
                 size, prompt, new,
                 f"; settled after out of memory at {self.failed_at}" if self.failed_at else "")
