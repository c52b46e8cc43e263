"""augment + hard_negatives on the demo data, against brute-force oracles."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.api import open_pipeline
from stages.embed import embeddings_matrix
from stages.hard_negatives import take_quotas
from stages.text.normalise import normalise_sentence as norm

BASE = ["embed.model=tiny", "embed.pretrained=null", "multiview.backend=template"]


def pipe_for(demo, work, *sets, dataset="refcoco"):
    return open_pipeline(dataset, work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=[*BASE, *sets], progress=False)


def table(pipe, stage, name):
    return pq.read_table(pipe.artifact_dir(stage) / name)


def oracle_inputs(pipe):
    """What the brute-force neighbour oracle reads from the published upstream tables: refs by
    id, sentences, sent -> ref, sent -> text, sent -> embedding, instance -> cluster mean mu."""
    refs = {r["ref_id"]: r for r in table(pipe, "ingest", "refs").to_pylist()}
    sents = table(pipe, "ingest", "sentences").to_pylist()
    ref_of = {s["sent_id"]: s["ref_id"] for s in sents}
    text = {s["sent_id"]: s["sent"] for s in sents}
    emb_t = table(pipe, "embed_texts", "embeddings")
    emb = dict(zip(emb_t.column("sent_id").to_pylist(),
                   embeddings_matrix(emb_t.column("embedding")), strict=True))
    clusters = table(pipe, "clusters", "clusters")
    mu_of = dict(zip(clusters.column("ann_id").to_pylist(),
                     embeddings_matrix(clusters.column("mu")), strict=True))
    return refs, sents, ref_of, text, emb, mu_of


def test_take_quotas_carries_short_sources_forward():
    def items(tag, n):
        return [(1.0 - i / 10, i, f"{tag}{i}", tag) for i in range(n)]

    avail = {"same_image": items("s", 1), "neighbour": items("n", 5),
             "neighbour_same_class": items("c", 0), "augmented": items("a", 5)}
    mix = {"same_image": 2, "neighbour": 2, "neighbour_same_class": 2, "augmented": 2}
    got = [t[2] for t in take_quotas(avail, mix, 8)]
    # same_image has 1 of 2: neighbour takes 3; same_class has 0 of 2: augmented takes 4
    assert got == ["s0", "n0", "n1", "n2", "a0", "a1", "a2", "a3"]
    got = [t[2] for t in take_quotas(avail, mix, 8, exclude={"n1"})]
    assert got == ["s0", "n0", "n2", "n3", "a0", "a1", "a2", "a3"]
    assert len(take_quotas(avail, mix, 3)) == 3


def test_take_quotas_rules_and_displaced_counts():
    # neighbour n0 is an evaluation sentence (id 100), n1 a positive ("LEFT." ~ "left"), n2 a
    # repeat of s0 ("S0!" ~ "s0"), n5 an evaluation sentence ranked below the last one taken
    avail = {"same_image": [(0.9, 1, "s0", "same_image")],
             "neighbour": [(0.8, 100, "n0", "neighbour"), (0.7, 2, "LEFT.", "neighbour"),
                           (0.6, 3, "S0!", "neighbour"), (0.5, 4, "n3", "neighbour"),
                           (0.4, 5, "n4", "neighbour"), (0.3, 101, "n5", "neighbour")],
             "augmented": [(0.2, 7, "left", "swap_spatial"), (0.1, 7, "a1", "negation")]}
    mix = {"same_image": 1, "neighbour": 2, "neighbour_same_class": 0, "augmented": 2}
    drops: dict[str, dict[str, int]] = {}
    got = take_quotas(avail, mix, 5, exclude={"left"}, allowed={1, 2, 3, 4, 5, 7}, drops=drops)
    assert [t[2] for t in got] == ["s0", "n3", "n4", "a1"]
    assert drops == {"neighbour": {"dropped_eval_split": 1, "dropped_positive_text": 1,
                                   "dropped_duplicate_text": 1},
                     "augmented": {"dropped_positive_text": 1}}


@pytest.fixture
def built(demo, work):
    pipe = pipe_for(demo, work)
    pipe.run("hard_negatives")
    return pipe


def test_augment_report_and_tables(built):
    dist = table(built, "augment", "distractors").to_pylist()
    rej = table(built, "augment", "rejected").to_pylist()
    assert dist and {d["backend"] for d in dist} == {"rules"}
    assert all(r["reason"] for r in rej)
    m = built.store.manifest("refcoco", "augment", built.resolve("augment").key)
    report = m["stats"]["report"]
    assert set(report) == {"swap_color", "swap_spatial", "swap_count", "negation",
                           "role_reversal"}
    made = {k: v["count"] for k, v in report.items()}
    assert made["swap_color"] > 0 and made["swap_spatial"] > 0 and made["negation"] > 0
    for kind, v in report.items():
        assert v["count"] == sum(1 for d in dist if d["kind"] == kind)


def test_same_image_never_returns_own_sentences(demo, work):
    pipe = pipe_for(demo, work, "hard_negatives.mix={same_image: 8}")
    pipe.run("hard_negatives")
    refs = {r["ref_id"]: r for r in table(pipe, "ingest", "refs").to_pylist()}
    sents = table(pipe, "ingest", "sentences").to_pylist()
    ref_of = {s["sent_id"]: s["ref_id"] for s in sents}
    text = {s["sent_id"]: s["sent"] for s in sents}
    rows = table(pipe, "hard_negatives", "hard_negatives").to_pylist()
    assert any(r["neg_texts"] for r in rows)
    for r in rows:
        ref = refs[ref_of[r["sent_id"]]]
        for t, kind, src in zip(r["neg_texts"], r["neg_kinds"], r["neg_source_ids"],
                                strict=True):
            if kind != "same_image":  # a short source's places carry to the next source
                continue
            other = refs[ref_of[src]]
            assert other["image_id"] == ref["image_id"] and other["ref_id"] != ref["ref_id"]
            assert not set(other["ann_ids"]) & set(ref["ann_ids"])
            assert text[src] == t and t != text[r["sent_id"]]


@pytest.mark.parametrize("same_class", [False, True])
def test_neighbours_equal_bruteforce_with_cluster_rule(demo, work, same_class):
    source = "neighbour_same_class" if same_class else "neighbour"
    pipe = pipe_for(demo, work, f"hard_negatives.mix={{{source}: 5}}", "hard_negatives.n=5",
                    f"hard_negatives.same_class={str(same_class).lower()}",
                    "clusters.threshold=0.9999", "hard_negatives.search_k=4")
    pipe.run("hard_negatives")
    refs, sents, ref_of, text, emb, mu_of = oracle_inputs(pipe)
    rows = table(pipe, "hard_negatives", "hard_negatives").to_pylist()
    checked = 0
    for r in rows:
        ref = refs[ref_of[r["sent_id"]]]
        mu = mu_of[ref["ann_ids"][0]]
        # brute force: every training sentence of another image (same class if asked),
        # cos < threshold, best first, each normalised text once, no text of the referent
        cands = sorted(
            (float(emb[s] @ mu), s) for s in emb
            if refs[ref_of[s]]["image_id"] != ref["image_id"]
            and refs[ref_of[s]]["split"] == "train"
            and (not same_class or refs[ref_of[s]]["category_id"] == ref["category_id"])
            and float(emb[s] @ mu) < 0.9999)
        cands.sort(key=lambda x: (-x[0], x[1]))
        want = []
        seen = {norm(text[s]) for s in text if refs[ref_of[s]]["ann_ids"] == ref["ann_ids"]}
        for score, s in cands:
            if norm(text[s]) not in seen:
                seen.add(norm(text[s]))
                want.append(score)
            if len(want) == 5:
                break
        mined = [(t, src, sc) for t, src, sc, kind in zip(
            r["neg_texts"], r["neg_source_ids"], r["neg_scores"], r["neg_kinds"], strict=True)
            if kind == source]  # places this source could not fill carry to the next one
        assert len(mined) == len(want)
        np.testing.assert_allclose([m[2] for m in mined], want, atol=1e-5)
        for t, src, sc in mined:
            assert text[src] == t
            assert abs(float(emb[src] @ mu) - sc) < 1e-5 and sc < 0.9999
            assert refs[ref_of[src]]["image_id"] != ref["image_id"]
            if same_class:
                assert refs[ref_of[src]]["category_id"] == ref["category_id"]
        checked += 1
    assert checked > 20


def test_augmented_source_carries_edit_kinds(demo, work):
    pipe = pipe_for(demo, work, "hard_negatives.mix={augmented: 6}", "hard_negatives.n=6")
    pipe.run("hard_negatives")
    dist: dict[int, set[tuple[str, str]]] = {}
    for d in table(pipe, "augment", "distractors").to_pylist():
        dist.setdefault(d["sent_id"], set()).add((d["text"], d["kind"]))
    rows = table(pipe, "hard_negatives", "hard_negatives").to_pylist()
    assert any(r["neg_texts"] for r in rows)
    for r in rows:
        for t, kind, src in zip(r["neg_texts"], r["neg_kinds"], r["neg_source_ids"],
                                strict=True):
            assert src == r["sent_id"] and (t, kind) in dist[r["sent_id"]]


def test_shards_with_hard_negatives(demo, work):
    pipe = pipe_for(demo, work, "shards.with_hard_negatives=true")
    plan = [i.name for i in pipe.plan("shards")]
    assert "hard_negatives" in plan and "augment" in plan
    pipe.run("shards")
    hn = {r["sent_id"]: r for r in table(pipe, "hard_negatives", "hard_negatives").to_pylist()}
    rows = table(pipe, "shards", "train").to_pylist()
    for row in rows:
        h = hn[row["sent_id"]]
        assert row["hn_texts"] == h["neg_texts"] and row["hn_kinds"] == h["neg_kinds"]
    plain = pipe_for(demo, work)
    assert "hard_negatives" not in [i.name for i in plain.plan("shards")]


# -- class_source=extracted: hand-made sentences whose head noun disagrees with the annotation --
# (template, the class a reader gives its head noun, by hand: COCO 1 person, 3 car, 17 cat,
# 18 dog; "thing" names no class)
CLASS_TEMPLATES = [("{c} dog on the {p}", 18), ("{c} man on the {p}", 1),
                   ("{c} cat on the {p}", 17), ("{c} thing on the {p}", None),
                   ("{c} car on the {p}", 3)]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "gray", "pink", "purple"]
PLACES = ["left", "right", "top", "bottom", "middle", "center"]


def rewrite_sentences(demo, out):
    """A copy of the demo's refcoco whose sentences cycle through CLASS_TEMPLATES, whatever the
    ref's category: returns the data root and sent_id -> hand class."""
    import pickle
    import shutil

    src = demo.refer_root / "refcoco"
    dst = out / "refcoco"
    dst.mkdir(parents=True)
    shutil.copy(src / "instances.json", dst / "instances.json")
    refs = pickle.loads((src / "refs(unc).p").read_bytes())
    hand, j = {}, 0
    for ref in refs:
        for s in ref["sentences"]:
            template, cls = CLASS_TEMPLATES[j % len(CLASS_TEMPLATES)]
            text = template.format(c=COLOURS[(j // 5) % 10], p=PLACES[(j // 50) % 6])
            s.update(sent=text, raw=text, tokens=text.split())
            hand[s["sent_id"]] = cls
            j += 1
    assert j <= 300  # every text distinct
    (dst / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return out, hand


@pytest.mark.parametrize("class_source", ["annotation", "extracted"])
def test_same_class_neighbours_by_class_source(demo, work, tmp_path, class_source):
    root, hand = rewrite_sentences(demo, tmp_path / "refer")
    pipe = open_pipeline("refcoco", work, data_root=root, images=demo.images_dir, progress=False,
                         sets=[*BASE, "hard_negatives.mix={neighbour_same_class: 5}",
                               "hard_negatives.n=5", "clusters.threshold=0.9999",
                               f"hard_negatives.class_source={class_source}"])
    pipe.run("hard_negatives")
    refs, sents, ref_of, text, emb, mu_of = oracle_inputs(pipe)

    def cls(s):
        c = hand[s] if class_source == "extracted" else refs[ref_of[s]]["category_id"]
        return -1 if c is None else c

    rows = table(pipe, "hard_negatives", "hard_negatives").to_pylist()
    disagree = differ = 0
    for r in rows:
        sid = r["sent_id"]
        ref = refs[ref_of[sid]]
        mu = mu_of[ref["ann_ids"][0]]
        disagree += hand[sid] != ref["category_id"]
        # every training sentence of another image with the query's class, cos < threshold,
        # best first; none at all for a query without a class
        cands = sorted((-float(emb[s] @ mu), s) for s in emb
                       if cls(sid) >= 0 and cls(s) == cls(sid)
                       and refs[ref_of[s]]["image_id"] != ref["image_id"]
                       and refs[ref_of[s]]["split"] == "train" and float(emb[s] @ mu) < 0.9999)
        want = [s for _, s in cands[:5]]  # texts are distinct, none is the referent's own
        got = [src for src, kind in zip(r["neg_source_ids"], r["neg_kinds"], strict=True)
               if kind == "neighbour_same_class"]
        assert got == want, (sid, text[sid])
        other = [s for _, s in sorted(
            (-float(emb[s] @ mu), s) for s in emb
            if refs[ref_of[s]]["image_id"] != ref["image_id"]
            and refs[ref_of[s]]["split"] == "train" and float(emb[s] @ mu) < 0.9999
            and (refs[ref_of[s]]["category_id"] == ref["category_id"]
                 if class_source == "extracted" else
                 hand[sid] is not None and hand[s] == hand[sid]))][:5]
        differ += other != want
    assert disagree > 20 and differ > 20  # the two class sources really give other neighbours
    assert any(hand[r["sent_id"]] is None for r in rows)


def test_sentence_classes_hand_case():
    from stages.hard_negatives import sentence_classes

    refs = {1: {"category_id": 1}, 2: {"category_id": 18}, 3: {"category_id": -1}}
    sent_ref = {10: 1, 11: 1, 20: 2, 21: 2, 30: 3}
    sent_text = {10: "black dog on the left", 11: "man in red shirt", 20: "white car",
                 21: "right one", 30: "cat on the sofa"}
    assert sentence_classes("annotation", refs, sent_ref, sent_text) == {
        10: 1, 11: 1, 20: 18, 21: 18, 30: -1}
    assert sentence_classes("extracted", refs, sent_ref, sent_text) == {
        10: 18, 11: 1, 20: 3, 21: -1, 30: 17}
