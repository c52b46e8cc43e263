"""Malformed records in the REFER files: each is an InputError naming the file and the record,
or a named, counted exclusion, never a quietly changed table or a traceback.

The oracle is the hand-made dataset (tests/handmade_refer.py): every test edits one record and
knows what ingest must say or publish.
"""

from __future__ import annotations

import json
import pickle

import pyarrow.parquet as pq
import pytest
from handmade_refer import write_handmade

from pipeline.api import open_pipeline
from pipeline.errors import InputError
from stages.refer.files import load_pickle_data


def ingest(made, work):
    pipe = open_pipeline("refcoco", work, data_root=made.root, images=made.images_dir,
                         progress=False)
    pipe.run("ingest")
    d = pipe.artifact_dir("ingest")
    return d, json.loads((d / "_manifest.json").read_text())["stats"]


def nothing_published(work) -> bool:
    stage_dir = work / "refcoco" / "ingest"
    return not stage_dir.exists() or not [p for p in stage_dir.iterdir()
                                          if not p.name.endswith(".lock")]


def _edit_instances(made, edit):
    inst = json.loads(made.instances_path.read_text())
    edit(inst)
    made.instances_path.write_text(json.dumps(inst))


def _edit_refs(made, edit):
    refs = pickle.loads(made.refs_path.read_bytes())
    edit(refs)
    made.refs_path.write_bytes(pickle.dumps(refs, protocol=2))


def _ann(inst, ann_id):
    return next(a for a in inst["annotations"] if a["id"] == ann_id)


INSTANCES_CASES = {
    # the last record would silently win: another file, size or mask for the same id
    "duplicate_image_id": (lambda i: i["images"].append(dict(i["images"][1], id=11)),
                           "image id 11 appears twice"),
    "duplicate_annotation_id": (lambda i: i["annotations"].append(dict(_ann(i, 102), id=101)),
                                "annotation id 101 appears twice"),
    "duplicate_category_id": (lambda i: i["categories"].append({"id": 1, "name": "dog"}),
                              "category id 1 appears twice"),
    # ids their Parquet columns cannot hold (int64; int32 for categories)
    "annotation_id_past_int64": (lambda i: i["annotations"].append(
        dict(_ann(i, 102), id=2**64)), "id 18446744073709551616 is outside the range"),
    "category_id_past_int32": (lambda i: i["categories"].append({"id": 2**40, "name": "dog"}),
                               "category id 1099511627776 is outside the range"),
    # text Parquet cannot write, and file names no file can have
    "lone_surrogate_category": (lambda i: i["categories"][0].update(name="car\udc80"),
                                "category 1: name 'car\\udc80' is not valid Unicode"),
    "lone_surrogate_file_name": (lambda i: i["images"][0].update(file_name="a\ud83d.jpg"),
                                 "image 11: file_name 'a\\ud83d.jpg' is not valid Unicode"),
    "nul_in_file_name": (lambda i: i["images"][0].update(file_name="a\x00.jpg"),
                         "image 11 has file_name 'a\\x00.jpg', which cannot be a file's name"),
    "file_name_number": (lambda i: i["images"][0].update(file_name=11),
                         "image 11: file_name 11 is int, not text"),
}


def test_json_number_past_the_int_digit_limit_is_an_input_error(tmp_path):
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    text = made.instances_path.read_text()
    made.instances_path.write_text(text.replace('"info": {}', '"info": ' + "9" * 5000, 1))
    with pytest.raises(InputError) as err:
        ingest(made, tmp_path / "work")
    assert str(err.value).startswith(f"{made.instances_path}: the instances file is not valid")


def _sentence(refs, ref_id=1, k=0):
    return next(r for r in refs if r["ref_id"] == ref_id)["sentences"][k]


REFS_CASES = {
    # would have been published as "None", "['man', 'left']" or one token per character
    "sent_none": (lambda r: _sentence(r).update(sent=None), "sent None is NoneType, not text"),
    "sent_list": (lambda r: _sentence(r).update(sent=["man", "left"]), "is list, not text"),
    "raw_number": (lambda r: _sentence(r).update(raw=5), "raw 5 is int, not text"),
    "tokens_none": (lambda r: _sentence(r).update(tokens=None), "has tokens None, not a list"),
    "tokens_string": (lambda r: _sentence(r).update(tokens="man left"), "not a list of words"),
    "lone_surrogate_sent": (lambda r: _sentence(r).update(sent="a man \ud83d"),
                            "is not valid Unicode text"),
    "sent_id_past_int64": (lambda r: _sentence(r).update(sent_id=2**63),
                           "sent_id 9223372036854775808 is outside the range"),
    # a no-target ref exists only in gRefCOCO; REFER refs always have their one target
    "refer_no_target": (lambda r: r[0].update(ann_id=-1), "a REFER ref has a target"),
    "refer_empty_targets": (lambda r: r[0].update(ann_id=[]), "a REFER ref has a target"),
    "target_and_no_target": (lambda r: r[0].update(ann_id=[101, -1]),
                             "lists both targets [101] and no-target (-1)"),
}


@pytest.mark.parametrize("file,case", [*(("instances", c) for c in sorted(INSTANCES_CASES)),
                                       *(("refs", c) for c in sorted(REFS_CASES))])
def test_malformed_record_is_an_input_error(tmp_path, file, case):
    """The error names the file (and, in the refs file, the ref) and says what is wrong."""
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    if file == "instances":
        edit, phrase = INSTANCES_CASES[case]
        _edit_instances(made, edit)
        prefix = str(made.instances_path)
    else:
        edit, phrase = REFS_CASES[case]
        _edit_refs(made, edit)
        prefix = f"{made.refs_path}: ref "
    with pytest.raises(InputError) as err:
        ingest(made, tmp_path / "work")
    assert str(err.value).startswith(prefix), err.value
    assert phrase in str(err.value), err.value
    assert nothing_published(tmp_path / "work")


def test_refs_file_holding_strings_names_what_it_holds(tmp_path):
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    made.refs_path.write_bytes(pickle.dumps(["ref one", "ref two"], protocol=2))
    with pytest.raises(InputError) as err:
        ingest(made, tmp_path / "work")
    assert str(err.value) == (f"{made.refs_path}: expected a list of ref records (dicts), but "
                              "it holds str 'ref one'; is this a REFER refs file?")


def test_blank_sentences_are_left_out_and_counted(tmp_path):
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    blanked = []

    def blank(refs):
        for ref_id, k, text in ((1, 0, ""), (2, 1, "   "), (3, 2, "\t\n")):
            s = _sentence(refs, ref_id, k)
            s.update(sent=text)
            blanked.append(s["sent_id"])

    _edit_refs(made, blank)
    all_ids = {s["sent_id"] for r in made.refs for s in r["sentences"]}
    d, stats = ingest(made, tmp_path / "work")
    sents = pq.read_table(d / "sentences").to_pylist()
    assert {s["sent_id"] for s in sents} == all_ids - set(blanked)
    assert all(s["sent"].strip() for s in sents)
    assert stats["dropped_sentences_by_reason"] == {"blank": 3}
    assert stats["dropped_sentences"] == 3
    # the refs themselves stay: each still has sentences
    assert pq.read_table(d / "refs").num_rows == len(made.refs)


def test_python3_protocol4_bytes_load_as_text(tmp_path):
    """Protocol >= 3 stores bytes as bytes whatever encoding the reader asks for: they must
    come out as text, not as the string "b'...'" in the sentences table."""
    made = write_handmade(tmp_path / "data", bad=[], context_bad=False)
    refs = pickle.loads(made.refs_path.read_bytes())
    for r in refs:
        for s in r["sentences"]:
            s["sent"] = s["sent"].encode("utf-8")
            s["tokens"] = [t.encode("utf-8") for t in s["tokens"]]
    _sentence(refs)["raw"] = "caf\u00e9 au lait".encode()
    made.refs_path.write_bytes(pickle.dumps(refs, protocol=4))
    loaded = load_pickle_data(made.refs_path)
    assert _sentence(loaded)["sent"] == "object 1 number 0"
    assert _sentence(loaded)["raw"] == "caf\u00e9 au lait"
    d, _ = ingest(made, tmp_path / "work")
    first = pq.read_table(d / "sentences").to_pylist()[0]
    assert first["sent"] == "object 1 number 0"
    assert first["tokens"] == ["object", "1", "number", "0"]
    assert first["raw"] == "caf\u00e9 au lait"


def _grefcoco_copy(demo, tmp_path, edit):
    """The demo's gRefCOCO files under a fresh data root, with `edit` applied to its refs."""
    import shutil

    root = tmp_path / "refer"
    shutil.copytree(demo.refer_root / "grefcoco", root / "grefcoco")
    path = root / "grefcoco" / "grefs(unc).json"
    refs = json.loads(path.read_text())
    edit(refs)
    path.write_text(json.dumps(refs))
    return root, path, refs


def _ingest_grefcoco(demo, root, work):
    pipe = open_pipeline("grefcoco", work, data_root=root, images=demo.images_dir,
                         progress=False)
    pipe.run("ingest")
    d = pipe.artifact_dir("ingest")
    return d, json.loads((d / "_manifest.json").read_text())["stats"]


def _first(refs, no_target, n_targets=1):
    return next(r for r in refs if r["no_target"] == no_target and (
        no_target or isinstance(r["ann_id"], list) and len(r["ann_id"]) == n_targets))


@pytest.mark.parametrize("case,phrase", [
    ("flag_says_no_target", "has no_target=True but ann_id ["),
    ("flag_says_target", "has no_target=False but ann_id [-1]"),
    ("targets_and_minus_one", "lists both targets"),
])
def test_grefcoco_targets_and_flag_must_agree(demo, tmp_path, case, phrase):
    def edit(refs):
        if case == "flag_says_no_target":
            _first(refs, False)["no_target"] = True
        elif case == "flag_says_target":
            _first(refs, True)["no_target"] = False
        else:
            _first(refs, False)["ann_id"].append(-1)

    root, path, _ = _grefcoco_copy(demo, tmp_path, edit)
    with pytest.raises(InputError) as err:
        _ingest_grefcoco(demo, root, tmp_path / "work")
    assert str(err.value).startswith(f"{path}: ref ") and phrase in str(err.value), err.value


def test_grefcoco_target_listed_twice_is_kept_once_and_counted(demo, tmp_path):
    changed = {}

    def edit(refs):
        two = _first(refs, False, n_targets=2)
        changed[two["ref_id"]] = list(two["ann_id"])
        two["ann_id"] = two["ann_id"] + two["ann_id"][:1]  # [a, b, a]

    root, _, _ = _grefcoco_copy(demo, tmp_path, edit)
    d, stats = _ingest_grefcoco(demo, root, tmp_path / "work")
    refs = {r["ref_id"]: r for r in pq.read_table(d / "refs").to_pylist()}
    (ref_id, targets), = changed.items()
    assert refs[ref_id]["ann_ids"] == targets
    assert stats["repeated_targets"] == 1
