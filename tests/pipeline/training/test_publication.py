"""An artifact that is not wholly published is never `done` (issue 18, item 3).

A published ingest artifact is broken in each way a crash, a disk or a user breaks one (no
`_SUCCESS`, an unparsable manifest, the manifest of another artifact, an extra file, a missing
file); then every reader is asked: `status`, `path`, `api.load`, a downstream stage's plan, and
(for a shards directory) NemoDataset. None may treat it as done. The oracle is the breakage
itself: each case is made by hand, outside the engine's code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_dataset import _tiny
from typer.testing import CliRunner

from pipeline import api
from pipeline.cli import app
from pipeline.dataset import NemoDataset
from pipeline.errors import NemoError

runner = CliRunner()


def _unparsable(art: Path) -> None:
    (art / "_manifest.json").write_text('{"stage": "ingest", "files": ')


def _foreign_manifest(art: Path) -> None:
    m = json.loads((art / "_manifest.json").read_text())
    m["key"] = "0123456789abcdef"  # another artifact's manifest copied over this one
    (art / "_manifest.json").write_text(json.dumps(m))


def _extra_file(art: Path) -> None:
    shutil.copy(art / "refs" / "part-00000.parquet", art / "refs" / "part-00042.parquet")


def _missing_file(art: Path) -> None:
    (art / "refs" / "part-00000.parquet").unlink()


BREAKS: dict[str, Callable[[Path], None]] = {
    "no_success": lambda art: (art / "_SUCCESS").unlink(),
    "unparsable_manifest": _unparsable,
    "foreign_manifest": _foreign_manifest,
    "extra_file": _extra_file,
    "missing_file": _missing_file,
}


@pytest.fixture(scope="module")
def published(demo, tmp_path_factory) -> Path:
    """A work dir with refcoco's ingest published (copied per test before breaking it)."""
    work = tmp_path_factory.mktemp("published") / "work"
    res = runner.invoke(app, ["run", "--stage", "ingest", "--dataset", "refcoco", "--work-dir",
                              str(work), "--data-root", str(demo.refer_root), "--images",
                              str(demo.images_dir)])
    assert res.exit_code == 0, res.output
    return work


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_a_broken_artifact_is_never_done(published, tmp_path, how):
    work = tmp_path / "work"
    shutil.copytree(published, work)
    pipe = api.open_pipeline("refcoco", work)
    art = pipe.artifact_dir("ingest")
    assert [r.state for r in pipe.status() if r.name == "ingest"] == ["done"]
    BREAKS[how](art)
    pipe = api.open_pipeline("refcoco", work)

    assert [r.state for r in pipe.status() if r.name == "ingest"] != ["done"]
    short = ["--dataset", "refcoco", "--work-dir", str(work)]
    path = runner.invoke(app, ["path", "--stage", "ingest", "--table", "refs", *short])
    assert path.exit_code in (1, 2), path.output  # 1: not published, 2: corrupt
    with pytest.raises(NemoError):
        api.load("ingest", "refcoco", "refs", work_dir=work)
    ingest = next(i for i in pipe.plan("embed_texts") if i.name == "ingest")
    assert ingest.needs_run, ingest  # a downstream stage rebuilds it, never reads it


@pytest.mark.parametrize("how", ["no_success", "unparsable_manifest", "extra_file",
                                 "missing_file", "marked_corrupt"])
def test_nemo_dataset_refuses_a_broken_shards_dir(tmp_path, how):
    root, images = _tiny(tmp_path)
    NemoDataset(root, "train", images)  # the intact copy opens
    if how == "no_success":
        (root / "_SUCCESS").unlink()
    elif how == "unparsable_manifest":
        (root / "_manifest.json").write_text("{")
    elif how == "extra_file":
        shutil.copy(root / "train" / "part-00000.parquet", root / "train" / "part-00009.parquet")
    elif how == "missing_file":
        (root / "val" / "part-00000.parquet").unlink()
    else:  # what `nemo-pipe verify` writes into an artifact it found damaged
        (root / "_CORRUPT").write_text(json.dumps(
            {"problems": [{"file": "train/part-00000.parquet", "what": "checksum differs"}]}))
    with pytest.raises((FileNotFoundError, ValueError)):
        ds = NemoDataset(root, "train", images)
        ds[0]  # even if opening passed, no sample may come out
