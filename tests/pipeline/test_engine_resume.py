"""Resume from a staging area broken the ways a crash or a user breaks it (issue 18, item 2).

Each test leaves a toy stage's tmp dir as a killed run would (shards 0 and 1 finished, shard 2
crashed), breaks it in one way, resumes, and compares the published bytes and file set with an
uninterrupted run in another work dir: the oracle is that clean run, never the engine's own view.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_engine import artifact_bytes, log_lines, make_pipe

from pipeline.io import MANIFEST, SUCCESS


def _files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


@pytest.fixture
def crashed(tmp_path, toy_log, monkeypatch):
    """(pipeline, its tmp dir, clean pipeline) after shard 2 of `numbers` crashed."""
    clean = make_pipe(tmp_path / "clean")
    clean.run("numbers")
    monkeypatch.setenv("TOY_FAIL_AT", "2")
    pipe = make_pipe(tmp_path / "crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipe.run("numbers")
    monkeypatch.delenv("TOY_FAIL_AT")
    tmp = pipe.store.tmp_dir("toy", "numbers", pipe.resolve("numbers").key)
    assert sorted(p.name for p in (tmp / "_shards").iterdir()) == ["00000.json", "00001.json"]
    toy_log.write_text("")
    return pipe, tmp, clean


def _resume_and_compare(pipe, clean, toy_log: Path, recomputed: list[str]) -> None:
    pipe = make_pipe(pipe.env.work_dir)  # a new process would build a new pipeline
    pipe.run("numbers")
    assert sorted(log_lines(toy_log)) == sorted(recomputed)
    assert artifact_bytes(pipe, "numbers") == artifact_bytes(clean, "numbers")
    got, want = pipe.artifact_dir("numbers"), clean.artifact_dir("numbers")
    assert _files(got) == _files(want)
    listed = json.loads((got / MANIFEST).read_text())["files"]
    assert set(listed) == _files(got) - {MANIFEST, SUCCESS}


BREAKS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    # a marker whose file is gone: shard 0 is run again
    "marker_without_files": (lambda tmp: (tmp / "numbers/part-00000.parquet").unlink(),
                             ["numbers 0"]),
    # a finished shard's files whose marker was never written (killed between the two)
    "files_without_marker": (lambda tmp: (tmp / "_shards/00001.json").unlink(), ["numbers 1"]),
    # a part cut in half (disk trouble, a user's copy): same name, wrong size
    "half_written_file": (
        lambda tmp: (tmp / "numbers/part-00001.parquet").write_bytes(
            (tmp / "numbers/part-00001.parquet").read_bytes()[:100]),
        ["numbers 1"]),
    # a marker left by another version of the stage (another key) or an older marker format
    "marker_of_another_version": (
        lambda tmp: (tmp / "_shards/00000.json").write_text(json.dumps(
            {**json.loads((tmp / "_shards/00000.json").read_text()), "key": "0" * 16})),
        ["numbers 0"]),
    "marker_in_old_format": (
        lambda tmp: (tmp / "_shards/00001.json").write_text(json.dumps(
            {"files": ["numbers/part-00001.parquet"], "stats": {"count": 5}})),
        ["numbers 1"]),
    "unparsable_marker": (lambda tmp: (tmp / "_shards/00000.json").write_text("{not json"),
                          ["numbers 0"]),
    "marker_not_an_object": (lambda tmp: (tmp / "_shards/00001.json").write_text("[1, 2]"),
                             ["numbers 1"]),
    # a file nobody wrote: never published
    "stray_file": (
        lambda tmp: (tmp / "numbers/part-00077.parquet").write_bytes(
            (tmp / "numbers/part-00000.parquet").read_bytes()),
        []),
}


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_resume_from_a_broken_staging_area_is_byte_identical(crashed, toy_log, how):
    pipe, tmp, clean = crashed
    breaker, extra = BREAKS[how]
    breaker(tmp)
    _resume_and_compare(pipe, clean, toy_log, ["numbers 2", "numbers 3", *extra])


def test_gc_keeps_resume_state_a_run_took_after_gc_listed_it(crashed):
    """gc listed the temp dir while no run held its lock, then deleted it while a resuming
    run (which took the lock meanwhile) was writing there: the run published an artifact
    without the shards gc had deleted, and verify saw nothing wrong."""
    from pipeline.gc import collect, find_garbage

    pipe, tmp, _ = crashed
    garbage = find_garbage(pipe, keep_current=False)
    assert [g.path for g in garbage] == [tmp]
    key = pipe.resolve("numbers").key
    with pipe.store.lock("toy", "numbers", key):  # a resuming run holds it now
        assert collect(garbage, pipe.env.work_dir) == 0
        assert (tmp / "_shards" / "00000.json").is_file()
    assert collect(garbage, pipe.env.work_dir) > 0  # no run: gc may take it
    assert not tmp.exists()


def test_gc_leaves_no_lock_file_of_its_own(crashed):
    from pipeline.gc import collect, find_garbage

    pipe, tmp, _ = crashed
    stage_dir = tmp.parent
    for lock in stage_dir.glob(".*.lock"):
        lock.unlink()  # a temp dir whose lock file is gone (an older version, a user)
    collect(find_garbage(pipe, keep_current=False), pipe.env.work_dir)
    assert not tmp.exists()
    assert not list(stage_dir.glob(".*.lock"))
