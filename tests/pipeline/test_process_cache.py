"""pipeline.process_cache: built once per key and process, thread-safe, bounded, clearable."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest

from pipeline import process_cache
from pipeline.process_cache import process_cached


@pytest.fixture(autouse=True)
def _empty() -> None:
    process_cache.clear()
    yield
    process_cache.clear()


class Counter:
    """A builder that counts its calls and returns a fresh object each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        return object()


def test_built_once_per_key_and_namespace() -> None:
    build = Counter()
    first = process_cached("ns", ("model", "cpu"), build)
    assert process_cached("ns", ("model", "cpu"), build) is first and build.calls == 1
    other = process_cached("ns", ("model", "cuda"), build)
    assert other is not first and build.calls == 2
    assert process_cached("other-ns", ("model", "cpu"), build) is not first  # namespaces apart
    assert build.calls == 3
    process_cache.clear("ns")
    assert process_cached("ns", ("model", "cpu"), build) is not first and build.calls == 4
    assert process_cached("other-ns", ("model", "cpu"), build) is not None and build.calls == 4


def test_max_entries_keeps_the_latest() -> None:
    build = Counter()
    a = process_cached("tables", "a", build, max_entries=1)
    b = process_cached("tables", "b", build, max_entries=1)
    assert process_cached("tables", "b", build, max_entries=1) is b and build.calls == 2
    assert process_cached("tables", "a", build, max_entries=1) is not a and build.calls == 3
    with pytest.raises(ValueError):
        process_cached("tables", "c", build, max_entries=0)


def test_a_failed_build_stores_nothing() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return "ok"

    with pytest.raises(OSError):
        process_cached("ns", "k", flaky)
    assert process_cached("ns", "k", flaky) == "ok" and len(calls) == 2
    assert process_cached("ns", "k", flaky) == "ok" and len(calls) == 2


def test_threads_asking_for_one_key_build_it_once() -> None:
    release = threading.Event()
    build_calls = []

    def slow_build() -> object:
        build_calls.append(threading.get_ident())
        release.wait(10)  # holds the key while the other threads arrive
        return object()

    results: list[object] = []
    lock = threading.Lock()

    def ask() -> None:
        value = process_cached("model", "llava", slow_build)
        with lock:
            results.append(value)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # let the others reach the cache (not an assertion: passes either way)
    release.set()
    for t in threads:
        t.join(10)
    assert len(build_calls) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_a_builder_may_ask_for_other_keys() -> None:
    """Per-key locks: a build that needs another cached value does not deadlock."""
    inner = Counter()

    def outer() -> tuple[object, object]:
        return process_cached("ns", "inner", inner), object()

    pair = process_cached("ns", "outer", outer)
    assert pair[0] is process_cached("ns", "inner", inner) and inner.calls == 1


def _child_value(queue: mp.Queue) -> None:
    queue.put(process_cached("ns", "k", lambda: f"built in {os.getpid()}"))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_builds_its_own() -> None:
    parent = process_cached("ns", "k", lambda: f"built in {os.getpid()}")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_value, args=(queue,))
    child.start()
    value = queue.get(timeout=30)
    child.join(30)
    assert value == f"built in {child.pid}" != parent
    assert process_cached("ns", "k", lambda: "rebuilt") == parent  # the parent keeps its own
