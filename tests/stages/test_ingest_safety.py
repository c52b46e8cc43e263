"""Unsafe or unreadable dataset files at ingest: pickles that carry code, Python 2 pickles,
image paths that are directories, symlink loops or unreadable, truncated input files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from handmade_refer import py2_pickle, write_handmade

from pipeline.api import open_pipeline
from pipeline.errors import InputError

REFUSAL = "refusing to run code from a pickle"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, env={**os.environ})


def cli_ingest(made, work, *sets):
    extra = [a for s in sets for a in ("--set", s)]
    return run_cli("run", "--stage", "ingest", "--dataset", "refcoco", "--work-dir", str(work),
                   "--data-root", str(made.root), "--images", str(made.images_dir), *extra)


def ingest(made, work, *sets):
    pipe = open_pipeline("refcoco", work, sets=sets, data_root=made.root,
                         images=made.images_dir, progress=False)
    pipe.run("ingest")
    return pipe.artifact_dir("ingest")


def nothing_published(work) -> bool:
    stage_dir = work / "refcoco" / "ingest"
    return not stage_dir.exists() or not [p for p in stage_dir.iterdir()
                                          if not p.name.endswith(".lock")]


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return subprocess.Popen, (["touch", str(self.marker)],)


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("attack", [_System, _Popen, _Eval])
def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path, attack):
    marker = tmp_path / "pwned"
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    refs = [dict(r) for r in made.refs]
    refs[1]["split"] = attack(marker)  # deep inside a real-looking refs list
    made.refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    work = tmp_path / "work"
    res = cli_ingest(made, work)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert REFUSAL in res.stderr and str(made.refs_path) in res.stderr
    assert not marker.exists()
    assert nothing_published(work)


def test_any_other_global_is_refused_too(tmp_path):
    """Even a harmless class: a refs file has no reason to name one."""
    from collections import OrderedDict

    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    made.refs_path.write_bytes(pickle.dumps([OrderedDict(r) for r in made.refs], protocol=2))
    with pytest.raises(InputError, match=f"{REFUSAL}: it asks for collections.OrderedDict"):
        ingest(made, tmp_path / "work")


def _as_python2(refs, non_ascii: bool):
    """The refs as Python 2 pickled them: keys and most strings `str` (bytes here), `raw`
    of some sentences `unicode`, ids ints; optionally one UTF-8 byte string."""
    out = []
    for r in refs:
        rec = {}
        for k, v in r.items():
            if k == "sentences":
                v = [{b"sent_id": s["sent_id"], b"sent": s["sent"].encode(),
                      b"raw": s["raw"] if s["sent_id"] % 2 else s["raw"].encode(),
                      b"tokens": [t.encode() for t in s["tokens"]]} for s in v]
            elif isinstance(v, str):
                v = v.encode()
            rec[k.encode()] = v
        out.append(rec)
    if non_ascii:
        out[0][b"sentences"][0][b"raw"] = "the café's man".encode()
    return out


@pytest.mark.parametrize("non_ascii", [False, True])
def test_python2_protocol2_pickle_loads(tmp_path, non_ascii):
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    made.refs_path.write_bytes(py2_pickle(_as_python2(made.refs, non_ascii)))
    d = ingest(made, tmp_path / "work")
    refs = {r["ref_id"]: r for r in pq.read_table(d / "refs").to_pylist()}
    assert sorted(refs) == [r["ref_id"] for r in made.refs]
    for r in made.refs:
        assert refs[r["ref_id"]]["split"] == r["split"]
        assert refs[r["ref_id"]]["ann_ids"] == [r["ann_id"]]
    sents = {s["sent_id"]: s for s in pq.read_table(d / "sentences").to_pylist()}
    for r in made.refs:
        for s in r["sentences"]:
            got = sents[s["sent_id"]]
            assert (got["sent"], got["tokens"]) == (s["sent"], s["tokens"])
            want_raw = s["raw"]
            if non_ascii and s is made.refs[0]["sentences"][0]:
                want_raw = "the café's man"
            assert got["raw"] == want_raw


def test_python3_protocol2_bytes_and_sets_load_as_text(tmp_path):
    """Python 3 writes bytes at protocol 2 through `_codecs.encode`: allowed, read as text."""
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    refs = [dict(r) for r in made.refs]
    refs[0]["split"] = refs[0]["split"].encode()
    refs[0]["sentences"] = [dict(s, raw="ünïcode".encode()) for s in refs[0]["sentences"]]
    refs[1]["file_name"] = b""
    refs[1]["extra"] = {1, 2}
    made.refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    d = ingest(made, tmp_path / "work")
    got = pq.read_table(d / "sentences").to_pylist()
    first = {s["sent_id"] for s in made.refs[0]["sentences"]}
    assert [s["raw"] for s in got if s["sent_id"] in first] == ["ünïcode"] * len(first)
    assert pq.read_table(d / "refs").to_pylist()[0]["split"] == made.refs[0]["split"]


def _break_images(made):
    """Image 12 becomes a directory, 13 a symlink loop; (their ids, file names)."""
    names = {i["id"]: i["file_name"] for i in made.instances["images"]}
    (made.images_dir / names[12]).unlink()
    (made.images_dir / names[12]).mkdir()
    (made.images_dir / names[13]).unlink()
    os.symlink(names[13], made.images_dir / names[13])  # points at itself
    return names


def test_directory_symlink_loop_unreadable_image_are_errors_rows(tmp_path, monkeypatch):
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    names = _break_images(made)
    import pipeline.filehash as filehash

    real = filehash.hash_file

    def no_permission(path):
        if path.name == names[14]:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(filehash, "hash_file", no_permission)
    d = ingest(made, tmp_path / "work")
    errors = {e["item_id"]: e for e in pq.read_table(d / "errors").to_pylist()}
    assert set(errors) == {12, 13, 14}
    assert errors[12]["error"] == "not a file: a directory"
    assert errors[13]["error"].startswith("unreadable: ") and "symbolic links" in errors[13][
        "error"]
    assert errors[14]["error"] == "unreadable: Permission denied"
    assert errors[12]["path"] == str(made.images_dir / names[12])
    assert pq.read_table(d / "images").column("image_id").to_pylist() == [11]
    assert sorted(pq.read_table(d / "refs").column("ref_id").to_pylist()) == sorted(
        r["ref_id"] for r in made.refs if r["image_id"] == 11)


def test_directory_and_symlink_loop_image_strict_cli_exit_2(tmp_path):
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    names = _break_images(made)
    work = tmp_path / "work"
    res = cli_ingest(made, work, "ingest.strict=true")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert f"{names[12]}: not a file: a directory" in res.stderr
    assert names[13] in res.stderr and "ingest.strict=true" in res.stderr
    assert nothing_published(work)
    # without strict: rc 0 and the two images recorded
    res = cli_ingest(made, work)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("case", ["refs_truncated", "instances_truncated", "refs_directory",
                                  "instances_directory", "refs_not_pickle"])
def test_corrupt_input_files_cli_exit_2_naming_the_file(tmp_path, case):
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    target = made.refs_path if case.startswith("refs") else made.instances_path
    if case.endswith("truncated"):
        data = target.read_bytes()
        target.write_bytes(data[: len(data) * 2 // 3])
    elif case.endswith("directory"):
        target.unlink()
        target.mkdir()
    else:
        target.write_text(json.dumps(made.refs))
    work = tmp_path / "work"
    res = cli_ingest(made, work)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert str(target) in res.stderr
    phrase = {"truncated": "truncated", "directory": "not a regular file",
              "pickle": "cannot be read as a REFER refs pickle"}[case.rsplit("_", 1)[1]]
    assert phrase in res.stderr
    assert nothing_published(work)


@pytest.mark.parametrize("case,phrase", [
    ("image_width_zero", "image 12 has width 0, not a positive integer"),
    ("ann_id_text", "annotation 'abc': id 'abc' is not an integer"),
    ("annotations_not_list", "annotations must be a list of JSON objects"),
    ("category_id_float", "category id 1.5 is not an integer"),
])
def test_malformed_instances_records_name_file_and_record(tmp_path, case, phrase):
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    inst = json.loads(made.instances_path.read_text())
    if case == "image_width_zero":
        next(i for i in inst["images"] if i["id"] == 12)["width"] = 0
    elif case == "ann_id_text":
        inst["annotations"].append(dict(inst["annotations"][0], id="abc"))
    elif case == "annotations_not_list":
        inst["annotations"] = {"1": inst["annotations"][0]}
    else:
        inst["categories"][0]["id"] = 1.5
    made.instances_path.write_text(json.dumps(inst))
    with pytest.raises(InputError) as err:
        ingest(made, tmp_path / "work")
    assert str(err.value).startswith(str(made.instances_path)) and phrase in str(err.value)
