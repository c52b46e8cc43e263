"""The shard runtime's bookkeeping against what a stage declares and what a retry leaves.

Each test builds a small stage whose correct artifact is known by hand (the tables it must
hold, the values in them) and checks the published files, not the runtime's own records.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.executor import LocalExecutor
from pipeline.io import MANIFEST, read_json
from pipeline.registry import Registry
from pipeline.runner import Pipeline
from pipeline.shards import ShardWriter, _run_shard_job, _ShardJob
from pipeline.stage import Params, RunEnv, ShardTask, Stage, StageContext


def _phase_a(payload: int, writer: ShardWriter[Params]) -> dict[str, str]:
    writer.write_table("a", pa.table({"v": [payload]}))
    return {"phase": "a"}


def _phase_b(payload: int, writer: ShardWriter[Params]) -> dict[str, str]:
    writer.write_table("b", pa.table({"v": [payload * 10]}))
    return {"phase": "b"}


class TwoPhases(Stage[Params]):
    """Two sharded phases over the same indices, as a stage with a map and a reduce has."""

    name = "two_phases"
    version = "1"
    tables = ("a", "b")

    def run(self, ctx: StageContext[Params]) -> None:
        tasks = [ShardTask(i, i) for i in range(3)]
        assert [s["phase"] for s in ctx.run_shards(_phase_a, tasks)] == ["a"] * 3
        assert [s["phase"] for s in ctx.run_shards(_phase_b, tasks)] == ["b"] * 3


class ForgetsATable(Stage[Params]):
    """Declares two tables and writes one: a stage bug the runner must not publish."""

    name = "forgets"
    version = "1"
    tables = ("kept", "forgotten")

    def run(self, ctx: StageContext[Params]) -> None:
        ctx.run_shards(_phase_a, [ShardTask(0, 1)])  # writes table "a", not the declared ones
        ctx.write_table("kept", pa.table({"v": [1]}))


def _pipe(work: Path, *stages: type[Stage[Params]]) -> Pipeline:
    reg = Registry(list(stages))
    return Pipeline(reg, load_config(reg), RunEnv(work_dir=work, dataset="toy"),
                    LocalExecutor(1), progress=False)


def _values(d: Path, table: str) -> list[int]:
    return sorted(v for p in sorted((d / table).glob("part-*.parquet"))
                  for v in pq.read_table(p).column("v").to_pylist())


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
def test_a_second_sharded_phase_runs_its_own_shards(tmp_path, resume, monkeypatch):
    """Both calls number their shards from 0: the second took the first's markers for its own,
    skipped its work and published without table b."""
    pipe = _pipe(tmp_path, TwoPhases)
    if resume:  # a first attempt dies in phase b after phase a finished
        def dies(payload: int, writer: ShardWriter[Params]) -> None:
            raise RuntimeError("killed in phase b")
        monkeypatch.setattr(__import__(__name__), "_phase_b", dies)
        with pytest.raises(RuntimeError, match="killed in phase b"):
            pipe.run("two_phases")
        monkeypatch.undo()
    pipe.run("two_phases")
    d = pipe.artifact_dir("two_phases")
    assert _values(d, "a") == [0, 1, 2]
    assert _values(d, "b") == [0, 10, 20]
    stats = read_json(d / MANIFEST)["stats"]
    assert stats["shards_total"] == 6
    assert stats["shards_resumed"] == (3 if resume else 0)


def test_an_artifact_missing_a_declared_table_is_not_published(tmp_path):
    pipe = _pipe(tmp_path, ForgetsATable)
    with pytest.raises(RuntimeError, match="declared table.*forgotten.*nothing was published"):
        pipe.run("forgets")
    key = pipe.resolve("forgets").key
    assert not pipe.store.is_published("toy", "forgets", key)
    # the finished shard is kept for the rerun, as the message says
    assert (pipe.store.tmp_dir("toy", "forgets", key) / "_shards" / "00000.json").is_file()


def test_a_retried_shard_leaves_nothing_of_the_dead_attempt(tmp_path):
    """dask reruns a task whose worker died in the same staging dir: the dead attempt's
    half-written parts were committed with the new ones, and its `.tmp` file published."""
    staging = tmp_path / "staging"
    (staging / "a").mkdir(parents=True)
    (staging / "a" / ".part-00000.parquet.123.456.tmp").write_bytes(b"half")
    (staging / "a" / "part-00099.parquet").write_bytes(b"an old part")
    done = _run_shard_job(_ShardJob(_phase_a, 0, 7, Params(), staging, "1", 0))
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    assert files == ["a/part-00000.parquet"]
    assert done.stats == {"phase": "a"}
    assert pq.read_table(staging / "a" / "part-00000.parquet").column("v").to_pylist() == [7]


class WritesATemporary(Stage[Params]):
    """Leaves a writer's dot-temporary next to its table, as a writer killed mid-file would."""

    name = "temp_leftover"
    version = "1"
    tables = ("t",)

    def run(self, ctx: StageContext[Params]) -> None:
        ctx.write_table("t", pa.table({"v": [1]}))
        (ctx.tmp_dir / "t" / ".part-00001.parquet.1.2.tmp").write_bytes(b"half")


def test_dot_temporaries_are_not_published(tmp_path):
    """Left in the artifact, unlisted, they made every reader call it corrupt."""
    pipe = _pipe(tmp_path, WritesATemporary)
    pipe.run("temp_leftover")
    d = pipe.artifact_dir("temp_leftover")
    on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
    assert on_disk == {"t/part-00000.parquet", "_manifest.json", "_SUCCESS"}
    assert _pipe(tmp_path, WritesATemporary).plan("temp_leftover")[0].state == "cached"
