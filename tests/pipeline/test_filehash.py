"""The input-hash cache is only a cache: where its database cannot be made, digests are still
right, and the user is told once, not once per use."""

from __future__ import annotations

import logging

import xxhash

from pipeline.filehash import FileHashCache


def test_unusable_cache_hashes_without_it_and_warns_once(tmp_path, caplog):
    (tmp_path / "blocker").write_text("a file where the cache dir should go")
    db = tmp_path / "blocker" / ".cache" / "file_hashes.sqlite"
    data = tmp_path / "input.bin"
    data.write_bytes(b"x" * 1000)
    with caplog.at_level(logging.WARNING, logger="pipeline.filehash"):
        first, second = FileHashCache(db), FileHashCache(db)
        assert not first.usable and not second.usable
        digests = [c.digests([data]) for c in (first, second)]
    warnings = [r for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warnings) == 1 and str(db) in warnings[0].getMessage()
    want = xxhash.xxh3_128(b"x" * 1000).hexdigest()  # the digest, computed independently
    for d in digests:
        got = d[data.absolute()]
        assert (got.size, got.digest) == (1000, want)
    # a usable cache elsewhere gives the same
    ok = FileHashCache(tmp_path / "cache" / "h.sqlite")
    assert ok.usable and ok.digests([data])[data.absolute()].digest == want
