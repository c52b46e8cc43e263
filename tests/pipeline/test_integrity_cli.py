"""The integrity chain and storage errors as a user meets them, through the CLI in a subprocess
(the exit status matters): issue 13's flipped byte in a negatives part under a K sweep, `verify`
-> `status` -> `run`, corrupt artifacts under `path` / `api.load`, and a corrupt manifest.
Oracles: hashlib sha256 in the test, and the bytes of a clean run in a fresh work dir."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--set", "embed.model=tiny", "--set", "embed.pretrained=null"]
NEG = "negatives.queries_per_shard=40"  # several negatives parts, so one can be damaged


def cli(*args: str, cwd: Path | None = None, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(root), **(env or {})})


def where(demo, work: Path) -> list[str]:
    return ["--dataset", "refcoco", "--work-dir", str(work), "--data-root", str(demo.refer_root),
            "--images", str(demo.images_dir)]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def parquet_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.parquet"))}


def matches_manifest(d: Path) -> bool:
    """Independent of the code under test: every listed file's sha256 by hashlib."""
    files = json.loads((d / "_manifest.json").read_text())["files"]
    return all(hashlib.sha256((d / rel).read_bytes()).hexdigest() == f["sha256"]
               for rel, f in files.items())


def published(work: Path, stage: str) -> list[Path]:
    d = work / "refcoco" / stage
    return sorted(p for p in d.iterdir() if (p / "_SUCCESS").exists()) if d.is_dir() else []


def test_k_sweep_over_a_flipped_byte_rebuilds_negatives_first(demo, tmp_path):
    work, fresh = tmp_path / "w", tmp_path / "fresh"
    first = cli("run", "--stage", "mosaic_tables", *where(demo, work), *TINY, "--set", NEG)
    assert first.returncode == 0, first.stderr
    (neg,) = published(work, "negatives")
    part = neg / "negatives" / "part-00001.parquet"
    size = part.stat().st_size
    flip_byte(part)
    assert part.stat().st_size == size and not matches_manifest(neg)

    sweep = cli("run", "--stage", "mosaic_tables", *where(demo, work), *TINY, "--set", NEG,
                "--set", "mosaic_tables.k=5", "--workers", "2")  # shards in other processes
    assert sweep.returncode == 0, sweep.stderr
    assert "negatives        cached" in sweep.stdout  # the plan's size check could not see it
    assert "negatives/part-00001.parquet" in sweep.stderr and "rebuilding" in sweep.stderr
    assert matches_manifest(neg) and not (neg / "_CORRUPT").exists()

    clean = cli("run", "--stage", "mosaic_tables", *where(demo, fresh), *TINY, "--set", NEG,
                "--set", "mosaic_tables.k=5")
    assert clean.returncode == 0, clean.stderr
    swept = Path(sweep.stdout.strip().splitlines()[-1])
    assert swept.name == Path(clean.stdout.strip().splitlines()[-1]).name  # same key
    got = parquet_bytes(swept)
    assert got and got == parquet_bytes(Path(clean.stdout.strip().splitlines()[-1]))
    assert parquet_bytes(neg) == parquet_bytes(published(fresh, "negatives")[0])

    # commands that read artifacts outside a stage verify too: calibrate refuses the flip
    flip_byte(part)
    cal = cli("calibrate", str(tmp_path / "cal"), "--dataset", "refcoco", "--work-dir",
              str(work), *TINY, "--set", NEG)
    assert cal.returncode == 2 and cal.stderr.startswith("error: "), cal.stderr
    assert "negatives/part-00001.parquet" in cal.stderr and "sha256" in cal.stderr
    assert not (tmp_path / "cal" / "calibration.parquet").exists()

    # and the same flip after the fact: verify reports it, status shows it, run rebuilds it
    ver = cli("verify", "--work-dir", str(work))
    assert ver.returncode == 1 and "negatives/part-00001.parquet" in ver.stderr
    short = ["--dataset", "refcoco", "--work-dir", str(work), *TINY, "--set", NEG]
    status = cli("status", *short)
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("negatives"))
    assert line.split()[1] == "corrupt", status.stdout
    run = cli("run", "--stage", "mosaic_tables", *short, "--set", "mosaic_tables.k=5")
    assert run.returncode == 0, run.stderr
    assert "negatives        corrupt" in run.stdout and "mosaic_tables    cached" in run.stdout
    assert parquet_bytes(neg) == parquet_bytes(published(fresh, "negatives")[0])
    assert cli("verify", "--work-dir", str(work)).returncode == 0


def test_verify_marks_then_status_path_load_and_run(demo, tmp_path):
    work = tmp_path / "w"
    assert cli("run", "--stage", "ingest", *where(demo, work)).returncode == 0
    (art,) = published(work, "ingest")
    good = parquet_bytes(art)
    flip_byte(art / "refs" / "part-00000.parquet")
    short = ["--dataset", "refcoco", "--work-dir", str(work)]

    ver = cli("verify", "--work-dir", str(work))
    assert ver.returncode == 1 and "refs/part-00000.parquet" in ver.stderr
    assert json.loads((art / "_CORRUPT").read_text())["problems"][0]["file"] == \
        "refs/part-00000.parquet"
    again = cli("verify", "--work-dir", str(work))
    assert "not listed" not in again.stderr and "1 problem(s)" in again.stdout

    status = cli("status", *short)
    assert status.returncode == 0, status.stderr
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("ingest"))
    assert line.split()[1] == "corrupt" and "refs/part-00000.parquet" in line

    for args in (["path", "--stage", "ingest"], ["status", "--stage", "ingest"]):
        res = cli(*args, *short)
        assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr
        assert "refs/part-00000.parquet" in res.stderr and "Traceback" not in res.stderr
    load = subprocess.run(
        [sys.executable, "-c", "from pipeline import api; "
         f"api.load('ingest', 'refcoco', table='sentences', work_dir={str(work)!r})"],
        capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert load.returncode != 0 and "ArtifactCorrupt" in load.stderr

    run = cli("run", "--stage", "ingest", *short)
    assert run.returncode == 0 and run.stdout.split()[:2] == ["ingest", "corrupt"]
    assert parquet_bytes(art) == good and matches_manifest(art)
    assert not (art / "_CORRUPT").exists()
    assert cli("verify", "--work-dir", str(work)).returncode == 0


def test_load_refuses_a_flipped_byte_it_reads(demo, tmp_path):
    """No verify in between: `load` hashes the parts it reads (same size, so no cheap check)."""
    from pipeline import api
    from pipeline.errors import ArtifactCorrupt

    work = tmp_path / "w"
    assert cli("run", "--stage", "ingest", *where(demo, work)).returncode == 0
    (art,) = published(work, "ingest")
    refs = api.load("ingest", "refcoco", table="refs", work_dir=work)
    assert refs.num_rows == json.loads((art / "_manifest.json").read_text())["tables"]["refs"]
    flip_byte(art / "refs" / "part-00000.parquet")
    with pytest.raises(ArtifactCorrupt, match="refs/part-00000.parquet"):
        api.load("ingest", "refcoco", table="refs", work_dir=work)


def test_corrupt_manifest_under_status_and_path(demo, tmp_path):
    work = tmp_path / "w"
    assert cli("run", "--stage", "ingest", *where(demo, work)).returncode == 0
    (art,) = published(work, "ingest")
    (art / "_manifest.json").write_text('{"stage": "ingest", "files": ')  # cut short
    short = ["--dataset", "refcoco", "--work-dir", str(work)]
    status = cli("status", *short)
    assert status.returncode == 0 and "Traceback" not in status.stderr
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("ingest"))
    assert line.split()[1] == "corrupt" and "_manifest.json" in line
    res = cli("path", "--stage", "ingest", *short)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "_manifest.json" in \
        res.stderr
    run = cli("run", "--stage", "ingest", *short)
    assert run.returncode == 0 and run.stdout.split()[:2] == ["ingest", "corrupt"]
    assert matches_manifest(art)
