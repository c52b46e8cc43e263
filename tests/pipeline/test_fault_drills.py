"""Fault drill: SIGKILL every sharded stage after its first shard, resume, and compare every
Parquet file byte for byte with an uninterrupted run; finished shards are not recomputed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.io import sha256_file

pytestmark = pytest.mark.slow

SETS = ["embed.model=tiny", "embed.pretrained=null", "multiview.backend=template",
        "shards.with_hard_negatives=true", "ingest.images_per_shard=12",
        "embed.images_per_shard=12", "embed.texts_per_shard=80", "negatives.queries_per_shard=60",
        "multiview.images_per_shard=12", "augment.sentences_per_shard=60",
        "shards.rows_per_part=80"]
SHARDED = ["ingest", "embed_images", "embed_texts", "negatives", "mosaic_tables", "multiview",
           "augment", "shards"]


def cli(demo, work, stage, env=None):
    args = ["run", "--stage", stage, "--dataset", "refcoco", "--work-dir", str(work),
            "--data-root", str(demo.refer_root), "--images", str(demo.images_dir)]
    for s in SETS:
        args += ["--set", s]
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def files(work, stage):
    (d,) = [p for p in (work / "refcoco" / stage).iterdir() if not p.name.startswith(".")]
    return d, {p.relative_to(d).as_posix(): sha256_file(p) for p in d.rglob("*.parquet")}


def test_kill_each_sharded_stage_resume_byte_identical(demo, tmp_path):
    clean = tmp_path / "clean"
    res = cli(demo, clean, "shards")
    assert res.returncode == 0, res.stderr
    drill = tmp_path / "drill"
    for stage in SHARDED:
        killed = cli(demo, drill, stage, env={"NEMO_PIPE_TEST_KILL_AFTER_SHARDS": "1",
                                              "NEMO_PIPE_TEST_KILL_STAGE": stage})
        assert killed.returncode == -9, (stage, killed.stderr[-2000:])
        resumed = cli(demo, drill, stage)
        assert resumed.returncode == 0, (stage, resumed.stderr[-2000:])
        d, got = files(drill, stage)
        _, want = files(clean, stage)
        assert got == want and len(got) > 1, stage
        stats = json.loads((d / "_manifest.json").read_text())["stats"]
        assert stats["shards_resumed"] == 1 and stats["shards_total"] > 1, stage


def test_ctrl_c_says_how_to_resume_and_publishes_nothing(demo, tmp_path):
    """Ctrl-C in a run: exit 130 with a line saying what happened and how to go on, no
    traceback, no artifact published; the same command resumes from the finished shards."""
    work = tmp_path / "work"
    hit = cli(demo, work, "ingest", env={"NEMO_PIPE_TEST_KILL_AFTER_SHARDS": "1",
                                         "NEMO_PIPE_TEST_KILL_SIGNAL": "INT"})
    assert hit.returncode == 130, hit.stderr[-2000:]
    assert "interrupted: nothing half-written was published" in hit.stderr
    assert "Run the same command again" in hit.stderr and "Traceback" not in hit.stderr
    stage_dir = work / "refcoco" / "ingest"
    assert not [p for p in stage_dir.iterdir() if not p.name.startswith(".")]
    resumed = cli(demo, work, "ingest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    d, _ = files(work, "ingest")
    stats = json.loads((d / "_manifest.json").read_text())["stats"]
    assert stats["shards_resumed"] == 1 and stats["shards_total"] > 1
