"""RequestCache: durable, multi-process, multi-thread cache of finished generation requests."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.request_cache import RequestCache, prompt_hash

ROOT = Path(__file__).resolve().parents[2]


def _run_child(code: str, *args: str) -> subprocess.Popen[str]:
    """Start a Python child that can import `pipeline` (the repo root on sys.path)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_prompt_hash_is_short_stable_and_separates_parts() -> None:
    h = prompt_hash("describe the man")
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == prompt_hash("describe the man")
    assert h != prompt_hash("describe the man", {"max_new_tokens": 256})
    assert prompt_hash("ab", "c") != prompt_hash("a", "bc")
    # dict order does not matter: the same parameters give the same key
    assert prompt_hash("x", {"a": 1, "b": 2}) == prompt_hash("x", {"b": 2, "a": 1})


def test_put_get_roundtrip(tmp_path: Path) -> None:
    value = {"appearance": "the man in a white shirt", "action": None, "n": [1, 2.5], "ok": True}
    with RequestCache(tmp_path / "c.sqlite") as cache:
        assert cache.get("m", "h", "1") is None
        assert cache.get("m", "h", "1", default="missing") == "missing"
        assert not cache.contains("m", "h", "1")
        cache.put("m", "h", "1", value)
        assert cache.get("m", "h", "1") == value
        assert cache.contains("m", "h", "1")
        # keys are the full triple: other model / hash / item are separate entries
        assert cache.get("m2", "h", "1") is None
        assert cache.get("m", "h2", "1") is None
        cache.put("m", "h", "1", "replaced")
        assert cache.get("m", "h", "1") == "replaced"
        assert cache.count() == 1
        cache.put_many("m", "h", {"2": 2, "3": [3]})
        cache.put("other", "h", "9", None)
        assert cache.count() == 4 and cache.count("m") == 3 and cache.count("m", "h2") == 0
        assert cache.get_many("m", "h", ["1", "3", "404"]) == {"1": "replaced", "3": [3]}
        assert cache.contains("other", "h", "9")  # a stored null is still "present"
        assert list(cache.keys("m")) == [("m", "h", "1"), ("m", "h", "2"), ("m", "h", "3")]
        assert cache.delete("m", "h", "2") and not cache.delete("m", "h", "2")


def test_get_many_beyond_sqlite_parameter_limit(tmp_path: Path) -> None:
    with RequestCache(tmp_path / "c.sqlite") as cache:
        cache.put_many("m", "h", {str(i): i for i in range(1234)})
        got = cache.get_many("m", "h", [str(i) for i in range(0, 1300)])
        assert len(got) == 1234 and got["1233"] == 1233


def test_non_json_value_writes_nothing(tmp_path: Path) -> None:
    with RequestCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises((TypeError, ValueError)):
            cache.put_many("m", "h", {"a": 1, "b": object()})
        with pytest.raises(ValueError):
            cache.put("m", "h", "nan", float("nan"))  # not valid JSON
        assert cache.count() == 0


def test_persists_across_instances_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.sqlite"
    cache = RequestCache(path)
    cache.put("llava", prompt_hash("p"), "42", {"a": 1})
    cache.close()
    with pytest.raises(RuntimeError):
        cache.get("llava", prompt_hash("p"), "42")
    with RequestCache(path) as again:
        assert again.get("llava", prompt_hash("p"), "42") == {"a": 1}
        mode = again._connect().execute("PRAGMA journal_mode").fetchone()[0]
        assert mode.lower() == "wal"


def test_sigkill_right_after_put_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    n = 50
    child = _run_child(
        """
        import os, signal, sys
        from pipeline.request_cache import RequestCache
        cache = RequestCache(sys.argv[1])
        for i in range(int(sys.argv[2])):
            cache.put("model", "hash", str(i), {"i": i})
        # no close(), no atexit, no flush: the process dies right here
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(path), str(n),
    )
    _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err
    with RequestCache(path) as cache:
        assert cache.count() == n
        assert cache.get_many("model", "hash", [str(i) for i in range(n)]) == {
            str(i): {"i": i} for i in range(n)
        }


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    n = 150
    code = """
        import sys, time
        from pipeline.request_cache import RequestCache
        path, tag, n, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        while time.time() < start:  # start both writers at the same moment
            time.sleep(0.001)
        cache = RequestCache(path)  # both also create the fresh file concurrently
        for i in range(n):
            cache.put("model", tag, str(i), [tag, i])
        cache.close()
        """
    start = str(time.time() + 1.5)
    children = [_run_child(code, str(path), tag, str(n), start) for tag in ("a", "b")]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    with RequestCache(path) as cache:
        assert cache.count() == 2 * n
        for tag in ("a", "b"):
            got = cache.get_many("model", tag, [str(i) for i in range(n)])
            assert got == {str(i): [tag, i] for i in range(n)}


def test_threads_share_one_cache(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with RequestCache(tmp_path / "c.sqlite") as cache:

        def work(t: int) -> None:
            try:
                for i in range(40):
                    cache.put("m", f"t{t}", str(i), i)
                    assert cache.get("m", f"t{t}", str(i)) == i
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        assert cache.count() == 6 * 40


def test_bad_synchronous_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RequestCache(tmp_path / "c.sqlite", synchronous="sometimes")
