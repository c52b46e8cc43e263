"""`nemo-pipe export-refer`: the export read back by a copy of the REFER API's loading code (and,
where a Python 2.7 is installed, by Python 2's cPickle), against the original files and the
multiview table read here with pyarrow."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.api import open_pipeline
from pipeline.cli import app
from pipeline.errors import InputError
from stages.refer.views import refer_tokens
from stages.text.normalise import normalise_sentence as norm
from stages.tools.export_refer import add_views, export_refer, record_name

SETS = ["embed.model=tiny", "embed.pretrained=null", "multiview.backend=template"]
VIEW_ORDER = ("appearance", "action", "spatial", "appearance_alt")
runner = CliRunner()


class ReferCopy:
    """The loading part of the REFER API, ported to Python 3: ``REFER.__init__`` (pickle.load of
    ``refs(<splitBy>).p``, json.load of ``instances.json``), ``createIndex`` and ``getRefIds``
    as written in lichengunc/refer, refer.py @ e3bbaa3 (Apache-2.0). Changes: ``print`` gone,
    the pickle opened 'rb' (Python 3 needs it), and, for gRefCOCO's list-valued ann_id /
    category_id (which grefer.py indexes one by one), those refs left out of the per-annotation
    maps that refer.py's code cannot key by a list; gRefCOCO's ``grefs(unc).json`` is read with
    json.load, as grefer.py does (``refs_name`` selects it).
    """

    def __init__(self, data_root, dataset="refcoco", splitBy="unc", refs_name=None):
        self.DATA_DIR = os.path.join(data_root, dataset)
        ref_file = os.path.join(self.DATA_DIR, refs_name or "refs(" + splitBy + ").p")
        self.data = {"dataset": dataset}
        if ref_file.endswith(".json"):
            self.data["refs"] = json.load(open(ref_file))  # noqa: SIM115 - as REFER does
        else:
            self.data["refs"] = pickle.load(open(ref_file, "rb"))  # noqa: SIM115
        instances = json.load(open(os.path.join(self.DATA_DIR, "instances.json")))  # noqa: SIM115
        self.data["images"] = instances["images"]
        self.data["annotations"] = instances["annotations"]
        self.data["categories"] = instances["categories"]
        self.createIndex()

    def createIndex(self):  # noqa: N802 - REFER's name
        Anns, Imgs, Cats, imgToAnns = {}, {}, {}, {}
        for ann in self.data["annotations"]:
            Anns[ann["id"]] = ann
            imgToAnns[ann["image_id"]] = imgToAnns.get(ann["image_id"], []) + [ann]
        for img in self.data["images"]:
            Imgs[img["id"]] = img
        for cat in self.data["categories"]:
            Cats[cat["id"]] = cat["name"]
        Refs, imgToRefs, refToAnn, annToRef, catToRefs = {}, {}, {}, {}, {}
        Sents, sentToRef, sentToTokens = {}, {}, {}
        for ref in self.data["refs"]:
            ref_id = ref["ref_id"]
            ann_id = ref["ann_id"]
            category_id = ref["category_id"]
            image_id = ref["image_id"]
            Refs[ref_id] = ref
            imgToRefs[image_id] = imgToRefs.get(image_id, []) + [ref]
            if not isinstance(category_id, list):  # gRefCOCO lists (grefer.py indexes each)
                catToRefs[category_id] = catToRefs.get(category_id, []) + [ref]
            if not isinstance(ann_id, list):
                refToAnn[ref_id] = Anns[ann_id]
                annToRef[ann_id] = ref
            for sent in ref["sentences"]:
                Sents[sent["sent_id"]] = sent
                sentToRef[sent["sent_id"]] = ref
                sentToTokens[sent["sent_id"]] = sent["tokens"]
        self.Refs, self.Anns, self.Imgs, self.Cats = Refs, Anns, Imgs, Cats
        self.Sents, self.imgToRefs, self.imgToAnns = Sents, imgToRefs, imgToAnns
        self.refToAnn, self.annToRef, self.catToRefs = refToAnn, annToRef, catToRefs
        self.sentToRef, self.sentToTokens = sentToRef, sentToTokens

    def getRefIds(self, split=""):  # noqa: N802 - REFER's name; only its split filter
        refs = self.data["refs"]
        if split in ["testA", "testB", "testC"]:
            refs = [ref for ref in refs if split[-1] in ref["split"]]
        elif split == "test":
            refs = [ref for ref in refs if "test" in ref["split"]]
        elif split:
            refs = [ref for ref in refs if ref["split"] == split]
        return [ref["ref_id"] for ref in refs]


PY2_READER = textwrap.dedent("""
    import cPickle as pickle, json, sys
    refs = pickle.load(open(sys.argv[1], 'r'))  # as refer.py does
    Sents = {}
    for ref in refs:
        for sent in ref['sentences']:
            Sents[sent['sent_id']] = sent
    out = dict((str(k), [v['sent'], v['raw'], v['tokens']]) for k, v in Sents.items())
    print(json.dumps({'refs': len(refs), 'sents': out}))
""")


def python2() -> str | None:
    for candidate in sorted(Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
                            .glob("versions/2.7*/bin/python")):
        try:
            subprocess.run([str(candidate), "-c", "import cPickle"], check=True,
                           capture_output=True, timeout=30)
            return str(candidate)
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def tokens_of(raw: str) -> list[str]:
    """REFER's tokens by hand: the lowercase runs of letters and digits (of any script; no
    combining marks in the cases here, which `[^\\W_]` would not match)."""
    return re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", raw).lower())


def export(demo, work, out, dataset="refcoco", *extra):
    return runner.invoke(app, ["export-refer", str(out), "--dataset", dataset, "--work-dir",
                               str(work), "--data-root", str(demo.refer_root), "--images",
                               str(demo.images_dir), *[a for s in SETS for a in ("--set", s)],
                               *extra])


@pytest.fixture(scope="module")
def exported(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    work = root / "work"
    pipe = open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=SETS, progress=False)
    pipe.run("multiview")
    result = export(demo, work, root / "out")
    assert result.exit_code == 0, result.output
    views = pq.read_table(pipe.artifact_dir("multiview") / "views").to_pylist()
    return {"root": root, "work": work, "out": root / "out", "views": views,
            "output": result.output}


def test_refer_reads_the_export_with_views_added_to_training_refs(demo, exported):
    orig = ReferCopy(str(demo.refer_root), "refcoco", "unc")
    new = ReferCopy(str(exported["out"]), "refcoco", "unc")
    by_ref: dict[int, list[str]] = {}
    for v in sorted(exported["views"], key=lambda v: (v["ref_id"], VIEW_ORDER.index(v["view"]))):
        by_ref.setdefault(v["ref_id"], []).append(v["text"])
    top = max(orig.Sents)
    added = skipped = 0
    assert [r["ref_id"] for r in new.data["refs"]] == [r["ref_id"] for r in orig.data["refs"]]
    for split in ("train", "val", "testA", "testB", "test"):
        assert new.getRefIds(split=split) == orig.getRefIds(split=split)
    for o, n in zip(orig.data["refs"], new.data["refs"], strict=True):
        k = len(o["sentences"])
        assert {a: b for a, b in n.items() if a not in ("sentences", "sent_ids")} == {
            a: b for a, b in o.items() if a not in ("sentences", "sent_ids")}
        assert n["sentences"][:k] == o["sentences"]  # the originals, unchanged, in place
        assert n["sent_ids"][:k] == o["sent_ids"]
        extra = n["sentences"][k:]
        if o["split"] != "train":
            assert extra == [] and n == o  # evaluation refs untouched
            continue
        # every view of the ref, in view order, but those the ref already says (the one rule
        # shared with the stages: `normalise_sentence` defines "the same text")
        have = {norm(t) for s in o["sentences"] for t in (s["sent"], s["raw"])}
        want = [t for t in by_ref.get(o["ref_id"], []) if norm(t) not in have]
        assert [s["raw"] for s in extra] == want
        skipped += len(by_ref.get(o["ref_id"], [])) - len(want)
        assert n["sent_ids"][k:] == [s["sent_id"] for s in extra]
        for s in extra:
            assert s["tokens"] == tokens_of(s["raw"]) and s["sent"] == " ".join(s["tokens"])
            assert s["sent_id"] > top and new.sentToRef[s["sent_id"]]["ref_id"] == o["ref_id"]
            assert new.sentToTokens[s["sent_id"]] == s["tokens"]
        added += len(extra)
    assert added + skipped == sum(len(by_ref[r["ref_id"]]) for r in orig.data["refs"]
                                  if r["split"] == "train" and r["ref_id"] in by_ref)
    assert added > skipped
    ids = [s["sent_id"] for r in new.data["refs"] for s in r["sentences"]]
    assert len(ids) == len(set(ids)) == len(new.Sents) == len(orig.Sents) + added
    assert sorted(set(ids) - set(orig.Sents)) == list(range(top + 1, top + 1 + added))
    assert (exported["out"] / "refcoco" / "instances.json").read_bytes() == (
        demo.refer_root / "refcoco" / "instances.json").read_bytes()
    record = json.loads((exported["out"] / "refcoco" / "nemo_export(unc).json").read_text())
    assert record["added_sentences"] == added and record["first_new_sent_id"] == top + 1
    assert record["views_equal_to_a_sentence"] == skipped
    assert f"{added} generated expressions added" in exported["output"]


def test_the_refs_file_is_a_protocol_2_pickle_of_plain_data(exported):
    data = (exported["out"] / "refcoco" / "refs(unc).p").read_bytes()
    assert data[:2] == b"\x80\x02"  # PROTO 2
    ops = list(pickletools.genops(data))
    assert max(op.proto for op, _, _ in ops) <= 2
    assert not {op.name for op, _, _ in ops} & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
                                                "INST", "OBJ", "NEWOBJ"}


def test_python2_cpickle_reads_the_export(exported):
    py2 = python2()
    if py2 is None:
        pytest.skip("no Python 2.7 installed")
    script = exported["root"] / "read2.py"
    script.write_text(PY2_READER)
    path = exported["out"] / "refcoco" / "refs(unc).p"
    got = json.loads(subprocess.run([py2, str(script), str(path)], check=True,
                                    capture_output=True, timeout=120).stdout)
    new = ReferCopy(str(exported["out"]), "refcoco", "unc")
    assert got["refs"] == len(new.data["refs"])
    assert got["sents"] == {str(k): [v["sent"], v["raw"], v["tokens"]]
                            for k, v in new.Sents.items()}


def test_refusals(demo, exported, tmp_path):
    again = export(demo, exported["work"], exported["out"])
    assert again.exit_code == 2 and "--force" in again.output
    assert export(demo, exported["work"], exported["out"], "refcoco", "--force").exit_code == 0
    into_source = export(demo, exported["work"], demo.refer_root)
    assert into_source.exit_code == 2 and "original dataset's own folder" in into_source.output
    unbuilt = export(demo, tmp_path / "empty_work", tmp_path / "out")
    assert unbuilt.exit_code == 1 and "nemo-pipe run --stage multiview" in unbuilt.output
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):  # a file, a path under one
        blocked = export(demo, exported["work"], out)
        assert blocked.exit_code == 2 and "cannot write the REFER copy there" in blocked.output
        assert blocked.exception is None or isinstance(blocked.exception, SystemExit)


def test_grefcoco_export_is_json_and_keeps_no_target_refs(demo, tmp_path):
    work = tmp_path / "work"
    pipe = open_pipeline("grefcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=SETS, progress=False)
    pipe.run("multiview")
    result = export(demo, work, tmp_path / "out", "grefcoco")
    assert result.exit_code == 0, result.output
    name = "grefs(unc).json"
    orig = ReferCopy(str(demo.refer_root), "grefcoco", refs_name=name)
    new = ReferCopy(str(tmp_path / "out"), "grefcoco", refs_name=name)
    grown = 0
    for o, n in zip(orig.data["refs"], new.data["refs"], strict=True):
        assert n["sentences"][:len(o["sentences"])] == o["sentences"]
        if o["split"] != "train" or o.get("no_target") or isinstance(o["ann_id"], list) and len(
                o["ann_id"]) != 1:
            assert n == o  # evaluation, no-target and multi-target refs have no views
        grown += len(n["sentences"]) > len(o["sentences"])
    assert grown


def test_add_views_hand_case():
    refs = [
        {"ref_id": 1, "split": "train", "sent_ids": [0, 1],
         "sentences": [{"sent_id": 0, "sent": "red cat", "raw": "Red cat", "tokens": []},
                       {"sent_id": 1, "sent": "cat", "raw": "cat", "tokens": []}]},
        {"ref_id": 2, "split": "val", "sent_ids": [9],
         "sentences": [{"sent_id": 9, "sent": "dog", "raw": "dog", "tokens": []}]},
        {"ref_id": 3, "split": "train", "sent_ids": [4],
         "sentences": [{"sent_id": 4, "sent": "bird", "raw": "bird", "tokens": []}]},
    ]
    # "the red cat" and "Red cat!" are ref 1's "red cat" once normalised (articles,
    # case, punctuation); "a cat sleeping" is new
    views = {1: [("appearance", "the red cat"), ("spatial", "Red cat!"),
                 ("action", "a cat sleeping")],
             2: [("appearance", "the brown dog")], 3: [("appearance", "A bird, left.")],
             7: [("appearance", "nobody")]}
    counts = add_views(refs, views, "train")
    # ids above the largest of every split (9, a val sentence)
    assert refs[0]["sent_ids"] == [0, 1, 10] and refs[0]["sentences"][2] == {
        "tokens": ["a", "cat", "sleeping"], "raw": "a cat sleeping", "sent_id": 10,
        "sent": "a cat sleeping"}
    assert refs[2]["sentences"][1] == {"tokens": ["a", "bird", "left"], "raw": "A bird, left.",
                                       "sent_id": 11, "sent": "a bird left"}
    assert refs[1]["sent_ids"] == [9] and len(refs[1]["sentences"]) == 1
    assert counts == {"refs_with_views": 2, "added_sentences": 2,
                      "views_of_eval_refs_skipped": 1, "views_equal_to_a_sentence": 2,
                      "views_without_tokens": 0, "views_of_unknown_refs": 1,
                      "first_new_sent_id": 10,
                      "last_new_sent_id": 11}



def test_refer_tokens_keep_every_letter_and_follow_refer_on_ascii():
    # hand-written: letters of any script survive, punctuation and symbols break words
    assert refer_tokens("the café on the left") == ["the", "café", "on", "the", "left"]
    assert refer_tokens("Ñandú, right!") == ["ñandú", "right"]
    assert refer_tokens("左边的猫") == ["左边的猫"]
    assert refer_tokens("Straße n\u00ba 5\u00b0") == ["straße", "no", "5"]  # NFKC º -> o; ° a break
    assert refer_tokens("cafe\u0301 l\u00adeft") == ["café", "left"]  # composed; soft hyphen
    assert refer_tokens("ＦＵＬＬ-width") == ["full", "width"]
    assert refer_tokens("😀 + !!") == []
    # on ASCII, REFER's rule: every character but a-z, 0-9 is a break (random strings against
    # the old regex)
    import random

    rng = random.Random(7)
    for _ in range(2000):
        raw = "".join(chr(rng.randrange(0, 128)) for _ in range(rng.randrange(0, 30)))
        assert refer_tokens(raw) == re.sub(r"[^a-z0-9 ]+", " ", raw.lower()).split(), raw


def test_add_views_keep_non_ascii_letters_and_never_write_an_empty_sentence():
    refs = [{"ref_id": 1, "split": "train", "sent_ids": [0],
             "sentences": [{"sent_id": 0, "sent": "cat", "raw": "cat", "tokens": ["cat"]}]}]
    views = {1: [("appearance", "the café on the left"), ("action", "😀😀"),
                 ("spatial", "左边的猫"), ("appearance_alt", "Ñandú")]}
    counts = add_views(refs, views, "train")
    extra = refs[0]["sentences"][1:]
    assert [(s["sent_id"], s["tokens"], s["sent"]) for s in extra] == [
        (1, ["the", "café", "on", "the", "left"], "the café on the left"),
        (2, ["左边的猫"], "左边的猫"), (3, ["ñandú"], "ñandú")]
    assert refs[0]["sent_ids"] == [0, 1, 2, 3]
    assert all(s["tokens"] == tokens_of(s["raw"]) for s in extra)
    assert counts["views_without_tokens"] == 1 and counts["added_sentences"] == 3


def test_add_views_never_store_one_refer_sentence_twice():
    """Two texts whose normalised forms differ can be one REFER sentence (REFER's tokens break
    at the hyphen and the apostrophe, normalise_sentence removes them in place)."""
    refs = [{"ref_id": 7, "split": "train", "sent_ids": [10],
             "sentences": [{"sent_id": 10, "sent": "guy in t shirt", "raw": "guy in t shirt",
                            "tokens": ["guy", "in", "t", "shirt"]}]}]
    views = {7: [("appearance", "guy in t-shirt"), ("action", "Guy in T-Shirt!"),
                 ("spatial", "man's hat"), ("appearance_alt", "man s hat")]}
    counts = add_views(refs, views, "train")
    sents = [s["sent"] for s in refs[0]["sentences"]]
    assert sents == ["guy in t shirt", "man s hat"]  # by hand: the first of each kept
    assert len(set(sents)) == len(sents)
    assert counts["views_equal_to_a_sentence"] == 3 and counts["added_sentences"] == 1


def _refer_source(root: Path) -> Path:
    """A G-Ref-like folder: two partitions of one ref (umd: train, google: train) and an
    instances.json shared by both."""
    src = root / "src" / "refcocog"
    src.mkdir(parents=True)
    for split_by, sid in (("umd", 5), ("google", 8)):
        refs = [{"ref_id": 1, "split": "train", "image_id": 1, "ann_id": 1, "category_id": 1,
                 "sent_ids": [sid], "sentences": [{"sent_id": sid, "sent": "a dog",
                                                   "raw": "a dog", "tokens": ["a", "dog"]}]}]
        (src / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    (src / "instances.json").write_text('{"images": [], "annotations": [], "categories": []}')
    return src


def test_both_partitions_exported_into_one_folder_keep_a_record_each(tmp_path):
    src = _refer_source(tmp_path)
    out = tmp_path / "out" / "refcocog"
    views = {1: [("appearance", "brown dog")]}

    def run(split_by: str, key: str, force: bool = False):
        return export_refer(src / f"refs({split_by}).p", src / "instances.json", "refer", out,
                            views, "train", {"key": key}, force=force)

    assert record_name("refs(umd).p") == "nemo_export(umd).json"
    assert record_name("grefs(unc).json") == "nemo_export(unc).json"
    run("umd", "k-umd")
    umd_record = (out / "nemo_export(umd).json").read_bytes()
    run("google", "k-google")  # another partition: no --force needed
    assert (out / "nemo_export(umd).json").read_bytes() == umd_record  # kept
    for split_by, key, first in (("umd", "k-umd", 6), ("google", "k-google", 9)):
        record = json.loads((out / f"nemo_export({split_by}).json").read_text())
        assert record["refs_file"] == str(out / f"refs({split_by}).p")
        assert record["multiview"] == {"key": key} and record["first_new_sent_id"] == first
        refs = pickle.loads((out / f"refs({split_by}).p").read_bytes())
        assert [s["sent"] for s in refs[0]["sentences"]] == ["a dog", "brown dog"]
    assert not (out / "nemo_export.json").exists()
    assert (out / "instances.json").read_bytes() == (src / "instances.json").read_bytes()

    # the same partition again: refused without --force, naming what is there
    with pytest.raises(InputError, match=r"refs\(google\)\.p.*--force"):
        run("google", "k2")
    # an instances.json that is not the original's: refused too, replaced with --force
    (out / "instances.json").write_text("{}")
    (out / "refs(google).p").unlink()
    (out / "nemo_export(google).json").unlink()
    with pytest.raises(InputError, match="instances.json, not the original's"):
        run("google", "k2")
    run("google", "k2", force=True)
    assert (out / "instances.json").read_bytes() == (src / "instances.json").read_bytes()

    # an older version's single record describing refs(umd).p is that export's record: a
    # re-export needs --force and replaces it; one describing another file is left alone
    (out / "nemo_export(umd).json").unlink()
    (out / "nemo_export.json").write_text(json.dumps({"refs_file": str(out / "refs(umd).p")}))
    (out / "refs(umd).p").unlink()
    with pytest.raises(InputError, match="nemo_export.json"):
        run("umd", "k3")
    run("umd", "k3", force=True)
    assert not (out / "nemo_export.json").exists()
    assert json.loads((out / "nemo_export(umd).json").read_text())["multiview"] == {"key": "k3"}
    (out / "nemo_export.json").write_text(json.dumps({"refs_file": str(out / "refs(umd).p")}))
    run("google", "k4", force=True)
    assert (out / "nemo_export.json").exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
