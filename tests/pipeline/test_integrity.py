"""The integrity chain on the toy stages: verified upstream reads, rebuild of a corrupt upstream,
`verify` marks, `status`/plan showing `corrupt`. Oracles: sha256 by hashlib here, the values
computed by hand, and the bytes of a clean run in a fresh work dir."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import toy_stages

from pipeline.cache import ArtifactStore
from pipeline.config import load_config
from pipeline.errors import UpstreamCorrupt
from pipeline.executor import LocalExecutor
from pipeline.registry import Registry
from pipeline.runner import Pipeline
from pipeline.stage import RunEnv
from pipeline.upstream import UpstreamFile, manifest_files, upstream_table
from pipeline.verify import verify_store


def make_pipe(work: Path, *sets: str) -> Pipeline:
    reg = Registry(toy_stages.STAGES)
    return Pipeline(reg, load_config(reg, sets=list(sets)), RunEnv(work_dir=work, dataset="toy"),
                    LocalExecutor(1), progress=False)


def flip_byte(path: Path) -> None:
    """One byte changed, same size: the plan's size check cannot see it."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def parts(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.parquet"))}


@pytest.fixture
def toy_log(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv("TOY_LOG", str(log))
    return log


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_upstream_file_checks_sha256_and_pickles(tmp_path):
    pipe = make_pipe(tmp_path / "w")
    pipe.run("numbers")
    d = pipe.artifact_dir("numbers")
    manifest = json.loads((d / "_manifest.json").read_text())
    table = upstream_table(d, "numbers", d.name, manifest_files(manifest, d), "numbers")
    assert [p.rel for p in table.parts] == [f"numbers/part-{i:05d}.parquet" for i in range(4)]
    # the reference carries the hash the manifest lists, which is the file's own sha256
    part = table.parts[1]
    assert part.sha256 == hashlib.sha256(part.path.read_bytes()).hexdigest()
    assert table.read().column("value").to_pylist() == list(range(20))
    again = pickle.loads(pickle.dumps(table))
    assert again == table and again.ident == table.ident

    flip_byte(part.path)
    with pytest.raises(UpstreamCorrupt) as err:
        table.read()
    assert "numbers/part-00001.parquet" in str(err.value) and err.value.file == part.rel
    assert (err.value.stage, err.value.key) == ("numbers", d.name)
    # the error crosses process boundaries (shard workers, dask) with its fields
    back = pickle.loads(pickle.dumps(err.value))
    assert (back.stage, back.key, back.file, str(back)) == ("numbers", d.name, part.rel,
                                                            str(err.value))
    part.path.unlink()
    with pytest.raises(UpstreamCorrupt, match="is missing"):
        UpstreamFile(str(d), "numbers", d.name, part.rel, part.sha256).read_bytes()


def test_flipped_byte_upstream_is_rebuilt_before_use(tmp_path, toy_log):
    work = tmp_path / "w"
    make_pipe(work).run("squares")
    numbers = make_pipe(work).artifact_dir("numbers")
    clean_numbers = parts(numbers)
    flip_byte(numbers / "numbers" / "part-00002.parquet")
    n = len(lines(toy_log))

    pipe = make_pipe(work, "squares.power=3")  # a sweep: new squares key, numbers cached
    plan = pipe.run("squares")
    assert [(i.name, i.state) for i in plan] == [("numbers", "cached"), ("squares", "stale")]
    # numbers was rebuilt (all its shards ran again), then squares ran again
    assert sorted(lines(toy_log)[n:]) == sorted(["squares", *(f"numbers {i}" for i in range(4)),
                                                 "squares"])
    assert parts(numbers) == clean_numbers
    assert not (numbers / "_CORRUPT").exists()
    got = pq.read_table(pipe.artifact_dir("squares") / "squares").column("value").to_pylist()
    assert got == [v ** 3 for v in range(20)]
    fresh = make_pipe(tmp_path / "fresh", "squares.power=3")
    fresh.run("squares")
    assert parts(pipe.artifact_dir("squares")) == parts(fresh.artifact_dir("squares"))
    assert not list(pipe.store.stage_dir("toy", "squares").glob(".tmp-*"))


def test_upstream_still_corrupt_after_rebuild_is_an_error(tmp_path, monkeypatch):
    work = tmp_path / "w"
    make_pipe(work).run("numbers")
    numbers = make_pipe(work).artifact_dir("numbers")
    flip_byte(numbers / "numbers" / "part-00000.parquet")

    publish = ArtifactStore.publish

    def publish_then_rot(self, tmp, final):  # a disk that corrupts what is written to it
        publish(self, tmp, final)
        if final.parent.name == "numbers":
            flip_byte(final / "numbers" / "part-00000.parquet")

    monkeypatch.setattr(ArtifactStore, "publish", publish_then_rot)
    pipe = make_pipe(work)
    with pytest.raises(UpstreamCorrupt) as err:
        pipe.run("squares")
    assert "numbers/part-00000.parquet" in str(err.value) and "after rebuilding" in str(err.value)
    squares = pipe.store.stage_dir("toy", "squares")
    left = [p for p in squares.iterdir() if not p.name.endswith(".lock")] if squares.exists() \
        else []
    assert left == []  # nothing published, no tmp dir


def test_verify_marks_status_shows_corrupt_and_run_rebuilds(tmp_path, toy_log):
    work = tmp_path / "w"
    make_pipe(work).run("numbers")
    d = make_pipe(work).artifact_dir("numbers")
    part = d / "numbers" / "part-00001.parquet"
    want = hashlib.sha256(part.read_bytes()).hexdigest()
    flip_byte(part)

    checked, problems = verify_store(ArtifactStore(work))
    assert checked == 1 and [(p.file, p.what) for p in problems] == [
        ("numbers/part-00001.parquet", "checksum differs from the manifest")]
    mark = json.loads((d / "_CORRUPT").read_text())
    assert mark["problems"][0]["file"] == "numbers/part-00001.parquet"
    # the mark is no "file not listed in the manifest" on the next verify
    _, again = verify_store(ArtifactStore(work))
    assert [p.file for p in again] == ["numbers/part-00001.parquet"]

    pipe = make_pipe(work)
    status = {r.name: r for r in pipe.status()}
    assert status["numbers"].state == "corrupt" and "part-00001" in status["numbers"].note
    n = len(lines(toy_log))
    plan = pipe.run("numbers")
    assert [(i.name, i.state) for i in plan] == [("numbers", "corrupt")]
    assert len(lines(toy_log)) - n == 4  # rebuilt, not "cached"
    assert hashlib.sha256(part.read_bytes()).hexdigest() == want
    assert not (d / "_CORRUPT").exists()
    assert {r.name: r.state for r in make_pipe(work).status()}["numbers"] == "done"
    assert verify_store(ArtifactStore(work)) == (1, [])


def test_clean_verify_removes_a_stale_mark(tmp_path):
    work = tmp_path / "w"
    make_pipe(work).run("numbers")
    d = make_pipe(work).artifact_dir("numbers")
    part = d / "numbers" / "part-00000.parquet"
    good = part.read_bytes()
    flip_byte(part)
    verify_store(ArtifactStore(work))
    assert (d / "_CORRUPT").exists()
    part.write_bytes(good)  # restored by hand from a backup
    assert verify_store(ArtifactStore(work)) == (1, [])
    assert not (d / "_CORRUPT").exists()


@pytest.mark.parametrize("text", ["{not json", "[]", '{"files": {"a": 3}}'])
def test_corrupt_manifest_is_corrupt_in_status_and_rebuilt(tmp_path, text):
    work = tmp_path / "w"
    make_pipe(work).run("numbers")
    d = make_pipe(work).artifact_dir("numbers")
    (d / "_manifest.json").write_text(text)
    status = {r.name: r for r in make_pipe(work).status()}
    assert status["numbers"].state == "corrupt" and "_manifest.json" in status["numbers"].note
    plan = make_pipe(work).run("squares")
    assert [(i.name, i.state) for i in plan] == [("numbers", "corrupt"), ("squares", "missing")]
    assert json.loads((d / "_manifest.json").read_text())["stage"] == "numbers"
    got = pq.read_table(make_pipe(work).artifact_dir("squares") / "squares")
    assert got.column("value").to_pylist() == [v * v for v in range(20)]


def test_matching_hash_but_not_parquet_is_corrupt(tmp_path):
    """A manifest that lists the sha256 of a non-Parquet file: the parse error is reported as
    that file's corruption, never as a pyarrow traceback."""
    junk = tmp_path / "t" / "part-00000.parquet"
    junk.parent.mkdir()
    junk.write_bytes(b"not parquet at all")
    ref = UpstreamFile(str(tmp_path), "numbers", "k", "t/part-00000.parquet",
                       hashlib.sha256(junk.read_bytes()).hexdigest())
    assert ref.read_bytes() == b"not parquet at all"
    with pytest.raises(UpstreamCorrupt, match="cannot be parsed as Parquet"):
        ref.read_table()
    wrong = UpstreamFile(str(tmp_path), "numbers", "k", "t/part-00000.parquet", "0" * 64)
    with pytest.raises(UpstreamCorrupt, match="does not match the sha256"):
        wrong.read_table()  # the mismatch wins over the parse error


@pytest.mark.parametrize("what", ["dir", "file"])
def test_a_link_into_an_artifact_is_found_by_verify_and_the_plan(tmp_path, what):
    """A linked dir of parts (a split to a trainer that globs part files) was invisible to
    verify and to the plan's quick check: rglob does not enter linked dirs."""
    from pipeline.verify import quick_check

    work = tmp_path / "w"
    make_pipe(work).run("numbers")
    d = make_pipe(work).artifact_dir("numbers")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "part-00000.parquet").write_bytes((d / "numbers/part-00000.parquet").read_bytes())
    link = d / "extra" if what == "dir" else d / "numbers" / "part-00099.parquet"
    link.symlink_to(outside if what == "dir" else outside / "part-00000.parquet")
    rel = link.relative_to(d).as_posix()
    assert [(p.file, p.what) for p in quick_check(d)] == [
        (rel, "a symbolic link, not listed in the manifest")]
    checked, problems = verify_store(ArtifactStore(work))
    assert checked == 1 and [p.file for p in problems] == [rel]
    assert {r.name: r.state for r in make_pipe(work).status()}["numbers"] == "corrupt"
