"""Offline access to the Hugging Face hub cache, shared by the CLIP and the LLM/VLM loaders."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """Force huggingface_hub offline while a model is resolved from the local cache.

    huggingface_hub reads HF_HUB_OFFLINE from the environment only at import time, so setting
    the env var now would do nothing; `constants.HF_HUB_OFFLINE` is what `is_offline_mode()`
    (also used by transformers and open_clip) checks on every call. Offline, lookups are
    answered from the cache with no HTTP request: no timeouts, no retries.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - comes with transformers and open_clip
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
