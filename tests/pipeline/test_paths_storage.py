"""Paths stay inside the work dir, and storage problems are `error: ...` with exit 2.

`--dataset PATH.yaml` (relative or absolute) keeps artifacts under `<work>/<manifest name>/`;
`gc` refuses anything that resolves outside the work dir (links included); a work dir that is a
file, a read-only work dir and a full disk (also under the SQLite request cache) end in
`error: ...`, exit 2, nothing published. The CLI runs in a subprocess: the exit status is the
point. Read-only and tiny disks are real mounts in a private mount namespace (`unshare -m`);
those tests skip where that is not allowed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import StorageError
from pipeline.request_cache import RequestCache

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def locations(demo) -> list[str]:
    return ["--data-root", str(demo.refer_root), "--images", str(demo.images_dir)]


def write_manifest(path: Path, name: str) -> Path:
    data = yaml.safe_load((ROOT / "data_manifests" / "refcoco.yaml").read_text())
    data["name"] = name
    data.pop("expected", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def error_exit(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


def in_mount_namespace(setup: str, *argv: str) -> subprocess.CompletedProcess:
    """Run `setup` (mount commands) then argv in a private mount namespace; skip if not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot create a mount namespace here")
    script = f"{setup} || exit 99; exec \"$@\""
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                          *argv], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode == 99:
        pytest.skip(f"mount not allowed here: {res.stderr.strip()}")
    return res


# -- --dataset PATH.yaml ------------------------------------------------------------------------
def test_manifest_path_relative_or_absolute_lands_under_its_name(demo, tmp_path):
    manifest = write_manifest(tmp_path / "cfg" / "m.yaml", "my-refcoco")
    cwd = tmp_path / "cfg" / "a" / "b"
    cwd.mkdir(parents=True)
    work = tmp_path / "w"
    before = tree(tmp_path)

    rel = cli("run", "--stage", "ingest", "--dataset", "../../m.yaml", "--work-dir", str(work),
              *locations(demo), cwd=cwd)
    assert rel.returncode == 0, rel.stderr
    artifact = Path(rel.stdout.strip().splitlines()[-1])
    assert artifact.parent == work / "my-refcoco" / "ingest" and (artifact / "_SUCCESS").exists()
    # nothing was written anywhere else (the issue: `<work>/../../m.yaml/...`)
    assert {p for p in tree(tmp_path) if p != "w" and not p.startswith("w/")} == before
    assert not any("m.yaml/" in p for p in tree(tmp_path))

    absolute = cli("run", "--stage", "ingest", "--dataset", str(manifest), "--work-dir",
                   str(work))
    assert absolute.returncode == 0, absolute.stderr
    assert absolute.stdout.split()[:2] == ["ingest", "cached"]  # same artifact, same place
    status = cli("status", "--dataset", "m.yaml", "--work-dir", str(work), cwd=manifest.parent)
    assert status.returncode == 0 and "ingest           done" in status.stdout
    assert cli("verify", "--dataset", str(manifest), "--work-dir", str(work)).returncode == 0
    (artifact.parent / ".tmp-0123456789abcdef").mkdir()  # an abandoned run, for gc
    gc = cli("gc", "--dataset", "../../m.yaml", "--work-dir", str(work), cwd=cwd)
    assert gc.returncode == 0 and "freed" in gc.stdout, gc.stderr
    assert not (artifact.parent / ".tmp-0123456789abcdef").exists() and artifact.exists()


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "", "-x", "x" * 65])
def test_manifest_name_must_be_a_plain_dir_name(demo, tmp_path, name):
    manifest = write_manifest(tmp_path / "m.yaml", name)
    work = tmp_path / "w"
    res = cli("run", "--stage", "ingest", "--dataset", str(manifest), "--work-dir", str(work),
              *locations(demo))
    error_exit(res, "m.yaml", "name")
    assert not work.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]


@pytest.mark.parametrize("dataset", ["../x", "/etc", "refcoco/../refcoco+", "."])
def test_dataset_that_is_neither_name_nor_manifest_is_refused(tmp_path, dataset):
    error_exit(cli("status", "--dataset", dataset, "--work-dir", str(tmp_path / "w")),
               "unknown dataset")
    assert not (tmp_path / "w").exists()


# -- gc -----------------------------------------------------------------------------------------
def test_gc_refuses_a_dataset_path_outside_the_work_dir(tmp_path):
    work = tmp_path / "w"
    victim = tmp_path / "x" / "ingest" / ".tmp-0123456789abcdef"
    victim.mkdir(parents=True)
    (victim / "keep").write_text("not yours")
    work.mkdir()
    error_exit(cli("gc", "--dataset", "../x", "--work-dir", str(work)), "unknown dataset")
    assert (victim / "keep").read_text() == "not yours"


@pytest.mark.parametrize("link_at", ["stage", "dataset", "tmp"])
def test_gc_never_deletes_through_a_symlink(tmp_path, link_at):
    work = tmp_path / "w"
    outside = tmp_path / "elsewhere"
    (outside / ".tmp-0123456789abcdef").mkdir(parents=True)
    (outside / ".tmp-0123456789abcdef" / "keep").write_text("not yours")
    (outside / ".trash-old").mkdir()
    stage_dir = work / "refcoco" / "ingest"
    if link_at == "dataset":
        (outside / "ingest").mkdir()
        (outside / "ingest" / ".tmp-0123456789abcdef").symlink_to(
            outside / ".tmp-0123456789abcdef")
        work.mkdir()
        (work / "refcoco").symlink_to(outside)
    elif link_at == "stage":
        (work / "refcoco").mkdir(parents=True)
        stage_dir.symlink_to(outside)
    else:
        stage_dir.mkdir(parents=True)
        (stage_dir / ".tmp-0123456789abcdef").symlink_to(outside / ".tmp-0123456789abcdef")
    before = tree(outside)
    res = cli("gc", "--dataset", "refcoco", "--work-dir", str(work))
    error_exit(res, "outside the work dir")
    assert tree(outside) == before
    assert (outside / ".tmp-0123456789abcdef" / "keep").read_text() == "not yours"


# -- work dir -----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "status", "verify"])
def test_work_dir_that_is_a_file(demo, tmp_path, command):
    afile = tmp_path / "work"
    afile.write_text("I am a file")
    args = {"run": ["run", "--stage", "ingest", "--dataset", "refcoco", *locations(demo)],
            "status": ["status", "--dataset", "refcoco"], "verify": ["verify"]}[command]
    for work in (afile, afile / "sub"):
        error_exit(cli(*args, "--work-dir", str(work)), str(afile), "not a directory")
    assert afile.read_text() == "I am a file"


def test_read_only_work_dir_run_fails_status_works(demo, tmp_path):
    work = tmp_path / "w"
    first = cli("run", "--stage", "ingest", "--dataset", "refcoco", "--work-dir", str(work),
                *locations(demo))
    assert first.returncode == 0, first.stderr
    before = tree(work)
    py = [sys.executable, "-m", "pipeline.cli"]
    ro = f"mount --bind {work} {work} && mount -o remount,bind,ro {work}"
    run = in_mount_namespace(ro, *py, "run", "--stage", "ingest", "--dataset", "refcoco",
                             "--work-dir", str(work), "--set", "ingest.images_per_shard=3")
    error_exit(run, "Read-only file system", str(work))
    assert tree(work) == before  # nothing published, nothing half-written
    status = in_mount_namespace(ro, *py, "status", "--dataset", "refcoco", "--work-dir",
                                str(work))
    assert status.returncode == 0 and "ingest           done" in status.stdout, status.stderr


def test_full_disk_during_a_run(demo, tmp_path):
    work = tmp_path / "tiny"
    work.mkdir()
    res = in_mount_namespace(f"mount -t tmpfs -o size=48k tmpfs {work}", sys.executable, "-m",
                             "pipeline.cli", "run", "--stage", "ingest", "--dataset", "refcoco",
                             "--work-dir", str(work / "w"), *locations(demo))
    error_exit(res, "No space left on device", "nothing was published")


def test_file_size_limit_during_a_run(demo, tmp_path):
    """EFBIG (`ulimit -f`, FAT32's 4 GiB) was a traceback, not a storage error."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 1024, resource.RLIM_INFINITY))

    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--stage", "ingest", "--dataset",
         "refcoco", "--work-dir", str(tmp_path / "w"), *locations(demo)],
        capture_output=True, text=True, preexec_fn=limit,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"})
    error_exit(res, "File too large", "nothing was published")


# -- the SQLite request cache ---------------------------------------------------------------------
def test_request_cache_on_a_full_disk_is_a_storage_error(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    code = ("from pipeline.request_cache import RequestCache\n"
            "from pipeline.errors import StorageError\n"
            "try:\n"
            f"    c = RequestCache({str(d / 'r.sqlite')!r})\n"
            "    c.put_many('m', 'p', {str(i): 'x' * 5000 for i in range(200)})\n"
            "except StorageError as e:\n"
            "    print('STORAGE', e); raise SystemExit(2)\n")
    res = in_mount_namespace(f"mount -t tmpfs -o size=32k tmpfs {d}", sys.executable, "-c", code)
    assert res.returncode == 2 and res.stdout.startswith("STORAGE request cache"), res
    assert "r.sqlite" in res.stdout


def test_request_cache_database_or_disk_is_full(tmp_path):
    """SQLite's own 'database or disk is full' (a page limit stands in for the disk)."""
    cache = RequestCache(tmp_path / "r.sqlite")
    cache._connect().execute("PRAGMA max_page_count = 8")
    with pytest.raises(StorageError, match="database or disk is full"):
        cache.put_many("m", "p", {str(i): "x" * 5000 for i in range(50)})
    cache.close()


def test_request_cache_unable_to_open_is_a_storage_error(tmp_path):
    (tmp_path / "r.sqlite").mkdir()  # a directory where the database file should be
    with pytest.raises(StorageError, match="unable to open database"):
        RequestCache(tmp_path / "r.sqlite")
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="request cache"):
        RequestCache(tmp_path / "file" / "r.sqlite")  # its dir is under a file
