"""Where shards run: in this process (default) or in a pool of local processes.

An executor only maps a top-level function over small picklable tasks and yields results as
they finish; publishing, markers and resume stay in the driver, so any executor gets them.
Heavy objects (models, parsed inputs) are built inside the shard function, never pickled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol


class Executor(Protocol):
    name: str

    def map_unordered(
        self, fn: Callable[[Any], Any], tasks: Iterable[Any]
    ) -> Iterator[Any]:
        """Apply `fn` to each task; yield results in completion order."""
        ...


class LocalExecutor:
    """Sequential in this process (workers=1) or a spawn-started process pool."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        if self.workers == 1:
            for task in tasks:
                yield fn(task)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(fn, t) for t in tasks]
            for fut in as_completed(futures):
                yield fut.result()
