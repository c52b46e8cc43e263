"""Where a command writes what the user asked for (report, preview, audit JSON, calibration,
REFER export, demo data): a path it cannot write is `error: <path>: ...` with exit 2, and a
failed write leaves neither a half-written output nor a temp file behind.

Unwritable paths are made portably (the suite may run as root, who ignores permissions): a path
under a regular file, and a path that is a directory.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.errors import InputError
from pipeline.io import output_dir, output_file


def test_output_file_writes_through_a_temp_and_renames(tmp_path):
    out = tmp_path / "sub" / "r.html"
    with output_file(out, "report") as tmp:
        assert tmp.parent == out.parent and tmp != out
        tmp.write_text("done")
        assert not out.exists()  # nothing at the final name until the block ends
    assert out.read_text() == "done"
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.html"]


def test_output_file_failure_inside_leaves_nothing(tmp_path):
    out = tmp_path / "r.html"
    out.write_text("old")
    with pytest.raises(RuntimeError), output_file(out, "report") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert out.read_text() == "old"  # the previous output stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


@pytest.mark.parametrize("case", ["under_a_file", "a_directory"])
def test_output_file_that_cannot_be_written_is_an_input_error(tmp_path, case):
    blocker = tmp_path / "blocker"
    if case == "under_a_file":
        blocker.write_text("a file")
        out = blocker / "r.html"
    else:
        blocker.mkdir()
        out = blocker
    with pytest.raises(InputError) as err, output_file(out, "report", "OUT path") as tmp:
        tmp.write_text("x")
    msg = str(err.value)
    assert msg.startswith(f"{out}: cannot write the report (") and "writable OUT path" in msg
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["blocker"]


def test_output_dir_refuses_a_file_and_creates_a_folder(tmp_path):
    assert output_dir(tmp_path / "a" / "b", "calibration").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match=r"f: cannot write the calibration there \(it is a "
                                         r"file, not a folder\)"):
        output_dir(tmp_path / "f", "calibration")
    with pytest.raises(InputError, match="cannot write the calibration there"):
        output_dir(tmp_path / "f" / "sub", "calibration")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, env={**os.environ})


def test_demo_data_into_an_unwritable_place_and_a_negative_seed_exit_2(tmp_path):
    (tmp_path / "file").write_text("x")
    res = _cli("demo-data", str(tmp_path / "file" / "demo"), "--n-images", "12")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert "cannot write the demo data" in res.stderr
    res = _cli("demo-data", str(tmp_path / "demo"), "--seed", "-1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--seed" in res.stderr and not (tmp_path / "demo").exists()



@pytest.mark.parametrize("depth", [1, 2])
def test_a_path_under_a_file_is_not_a_directory(tmp_path, depth):
    """`report afile/out.html` said "(File exists)": Python's mkdir reports a file that is the
    folder's parent that way. The reason names what is wrong, for a folder and a file."""
    (tmp_path / "afile").write_text("x")
    under = tmp_path / "afile" / ("sub/" * (depth - 1))
    with pytest.raises(InputError, match=r"cannot write the report \(Not a directory\)"), \
            output_file(under / "out.html", "report") as tmp:
        tmp.write_text("x")
    with pytest.raises(InputError, match=r"cannot write the calibration there \(Not a dir"):
        output_dir(under / "cal", "calibration")


def test_demo_data_names_out_not_its_temp_dir(tmp_path, monkeypatch):
    """On a read-only mount the writer's temp dir beside OUT fails first; the error named it
    (`.../.dd.tmp-xxxx: cannot write the demo data`), a path the user never gave."""
    import errno
    import tempfile

    from typer.testing import CliRunner

    from pipeline.cli import app

    def read_only(prefix="", dir=None, **_):
        path = os.path.join(dir, f"{prefix}abcd")
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    out = tmp_path / "dd"
    res = CliRunner().invoke(app, ["demo-data", str(out), "--n-images", "12"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: {out}: cannot write the demo data (Read-only file "
                                 "system); choose a writable OUT folder"), res.output
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(app, ["demo-data", str(tmp_path / "file" / "dd")])
    assert res.exit_code == 2 and "cannot write the demo data (Not a directory)" in res.output


def test_a_quoted_tilde_in_an_output_path_is_the_home_dir(tmp_path, monkeypatch):
    """`report '~/r.html'` (an env file, a quoted argument) made a dir named `~` in the cwd."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    with output_file("~/out/r.html", "report") as tmp:
        tmp.write_text("done")
    assert output_dir("~/plots", "calibration") == home / "plots"
    assert (home / "out" / "r.html").read_text() == "done" and (home / "plots").is_dir()
    assert not (cwd / "~").exists()
