"""Training negatives never come from an evaluation split and are never a positive (issue 13).

The data is hand-edited REFER data in which, as in the real G-Ref google split, training images
also hold evaluation referents, and texts equal (after normalisation) to a referent's own
sentences are planted on its image's other referents (and, for gRefCOCO, on a second ref with the
same target set). Every check is brute force over the published tables with plain Python/numpy:
sentence id -> ref -> split from the ingest tables, normalised text comparison, and the drop
counters recomputed from a brute-force ranking of every candidate.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.api import open_pipeline
from pipeline.cli import app
from pipeline.errors import NemoError
from stages.embed import embeddings_matrix, encode_sentences
from stages.refer.manifests import load_data_manifest
from stages.text.normalise import normalise_sentence as norm

BASE = ["embed.model=tiny", "embed.pretrained=null", "multiview.backend=template"]
SENTENCE_KINDS = ("same_image", "neighbour", "neighbour_same_class")
REASONS = ("dropped_eval_split", "dropped_positive_text", "dropped_duplicate_text")
PLANTED = "THE TWO PLANTED THINGS, TOGETHER!"  # a second gRefCOCO ref's text (same targets)


# -- the hand-made data ----------------------------------------------------------------------
def _edit_refs(refs: list[dict], grefcoco: bool) -> dict:
    """In place: on every training image with 3+ training refs, the last ref moves to val (a
    shared train/val image) and the second ref gets a shouted copy of the first one's sentence;
    for gRefCOCO, a copy of a multi-target ref (same targets, new sentence PLANTED) and PLANTED
    shouted on a disjoint ref of that image. Returns what was edited."""
    next_sent = 1 + max(s["sent_id"] for r in refs for s in r["sentences"])
    by_image: dict[int, list[dict]] = {}
    for r in refs:
        if r["split"] == "train":
            by_image.setdefault(r["image_id"], []).append(r)

    def add_sentence(ref: dict, text: str) -> None:
        nonlocal next_sent
        ref["sentences"].append({"tokens": text.split(), "raw": text, "sent_id": next_sent,
                                 "sent": text})
        ref["sent_ids"].append(next_sent)
        next_sent += 1

    def targets(ref: dict) -> set[int]:
        ann = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
        return {a for a in ann if a != -1}

    shared, planted = [], []
    for image_id, group in sorted(by_image.items()):
        group = [r for r in sorted(group, key=lambda r: r["ref_id"]) if targets(r)]
        if len(group) < 3 or targets(group[0]) & targets(group[1]):
            continue
        group[-1]["split"] = "val"
        shared.append(image_id)
        add_sentence(group[1], group[0]["sentences"][0]["sent"].upper() + " !")
        planted.append(group[1]["ref_id"])
    twin = None
    if grefcoco:
        for g in sorted(refs, key=lambda r: r["ref_id"]):
            others = [r for r in by_image.get(g["image_id"], [])
                      if targets(r) and not targets(r) & targets(g) and r["split"] == "train"]
            if g["split"] == "train" and len(targets(g)) >= 2 and others:
                twin = copy.deepcopy(g)
                twin["ref_id"] = 1 + max(r["ref_id"] for r in refs)
                twin["sentences"], twin["sent_ids"] = [], []
                add_sentence(twin, norm(PLANTED))
                refs.append(twin)
                add_sentence(others[0], PLANTED)
                twin = {"ref_id": twin["ref_id"], "first": g["ref_id"], "image_id": g["image_id"]}
                break
    return {"shared_images": shared, "planted_refs": planted, "twin": twin}


@pytest.fixture(scope="module")
def hand_made(demo, tmp_path_factory):
    """A REFER root with refcoco and grefcoco edited as `_edit_refs` says."""
    root = tmp_path_factory.mktemp("shared_split") / "refer"
    edits = {}
    for dataset in ("refcoco", "grefcoco"):
        m = load_data_manifest(dataset)
        (root / m.dir).mkdir(parents=True)
        shutil.copy(demo.refer_root / m.dir / m.instances_file, root / m.dir / m.instances_file)
        path = demo.refer_root / m.dir / m.refs_file
        if path.suffix == ".json":
            refs = json.loads(path.read_text())
            edits[dataset] = _edit_refs(refs, grefcoco=True)
            (root / m.dir / m.refs_file).write_text(json.dumps(refs))
        else:
            refs = pickle.loads(path.read_bytes())
            edits[dataset] = _edit_refs(refs, grefcoco=False)
            (root / m.dir / m.refs_file).write_bytes(pickle.dumps(refs))
        assert len(edits[dataset]["shared_images"]) >= 3
    return root, edits


def pipe_for(demo, root, work, dataset, *sets):
    return open_pipeline(dataset, work, data_root=root, images=demo.images_dir,
                         sets=[*BASE, *sets], progress=False)


class Data:
    """Plain-Python views of the ingest tables."""

    def __init__(self, pipe) -> None:
        d = pipe.artifact_dir("ingest")
        self.refs = {r["ref_id"]: r for r in pq.read_table(d / "refs").to_pylist()}
        sents = pq.read_table(d / "sentences").to_pylist()
        self.ref_of = {s["sent_id"]: s["ref_id"] for s in sents}
        self.text = {s["sent_id"]: s["sent"] for s in sents}
        self.split = {s: self.refs[r]["split"] for s, r in self.ref_of.items()}

    def positives(self, ref_id: int) -> set[str]:
        """Normalised sentences of the ref and of every ref with the same non-empty targets."""
        mine = sorted(self.refs[ref_id]["ann_ids"])
        same = {r for r, ref in self.refs.items() if mine and sorted(ref["ann_ids"]) == mine}
        return {norm(self.text[s]) for s, r in self.ref_of.items() if r in same | {ref_id}}

    def same_image_candidates(self, ref_id: int) -> list[int]:
        """Sentences of the image's other refs with disjoint targets, by ref id then sent id."""
        ref = self.refs[ref_id]
        if not ref["ann_ids"]:
            return []
        return sorted((r, s) for s, r in self.ref_of.items()
                      if r != ref_id and self.refs[r]["image_id"] == ref["image_id"]
                      and not set(self.refs[r]["ann_ids"]) & set(ref["ann_ids"]))


def evaluation_splits(dataset: str) -> list[str]:
    m = load_data_manifest(dataset)
    return [s for s in m.splits if s != m.train_split]


def manifest(pipe, stage):
    return json.loads((pipe.artifact_dir(stage) / "_manifest.json").read_text())


# -- hard_negatives ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["refcoco", "grefcoco"])
def built(request, demo, hand_made, tmp_path_factory):
    root, edits = hand_made
    work = tmp_path_factory.mktemp("work")
    pipe = pipe_for(demo, root, work, request.param, "shards.with_hard_negatives=true")
    pipe.run("shards")
    return pipe, edits[request.param]


def test_training_negatives_are_train_sentences_and_never_positives(built):
    pipe, edits = built
    data = Data(pipe)
    assert {data.refs[r]["split"] for r in data.refs
            if data.refs[r]["image_id"] == edits["shared_images"][0]} == {"train", "val"}
    rows = pq.read_table(pipe.artifact_dir("hard_negatives") / "hard_negatives").to_pylist()
    assert sorted(r["sent_id"] for r in rows) == sorted(s for s in data.split
                                                        if data.split[s] == "train")
    kinds: Counter = Counter()
    for r in rows:
        positives = data.positives(data.ref_of[r["sent_id"]])
        normed = [norm(t) for t in r["neg_texts"]]
        assert len(set(normed)) == len(normed), r  # no repeat
        assert not set(normed) & positives, r  # no positive
        for t, kind, src in zip(r["neg_texts"], r["neg_kinds"], r["neg_source_ids"],
                                strict=True):
            kinds[kind] += 1
            if kind in SENTENCE_KINDS:
                assert data.split[src] == "train", (r["sent_id"], t, data.split[src])
                assert data.text[src] == t
            else:  # an edit of the query's own (training) sentence
                assert src == r["sent_id"]
    assert all(kinds[k] for k in ("same_image", "neighbour", "neighbour_same_class"))
    # the shards publish exactly these lists for the training split, nothing for the others
    hn = {r["sent_id"]: r for r in rows}
    for row in pq.read_table(pipe.artifact_dir("shards") / "train").to_pylist():
        assert row["hn_texts"] == hn[row["sent_id"]]["neg_texts"]
    for split in evaluation_splits(pipe.env.dataset):
        for row in pq.read_table(pipe.artifact_dir("shards") / split).to_pylist():
            assert row["hn_texts"] == [] and row["neg_image_ids"] == []


def _mu(pipe, data: Data, ref_id: int, emb: dict[int, np.ndarray],
        mu_of: dict[int, np.ndarray]) -> np.ndarray:
    ann_ids = data.refs[ref_id]["ann_ids"]
    if len(ann_ids) == 1 and ann_ids[0] in mu_of:
        return mu_of[ann_ids[0]]
    own = np.stack([emb[s] for s, r in sorted(data.ref_of.items()) if r == ref_id])
    mu = own.mean(axis=0)
    return (mu / (np.linalg.norm(mu) or 1.0)).astype(np.float32)


def test_drop_counts_equal_a_brute_force_recount(built):
    """Recount each rule's drops: candidates (every sentence of the dataset, brute-force
    ranked) that a rule skipped ahead of a published negative of the same source."""
    pipe, _ = built
    data = Data(pipe)
    m = manifest(pipe, "hard_negatives")
    threshold, p = m["stats"]["threshold"], m["params"]
    emb_t = pq.read_table(pipe.artifact_dir("embed_texts") / "embeddings")
    emb = dict(zip(emb_t.column("sent_id").to_pylist(),
                   embeddings_matrix(emb_t.column("embedding")), strict=True))
    cl = pq.read_table(pipe.artifact_dir("clusters") / "clusters")
    mu_of = dict(zip(cl.column("ann_id").to_pylist(), embeddings_matrix(cl.column("mu")),
                     strict=True))
    dist: dict[int, list[dict]] = {}
    for d in pq.read_table(pipe.artifact_dir("augment") / "distractors").to_pylist():
        dist.setdefault(d["sent_id"], []).append(d)
    texts = sorted({d["text"] for ds in dist.values() for d in ds})
    embed_params = pipe.resolve("hard_negatives").shared["embed"]
    dist_emb = dict(zip(texts, encode_sentences(embed_params, texts), strict=True))
    counts = {k: Counter() for k in (*SENTENCE_KINDS, "augmented")}
    for r in pq.read_table(pipe.artifact_dir("hard_negatives") / "hard_negatives").to_pylist():
        rid = data.ref_of[r["sent_id"]]
        ref, mu = data.refs[rid], _mu(pipe, data, rid, emb, mu_of)
        positives = data.positives(rid)
        published = list(zip(r["neg_texts"], r["neg_kinds"], r["neg_source_ids"], strict=True))
        taken: set[str] = set()
        for source in (*SENTENCE_KINDS, "augmented"):
            if source == "same_image":
                pool = [s for _, s in data.same_image_candidates(rid)]
            elif source == "augmented":
                pool = []
            else:
                pool = [s for s in emb if data.refs[data.ref_of[s]]["image_id"] != ref["image_id"]
                        and float(emb[s] @ mu) < threshold
                        and (source == "neighbour" or data.refs[data.ref_of[s]]["category_id"]
                             == ref["category_id"] >= 0)]
            if source == "augmented":
                ranking = sorted(((float(dist_emb[d["text"]] @ mu), d["text"], d["kind"])
                                 for d in dist.get(r["sent_id"], [])),
                                 key=lambda x: (-x[0], x[1]))
                ranking = [(t, k) for _, t, k in ranking]
                mine = [(t, k) for t, k, _ in published if k not in SENTENCE_KINDS]
            else:
                ranking = [(data.text[s], s) for _, s in sorted(
                    ((float(emb[s] @ mu), s) for s in pool), key=lambda x: (-x[0], x[1]))]
                mine = [(t, s) for t, k, s in published if k == source]
            last = ranking.index(mine[-1]) if mine else 0
            for item in ranking[:last]:
                t = item[0]
                if item in mine:
                    taken.add(norm(t))
                elif source != "augmented" and data.split[item[1]] not in p["source_splits"]:
                    counts[source]["dropped_eval_split"] += 1
                elif norm(t) in positives:
                    counts[source]["dropped_positive_text"] += 1
                elif norm(t) in taken:
                    counts[source]["dropped_duplicate_text"] += 1
                else:
                    raise AssertionError(f"{r['sent_id']}: usable {t!r} skipped for a worse one")
            taken |= {norm(t) for t, _ in mine}
    want = {k: {reason: c[reason] for reason in REASONS} for k, c in counts.items()}
    assert m["stats"]["dropped_per_source"] == want
    for reason in REASONS:
        assert m["stats"][reason] == sum(c[reason] for c in counts.values())
    assert m["stats"]["dropped_eval_split"] > 0 and m["stats"]["dropped_positive_text"] > 0


def test_status_shows_the_drop_table(built, demo, hand_made):
    pipe, _ = built
    stats = manifest(pipe, "hard_negatives")["stats"]
    res = CliRunner().invoke(app, [
        "status", "--stage", "hard_negatives", "--dataset", pipe.env.dataset,
        "--work-dir", str(pipe.env.work_dir), "--data-root", str(hand_made[0]),
        "--images", str(demo.images_dir), *[a for s in BASE for a in ("--set", s)],
        "--set", "shards.with_hard_negatives=true"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("dropped candidates"))
    reasons = sorted(REASONS)  # the manifest's JSON keeps its keys sorted
    assert lines[at + 1].split() == ["source", *(r.removeprefix("dropped_") for r in reasons)]
    table = {ln.split()[0]: [int(v) for v in ln.split()[1:]] for ln in lines[at + 2:at + 7]}
    for source, c in stats["dropped_per_source"].items():
        assert table[source] == [c[r] for r in reasons]
    assert table["total"] == [stats[r] for r in reasons]


def test_source_splits_is_a_real_parameter(demo, hand_made, work):
    root, _ = hand_made
    pipe = pipe_for(demo, root, work, "refcoco", "hard_negatives.source_splits=[train, val]")
    pipe.run("hard_negatives")
    data = Data(pipe)
    m = manifest(pipe, "hard_negatives")
    assert m["params"]["source_splits"] == ["train", "val"]
    assert pipe.resolve("hard_negatives").key != pipe_for(
        demo, root, work, "refcoco").resolve("hard_negatives").key
    splits: Counter = Counter()
    for r in pq.read_table(pipe.artifact_dir("hard_negatives") / "hard_negatives").to_pylist():
        for kind, src in zip(r["neg_kinds"], r["neg_source_ids"], strict=True):
            if kind in SENTENCE_KINDS:
                splits[data.split[src]] += 1
    assert splits["val"] > 0 and splits["train"] > 0
    assert set(splits) <= {"train", "val"}  # testA and testB stay out
    assert m["stats"]["source_sentences"] == sum(
        1 for s in data.split.values() if s in ("train", "val"))


@pytest.mark.parametrize("value, match", [
    ("[training]", "hard_negatives.source_splits.*training"),
    ("[]", "source_splits"),
])
def test_source_splits_validated(demo, work, value, match):
    with pytest.raises(NemoError, match=match):
        open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                      sets=[*BASE, f"hard_negatives.source_splits={value}"],
                      progress=False).run("hard_negatives")
    assert not (work / "refcoco" / "hard_negatives").exists()


# -- shards without hard_negatives: the same-image rule ------------------------------------
@pytest.mark.parametrize("dataset", ["refcoco", "grefcoco"])
def test_shards_same_image_negatives_follow_the_rules(demo, hand_made, work, dataset):
    root, edits = hand_made
    pipe = pipe_for(demo, root, work, dataset)
    pipe.run("shards")
    data = Data(pipe)
    want_drops: Counter = Counter()
    rows = pq.read_table(pipe.artifact_dir("shards") / "train").to_pylist()
    for row in rows:
        positives = data.positives(row["ref_id"])
        want, taken = [], set()
        for _, s in data.same_image_candidates(row["ref_id"]):
            if data.split[s] != "train":
                want_drops["dropped_eval_split"] += 1
            elif norm(data.text[s]) in positives:
                want_drops["dropped_positive_text"] += 1
            elif norm(data.text[s]) in taken:
                want_drops["dropped_duplicate_text"] += 1
            else:
                taken.add(norm(data.text[s]))
                want.append(data.text[s])
        assert row["hn_texts"] == want
    m = manifest(pipe, "shards")
    assert m["stats"]["same_image_dropped"] == {r: want_drops[r] for r in REASONS}
    assert want_drops["dropped_eval_split"] > 0 and want_drops["dropped_positive_text"] > 0
    twin = edits[dataset]["twin"]
    if twin is not None:  # the planted text is the second same-target ref's sentence
        first = [r for r in rows if r["ref_id"] == twin["first"]]
        assert first and all(norm(PLANTED) not in map(norm, r["hn_texts"]) for r in first)
        assert any(norm(data.text[s]) == norm(PLANTED)
                   for _, s in data.same_image_candidates(twin["first"]))
    for split in evaluation_splits(dataset):
        assert all(r["hn_texts"] == [] for r in pq.read_table(
            pipe.artifact_dir("shards") / split).to_pylist())


# -- mosaics: the pool is the training split's images ---------------------------------------
def test_mosaic_candidates_are_training_images(demo, hand_made, work):
    """With M above the pool size every pool image is a candidate, so the candidate set of each
    query is the pool minus its own image: exactly the images holding a training ref. The shared
    train/val images are in it; evaluation-only images never are, also for val queries."""
    root, edits = hand_made
    pipe = pipe_for(demo, root, work, "refcoco", "negatives.m=100000",
                    "negatives.query_splits=[train, val]", "mosaic_tables.k=3")
    pipe.run("mosaic_tables")
    data = Data(pipe)
    train_images = {r["image_id"] for r in data.refs.values() if r["split"] == "train"}
    all_images = {r["image_id"] for r in data.refs.values()}
    assert all_images - train_images  # evaluation-only images exist
    assert set(edits["refcoco"]["shared_images"]) <= train_images
    rows = pq.read_table(pipe.artifact_dir("negatives") / "negatives").to_pylist()
    assert {data.split[r["sent_id"]] for r in rows} == {"train", "val"}
    for r in rows:
        assert set(r["cand_image_ids"]) == train_images - {r["image_id"]}
    for r in pq.read_table(pipe.artifact_dir("mosaic_tables") / "mosaic").to_pylist():
        assert set(r["neg_image_ids"]) <= train_images - {r["image_id"]}
