"""Per-process caches of heavy objects: models, parsed upstream tables, lookups.

Shards run in worker processes (spawned, or dask workers) and are handed small picklable
payloads; each worker builds what a shard needs -- a CLIP model, a VLM, an image's referent
rows -- the first time it needs it, and every later shard in that process reuses it (the
pattern of clip-retrieval's workers: nothing large is pickled, each worker loads a model once).

`process_cached(namespace, key, build)` is that pattern, once, for every stage:

* the value is built inside the calling process, never shipped from the driver; a forked child
  starts with an empty cache (a CUDA model or an open file is not shared across a fork);
* thread-safe: two threads asking for the same key build it once (the second waits for the
  first); different keys build concurrently, and a builder may itself ask for other keys;
* a build that raises stores nothing, so the next call tries again;
* ``max_entries`` bounds a namespace (the oldest entries go first): per-upstream lookups keep
  only the latest tables (``max_entries=1``), so a long-lived worker that moves on to another
  dataset does not hold both;
* `clear()` empties it (tests; or to free a model).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["clear", "process_cached"]

T = TypeVar("T")

_GUARD = threading.Lock()  # protects the two dicts below (never held while building)
_ENTRIES: dict[str, dict[Hashable, Any]] = {}  # namespace -> key -> value, oldest first
_BUILDING: dict[tuple[str, Hashable], threading.Lock] = {}  # one lock per key being built
_OWNER_PID = os.getpid()


def _forget_if_forked() -> None:
    """A forked child inherits the parent's cache: drop it (called with _GUARD held)."""
    global _OWNER_PID
    if os.getpid() != _OWNER_PID:
        _ENTRIES.clear()
        _BUILDING.clear()
        _OWNER_PID = os.getpid()


def process_cached(namespace: str, key: Hashable, build: Callable[[], T], *,
                   max_entries: int | None = None) -> T:
    """The value of (`namespace`, `key`) in this process, built by `build()` on first use.

    `namespace` names what is cached (``"multiview.instances"``, ``"generator"``); `key` says
    which one (e.g. the upstream table's content hash, or model + device). With `max_entries`,
    building a new key drops the namespace's oldest entries beyond that many.
    """
    if max_entries is not None and max_entries < 1:
        raise ValueError("max_entries must be >= 1")
    with _GUARD:
        _forget_if_forked()
        entries = _ENTRIES.setdefault(namespace, {})
        if key in entries:
            return entries[key]
        lock = _BUILDING.setdefault((namespace, key), threading.Lock())
    with lock:  # only one thread builds a key; the others wait here, then find it built
        try:
            with _GUARD:
                entries = _ENTRIES.setdefault(namespace, {})
                if key in entries:
                    return entries[key]
            value = build()
            with _GUARD:
                entries = _ENTRIES.setdefault(namespace, {})
                entries[key] = value
                if max_entries is not None:
                    for old in list(entries)[:-max_entries]:
                        del entries[old]
            return value
        finally:
            with _GUARD:
                if _BUILDING.get((namespace, key)) is lock:
                    del _BUILDING[(namespace, key)]


def clear(namespace: str | None = None) -> None:
    """Forget every cached value (or those of one namespace); they are rebuilt on next use."""
    with _GUARD:
        if namespace is None:
            _ENTRIES.clear()
        else:
            _ENTRIES.pop(namespace, None)
