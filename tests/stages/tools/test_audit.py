"""`nemo-pipe audit` against independent oracles.

1. On the tables the real pipeline publishes for the demo data, every count equals a brute-force
   Python pass over the same tables and ingest (whatever the stages do today, leaks included).
2. A hand-made clean set (tables rewritten row by row from ingest, manifests updated) passes
   with exit 0; each kind of violation planted into a copy is found exactly: its count, its
   table and its rows, and nothing else is.
3. Skips, bad input (exit 2), the CLI's exit codes and JSON, and the report's audit section.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.api import open_pipeline
from pipeline.errors import InputError
from pipeline.io import describe_file, read_table_dir, schema_version_of, table_files, write_parquet
from stages.text.normalise import normalise_sentence as norm
from stages.tools.audit import run_audit
from stages.tools.report import write_report

SETS = ["embed.model=tiny", "embed.pretrained=null", "multiview.backend=template",
        "shards.with_hard_negatives=true"]
RETRIEVED = {"same_image", "neighbour", "neighbour_same_class"}
ROOT = Path(__file__).resolve().parents[3]
N_CLEAN = 3  # negatives per row in the hand-made clean set


def pipe_for(demo, work, *extra, dataset="refcoco"):
    return open_pipeline(dataset, work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=[*SETS, *extra], progress=False)


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory) -> Path:
    """The real pipeline on the demo data, shards with hard negatives (read-only for tests)."""
    work = tmp_path_factory.mktemp("audit") / "work"
    pipe_for(demo, work).run("shards")
    return work


def clone(built: Path, demo, dest: Path):
    shutil.copytree(built, dest, symlinks=True)
    return pipe_for(demo, dest)


class Truth:
    """Ingest's refs and sentences as plain dicts: the oracle's ground truth."""

    def __init__(self, pipe) -> None:
        d = pipe.artifact_dir("ingest")
        self.ref = {r["ref_id"]: r for r in read_table_dir(d / "refs").to_pylist()}
        self.sent = {s["sent_id"]: s for s in read_table_dir(d / "sentences").to_pylist()}
        self.split = {sid: self.ref[s["ref_id"]]["split"] for sid, s in self.sent.items()}
        self.image = {sid: self.ref[s["ref_id"]]["image_id"] for sid, s in self.sent.items()}
        self.train_images = {r["image_id"] for r in self.ref.values() if r["split"] == "train"}
        self.train_norms = {norm(s["sent"]) for sid, s in self.sent.items()
                            if self.split[sid] == "train"}
        self.eval_norms = {norm(s["sent"]) for sid, s in self.sent.items()
                           if self.split[sid] != "train"}
        by_target: dict[Any, set[str]] = defaultdict(set)
        for s in self.sent.values():
            by_target[self.target(s["sent_id"])].add(norm(s["sent"]))
        self.by_target = by_target

    def target(self, sid: int) -> Any:
        r = self.ref[self.sent[sid]["ref_id"]]
        return (r["image_id"], tuple(sorted(r["ann_ids"]))) if r["ann_ids"] else r["ref_id"]

    def positives(self, sid: int) -> set[str]:
        return self.by_target[self.target(sid)] if sid in self.sent else set()

    def is_train(self, sid: int) -> bool:
        return self.split.get(sid) == "train"


# -- reading and rewriting published tables ---------------------------------------------------
def rows_of(pipe, stage: str, table: str) -> list[dict[str, Any]]:
    return read_table_dir(pipe.artifact_dir(stage) / table).to_pylist()


def edit(pipe, stage: str, table: str, fn) -> None:
    """Rewrite every part of `table` with fn(rows) -> rows (same schema) and update the
    manifest's size, sha256 and rows, so the copy looks published like any other."""
    d = pipe.artifact_dir(stage)
    manifest = json.loads((d / "_manifest.json").read_text())
    for part in table_files(d / table):
        t = pq.read_table(part)
        rows = fn(t.to_pylist())
        version = schema_version_of(part) or "1"
        write_parquet(pa.Table.from_pylist(rows, schema=t.schema.remove_metadata()), part,
                      version)
        manifest["files"][part.relative_to(d).as_posix()] = describe_file(part)
    (d / "_manifest.json").write_text(json.dumps(manifest, indent=2))


def k_of(pipe) -> int:
    return int(json.loads((pipe.artifact_dir("mosaic_tables") / "_manifest.json").read_text())
               ["params"]["k"])


def make_clean(pipe, t: Truth) -> None:
    """Hand-made clean material: per training row N_CLEAN training images other than its own
    (k_shortfall = K - N_CLEAN) and N_CLEAN training sentences of other images whose texts are
    neither a positive of the row nor repeated."""
    k = k_of(pipe)
    images = sorted(t.train_images)
    train = sorted(s for s in t.sent if t.is_train(s))

    def negatives(sid: int) -> list[int]:
        out, seen = [], set(t.positives(sid))
        for s in train:
            n = norm(t.sent[s]["sent"])
            if t.image[s] != t.image[sid] and n not in seen:
                out.append(s)
                seen.add(n)
            if len(out) == N_CLEAN:
                return out
        raise AssertionError("the demo data has too few sentences")

    def mosaic(rows):
        for r in rows:
            r["neg_image_ids"] = [i for i in images if i != t.image[r["sent_id"]]][:N_CLEAN]
            r["k_shortfall"] = k - N_CLEAN
        return rows

    def hard(rows):
        for r in rows:
            srcs = negatives(r["sent_id"])
            r.update(neg_texts=[t.sent[s]["sent"] for s in srcs], neg_kinds=["neighbour"] * 3,
                     neg_scores=[0.5] * 3, neg_source_ids=srcs)
        return rows

    def shards(rows):
        mosaic(rows)
        for r in rows:
            srcs = negatives(r["sent_id"])
            r.update(hn_texts=[t.sent[s]["sent"] for s in srcs], hn_kinds=["neighbour"] * 3,
                     hn_scores=[0.5] * 3, hn_source_ids=srcs)
        return rows

    edit(pipe, "mosaic_tables", "mosaic", mosaic)
    edit(pipe, "hard_negatives", "hard_negatives", hard)
    edit(pipe, "shards", "train", shards)


@pytest.fixture
def clean(built, demo, tmp_path):
    pipe = clone(built, demo, tmp_path / "work")
    t = Truth(pipe)
    make_clean(pipe, t)
    return pipe, t


def found(result, name: str) -> set[tuple[str, int]]:
    """(table, sent_id) of every offending entry of a check (all examples kept)."""
    return {(e["table"], e["sent_id"]) for e in result.check(name).examples}


def assert_only(result, expected: dict[str, set[tuple[str, int]]],
                counts: dict[str, int] | None = None) -> None:
    """Exactly the expected checks have findings, at exactly these rows."""
    counts = counts or {name: len(rows) for name, rows in expected.items()}
    for c in result.checks:
        if c.name in expected:
            assert c.status == "finding", c
            assert c.count == counts[c.name], c
            assert found(result, c.name) == expected[c.name], c
        else:
            assert c.status == "ok" and c.count == 0, c


# -- 1. the real output against a brute-force pass --------------------------------------------
def brute_force(pipe, t: Truth) -> tuple[Counter, dict[str, set]]:
    counts: Counter = Counter()
    rows: dict[str, set] = defaultdict(set)
    k = k_of(pipe)

    def hit(name: str, table: str, sid: int, n: int = 1) -> None:
        if n:
            counts[name] += n
            rows[name].add((table, sid))

    def images(table: str, r: dict[str, Any]) -> None:
        sid, ids = r["sent_id"], r["neg_image_ids"]
        own = t.image.get(sid, r["image_id"])
        hit("eval_images_as_mosaic_negatives", table, sid,
            sum(i not in t.train_images for i in ids))
        hit("duplicate_negatives", table, sid, len(ids) - len(set(ids)))
        hit("own_image_negatives", table, sid, ids.count(own))
        hit("k_shortfall", table, sid,
            int(r["k_shortfall"] != max(0, k - len(ids)) or len(ids) > k))

    def texts(table: str, sid: int, negs: list[str], kinds: list[str] | None,
              sources: list[int] | None) -> None:
        # a row whose lists disagree in length is a finding; its negatives are then judged
        # by text alone, as retrieved ones (no kind, no source)
        kinds, sources = kinds or [], sources if sources is not None else None
        aligned = len(kinds) == len(negs) and (sources is None or len(sources) == len(negs))
        hit("misaligned_negatives", table, sid, int(not aligned))
        if len(kinds) != len(negs):
            kinds = ["neighbour"] * len(negs)
        if sources is not None and len(sources) != len(negs):
            sources = None
        seen: set[str] = set()
        for i, (text, kind) in enumerate(zip(negs, kinds, strict=True)):
            n = norm(text)
            src = sources[i] if sources is not None else None
            if src in t.sent:
                leak = not t.is_train(src)
            else:
                leak = kind in RETRIEVED and n in t.eval_norms and n not in t.train_norms
            hit("eval_sentences_as_negatives", table, sid, int(leak))
            if src in t.sent:  # a retrieved text is its source's; an edit's source the query
                unlike = (n != norm(t.sent[src]["sent"]) if kind in RETRIEVED
                          else src != sid)
                hit("negatives_unlike_their_source", table, sid, int(unlike))
            hit("positives_as_negatives", table, sid, int(n in t.positives(sid)))
            hit("duplicate_negatives", table, sid, int(n in seen))
            seen.add(n)

    for r in rows_of(pipe, "mosaic_tables", "mosaic"):
        if t.is_train(r["sent_id"]):
            images("mosaic", r)
    for r in rows_of(pipe, "hard_negatives", "hard_negatives"):
        hit("eval_sentences_as_training_rows", "hard_negatives", r["sent_id"],
            int(not t.is_train(r["sent_id"])))
        texts("hard_negatives", r["sent_id"], r["neg_texts"], r["neg_kinds"],
              r["neg_source_ids"])
    for r in rows_of(pipe, "shards", "train"):
        hit("eval_sentences_as_training_rows", "shards/train", r["sent_id"],
            int(not t.is_train(r["sent_id"])))
        images("shards/train", r)
        texts("shards/train", r["sent_id"], r["hn_texts"], r["hn_kinds"], r["hn_source_ids"])
    return counts, rows


def test_counts_equal_a_brute_force_pass_over_the_published_tables(built, demo):
    check_against_brute_force(pipe_for(demo, built))


def test_grefcoco_counts_equal_a_brute_force_pass(demo, tmp_path):
    """Multi-target and no-target referents: target sets, not referents, decide positives."""
    pipe = pipe_for(demo, tmp_path / "work", dataset="grefcoco")
    pipe.run("shards")
    t = Truth(pipe)
    assert any(len(r["ann_ids"]) > 1 for r in t.ref.values())
    assert any(not r["ann_ids"] for r in t.ref.values())
    check_against_brute_force(pipe)


def check_against_brute_force(pipe) -> None:
    t = Truth(pipe)
    counts, rows = brute_force(pipe, t)
    result = run_audit(pipe, max_examples=10**9)
    assert set(result.artifacts) == {"ingest", "mosaic_tables", "hard_negatives", "shards"}
    for c in result.checks:
        assert c.status in ("ok", "finding"), c
        assert c.count == counts[c.name], c.name
        assert c.rows == len(rows[c.name]), c.name
        assert found(result, c.name) == rows[c.name], c.name
        assert c.status == ("finding" if counts[c.name] else "ok")
    assert result.exit_code == (1 if counts else 0)
    # what was audited: every negative of every training row
    hn = rows_of(pipe, "hard_negatives", "hard_negatives")
    audited = result.check("positives_as_negatives").audited
    assert audited["hard_negatives texts"] == sum(len(r["neg_texts"]) for r in hn)
    short = result.check("k_shortfall").info
    mosaic = [r for r in rows_of(pipe, "mosaic_tables", "mosaic") if t.is_train(r["sent_id"])]
    train = rows_of(pipe, "shards", "train")
    assert short["k"] == k_of(pipe) and short["rows"] == len(mosaic) + len(train)
    assert short["short_rows"] == sum(len(r["neg_image_ids"]) < short["k"]
                                      for r in mosaic + train)


# -- 2. a clean hand-made set, and each violation planted into it ------------------------------
def test_clean_hand_made_set_passes(clean):
    pipe, t = clean
    result = run_audit(pipe)
    assert_only(result, {})
    assert result.exit_code == 0 and result.findings == 0
    short = result.check("k_shortfall").info
    assert short["short_rows"] == short["rows"] > 0 and short["share_short"] == 1.0


def _eval_only_sentence(t: Truth) -> int:
    """An evaluation sentence whose text is no training sentence's."""
    return next(s for s in sorted(t.sent) if not t.is_train(s)
                and norm(t.sent[s]["sent"]) not in t.train_norms)


def test_planted_evaluation_sentences_are_found(clean):
    pipe, t = clean
    leak = _eval_only_sentence(t)
    text = t.sent[leak]["sent"]
    hn = rows_of(pipe, "hard_negatives", "hard_negatives")
    a, b, c = hn[0]["sent_id"], hn[1]["sent_id"], hn[2]["sent_id"]
    train_other = next(s for s in sorted(t.sent) if t.is_train(s)
                       and s not in hn[3]["neg_source_ids"] and t.image[s] != t.image[hn[3]
                                                                                     ["sent_id"]]
                       and norm(t.sent[s]["sent"]) not in t.positives(hn[3]["sent_id"]))

    def plant_hn(rows):
        by = {r["sent_id"]: r for r in rows}
        by[a]["neg_texts"][0], by[a]["neg_source_ids"][0] = text, leak  # by source id
        by[b]["neg_kinds"][1], by[b]["neg_source_ids"][1] = "same_image", leak  # any kind
        # augmented: the source is the query's own (train) sentence: not a leak whatever
        # the edited text equals
        by[c]["neg_texts"][2], by[c]["neg_kinds"][2] = text, "swap_color"
        by[c]["neg_source_ids"][2] = c
        # a training source with an unrelated text is no leak, but the text is not its source's
        by[hn[3]["sent_id"]]["neg_source_ids"][0] = train_other
        return rows

    sh = rows_of(pipe, "shards", "train")
    x, y = sh[4]["sent_id"], sh[5]["sent_id"]

    def plant_shards(rows):
        by = {r["sent_id"]: r for r in rows}
        # no source id: judged by text, which only evaluation sentences have
        by[x]["hn_texts"][0], by[x]["hn_source_ids"][0] = "  " + text.upper() + "!", -1
        by[y]["hn_texts"][1], by[y]["hn_kinds"][1] = text, "negation"  # augmented: no source
        by[y]["hn_source_ids"][1] = -1
        return rows

    edit(pipe, "hard_negatives", "hard_negatives", plant_hn)
    edit(pipe, "shards", "train", plant_shards)
    result = run_audit(pipe, max_examples=100)
    assert_only(result, {"eval_sentences_as_negatives": {
        ("hard_negatives", a), ("hard_negatives", b), ("shards/train", x)},
        "negatives_unlike_their_source": {("hard_negatives", b),
                                          ("hard_negatives", hn[3]["sent_id"])}})
    by_sid = {e["sent_id"]: e for e in result.check("eval_sentences_as_negatives").examples}
    assert by_sid[a]["source_id"] == leak and by_sid[a]["source_split"] == t.split[leak]
    assert by_sid[a]["negative"] == text and by_sid[x]["kind"] == "neighbour"
    assert result.check("eval_sentences_as_negatives").by_table == {"hard_negatives": 2,
                                                                     "shards/train": 1}


def test_planted_evaluation_images_are_found(clean):
    pipe, t = clean
    eval_image = min({r["image_id"] for r in t.ref.values()} - t.train_images)
    mosaic = rows_of(pipe, "mosaic_tables", "mosaic")
    a = mosaic[0]["sent_id"]
    b = rows_of(pipe, "shards", "train")[1]["sent_id"]

    def plant(sid, image):
        def fn(rows):
            next(r for r in rows if r["sent_id"] == sid)["neg_image_ids"][2] = image
            return rows
        return fn

    edit(pipe, "mosaic_tables", "mosaic", plant(a, eval_image))
    edit(pipe, "shards", "train", plant(b, 10**9))  # an image ingest does not know
    result = run_audit(pipe)
    assert_only(result, {"eval_images_as_mosaic_negatives": {("mosaic", a),
                                                             ("shards/train", b)}})
    ex = {e["sent_id"]: e for e in result.check("eval_images_as_mosaic_negatives").examples}
    assert ex[a]["negative_image_id"] == eval_image
    assert "train" not in ex[a]["negative_image_splits"]
    assert ex[b]["negative_image_splits"] == ["unknown to ingest"]


def test_planted_positives_are_found_own_referent_and_same_target_set(clean):
    pipe, t = clean
    hn = rows_of(pipe, "hard_negatives", "hard_negatives")
    # a query whose image has another referent with other targets: that one becomes a referent
    # of the same target set below, by giving it the query's ann_ids in the ground truth
    q = next(r["sent_id"] for r in hn if any(
        o["image_id"] == t.image[r["sent_id"]] and o["ref_id"] != t.sent[r["sent_id"]]["ref_id"]
        for o in t.ref.values()))
    qref = t.ref[t.sent[q]["ref_id"]]
    other = next(o for o in sorted(t.ref.values(), key=lambda o: o["ref_id"])
                 if o["image_id"] == qref["image_id"] and o["ref_id"] != qref["ref_id"])
    other_sent = next(s for s in sorted(t.sent) if t.sent[s]["ref_id"] == other["ref_id"])
    own_sent = next(s for s in sorted(t.sent) if t.sent[s]["ref_id"] == qref["ref_id"])
    third = next(r["sent_id"] for r in hn if t.image[r["sent_id"]] != qref["image_id"])

    def plant(rows):
        by = {r["sent_id"]: r for r in rows}
        by[q]["neg_texts"][0] = t.sent[own_sent]["sent"].upper() + " ."  # own referent
        by[q]["neg_texts"][1] = t.sent[other_sent]["sent"]  # same target set (below)
        # the same text for a query of another image is no positive
        by[third]["neg_texts"][1] = t.sent[other_sent]["sent"]
        return rows

    edit(pipe, "hard_negatives", "hard_negatives", plant)

    def retarget(rows):
        for r in rows:
            if r["ref_id"] == other["ref_id"]:
                r["ann_ids"] = list(reversed(qref["ann_ids"]))  # same set, another order
        return rows

    # before: the other referent's text is not a positive of q
    first = run_audit(pipe, max_examples=100)
    assert found(first, "positives_as_negatives") == {("hard_negatives", q)}
    assert first.check("positives_as_negatives").count == 1
    edit(pipe, "ingest", "refs", retarget)
    result = run_audit(pipe, max_examples=100)
    checks = {c.name: c for c in result.checks}
    assert checks["positives_as_negatives"].count == 2
    assert found(result, "positives_as_negatives") == {("hard_negatives", q)}
    assert {e["negative"] for e in checks["positives_as_negatives"].examples} == {
        t.sent[own_sent]["sent"].upper() + " .", t.sent[other_sent]["sent"]}
    # planting may not repeat a text already in the row: nothing else is found, but the
    # planted texts are not their (kept) source sentences' texts
    assert found(result, "negatives_unlike_their_source") == {("hard_negatives", q),
                                                               ("hard_negatives", third)}
    assert all(c.status == "ok" for c in result.checks
               if c.name not in ("positives_as_negatives", "negatives_unlike_their_source"))


def test_planted_texts_unlike_their_sources_are_found(clean):
    """A negative carrying an evaluation sentence's text under a training sentence's id passes
    the evaluation check (judged by its source): only the source check finds it."""
    pipe, t = clean
    leak_text = t.sent[_eval_only_sentence(t)]["sent"]
    hn = rows_of(pipe, "hard_negatives", "hard_negatives")
    a, b, c = hn[0]["sent_id"], hn[1]["sent_id"], hn[2]["sent_id"]
    other_train = next(s for s in sorted(t.sent) if t.is_train(s) and s != b)

    def plant(rows):
        by = {r["sent_id"]: r for r in rows}
        by[a]["neg_texts"][0] = leak_text  # source id kept: a training sentence
        by[a]["neg_kinds"][0] = "same_image"
        by[b]["neg_kinds"][1], by[b]["neg_source_ids"][1] = "role_reversal", other_train
        # the same text in another case and punctuation is the source's text
        by[c]["neg_texts"][2] = by[c]["neg_texts"][2].upper() + "."
        return rows

    edit(pipe, "hard_negatives", "hard_negatives", plant)
    result = run_audit(pipe, max_examples=100)
    assert_only(result, {"negatives_unlike_their_source": {("hard_negatives", a),
                                                            ("hard_negatives", b)}})
    ex = {e["sent_id"]: e for e in result.check("negatives_unlike_their_source").examples}
    src = hn[0]["neg_source_ids"][0]
    assert ex[a]["negative"] == leak_text and ex[a]["source_id"] == src
    assert ex[a]["source_sent"] == t.sent[src]["sent"]
    assert ex[b]["kind"] == "role_reversal" and ex[b]["source_id"] == other_train


def test_a_misaligned_row_is_found_and_does_not_hide_the_other_rows_sources(clean):
    """One row whose source-id (or kinds) list is shorter than its texts is a finding of its
    own; the part's other rows are still judged by their source ids, so an evaluation
    sentence planted as an edit (source id and text of a testB sentence) is still found."""
    pipe, t = clean
    leak = _eval_only_sentence(t)
    sh = rows_of(pipe, "shards", "train")
    a, b, c = sh[0]["sent_id"], sh[1]["sent_id"], sh[2]["sent_id"]
    pos_text = t.sent[next(s for s in sorted(t.sent) if t.target(s) == t.target(c))]["sent"]

    def plant(rows):
        by = {r["sent_id"]: r for r in rows}
        by[a]["hn_texts"][0], by[a]["hn_kinds"][0] = t.sent[leak]["sent"], "swap_color"
        by[a]["hn_source_ids"][0] = leak
        by[b]["hn_source_ids"] = by[b]["hn_source_ids"][:-1]  # one id short
        # kinds one short, and a positive planted: still judged by text
        by[c]["hn_kinds"] = by[c]["hn_kinds"][:-1]
        by[c]["hn_texts"][1] = pos_text
        return rows

    edit(pipe, "shards", "train", plant)
    result = run_audit(pipe, max_examples=100)
    assert_only(result, {
        "eval_sentences_as_negatives": {("shards/train", a)},
        # c's kinds are lost: its planted text is judged as a retrieved one, unlike its source
        "negatives_unlike_their_source": {("shards/train", a), ("shards/train", c)},
        "positives_as_negatives": {("shards/train", c)},
        "misaligned_negatives": {("shards/train", b), ("shards/train", c)}})
    assert result.exit_code == 1
    ex = {e["sent_id"]: e for e in result.check("misaligned_negatives").examples}
    assert ex[b] == {"table": "shards/train", "sent_id": b, "texts": N_CLEAN,
                     "kinds": N_CLEAN, "source_ids": N_CLEAN - 1}
    assert ex[c]["kinds"] == N_CLEAN - 1 and ex[c]["source_ids"] == N_CLEAN
    leak_ex = result.check("eval_sentences_as_negatives").examples[0]
    assert leak_ex["source_id"] == leak and leak_ex["kind"] == "swap_color"
    check_against_brute_force(pipe)


def test_planted_duplicates_own_images_and_k_shortfalls_are_found(clean):
    pipe, t = clean
    mosaic = rows_of(pipe, "mosaic_tables", "mosaic")
    train = rows_of(pipe, "shards", "train")
    hn = rows_of(pipe, "hard_negatives", "hard_negatives")
    dup_text, dup_img, own, short = (hn[0]["sent_id"], mosaic[1]["sent_id"],
                                     train[2]["sent_id"], mosaic[3]["sent_id"])

    def plant_hn(rows):
        r = next(r for r in rows if r["sent_id"] == dup_text)
        r["neg_texts"][2] = r["neg_texts"][0].upper() + "?"  # the same once normalised
        return rows

    def plant_mosaic(rows):
        by = {r["sent_id"]: r for r in rows}
        by[dup_img]["neg_image_ids"][1] = by[dup_img]["neg_image_ids"][0]
        by[short]["k_shortfall"] = 0  # 3 images, K = k: says 0 short
        return rows

    def plant_shards(rows):
        by = {r["sent_id"]: r for r in rows}
        by[own]["neg_image_ids"][0] = t.image[own]
        return rows

    edit(pipe, "hard_negatives", "hard_negatives", plant_hn)
    edit(pipe, "mosaic_tables", "mosaic", plant_mosaic)
    edit(pipe, "shards", "train", plant_shards)
    # more than K: a K of 2 in the shards' own record of mosaic_tables
    d = pipe.artifact_dir("shards")
    m = json.loads((d / "_manifest.json").read_text())
    m["upstream_artifacts"]["mosaic_tables"]["params"]["k"] = 2
    (d / "_manifest.json").write_text(json.dumps(m))
    result = run_audit(pipe, max_examples=1000)
    # with K = 2 every shards row holding 3 images is over K (and its k_shortfall wrong)
    over_k = {("shards/train", r["sent_id"]) for r in train}
    assert_only(result, {
        "duplicate_negatives": {("hard_negatives", dup_text), ("mosaic", dup_img)},
        # the planted duplicate text is not its source sentence's either
        "negatives_unlike_their_source": {("hard_negatives", dup_text)},
        "own_image_negatives": {("shards/train", own)},
        "k_shortfall": {("mosaic", short)} | over_k})
    dups = result.check("duplicate_negatives").examples
    assert sorted(e["duplicate"] for e in dups) == ["image", "text"]


def test_planted_evaluation_rows_are_found(clean):
    pipe, t = clean
    val = rows_of(pipe, "shards", "val")
    assert val, "the demo data has a val split"
    moved = val[0]["sent_id"]

    def add_row(rows):
        row = dict(rows[0])
        row.update(sent_id=moved, ref_id=val[0]["ref_id"], image_id=val[0]["image_id"],
                   sent=val[0]["sent"], neg_image_ids=[], k_shortfall=k_of(pipe),
                   hn_texts=[], hn_kinds=[], hn_scores=[], hn_source_ids=[])
        return [*rows, row]

    def unknown(rows):
        rows[0]["sent_id"] = 10**9
        return rows

    eval_image = min({r["image_id"] for r in t.ref.values()} - t.train_images)

    def eval_query(rows):  # a mosaic row of an evaluation query (negatives.query_splits)
        row = dict(rows[0])
        row.update(sent_id=moved, ref_id=val[0]["ref_id"], image_id=val[0]["image_id"],
                   neg_image_ids=[eval_image, eval_image, val[0]["image_id"]], k_shortfall=0)
        return [*rows, row]

    mosaic_rows = len(rows_of(pipe, "mosaic_tables", "mosaic"))
    edit(pipe, "shards", "train", add_row)
    edit(pipe, "hard_negatives", "hard_negatives", unknown)
    edit(pipe, "mosaic_tables", "mosaic", eval_query)
    result = run_audit(pipe)
    assert_only(result, {"eval_sentences_as_training_rows": {("shards/train", moved),
                                                             ("hard_negatives", 10**9)}})
    ex = {e["sent_id"]: e for e in result.check("eval_sentences_as_training_rows").examples}
    assert ex[moved]["split"] == t.split[moved] and ex[10**9]["split"] == "unknown to ingest"
    # the mosaic's rows of evaluation queries are no training rows: not audited
    assert result.artifacts["mosaic_tables"]["training_rows"] == mosaic_rows


# -- 3. skips, bad input, CLI, report ---------------------------------------------------------
def test_skips_say_why(clean):
    pipe, _ = clean
    for stage in ("hard_negatives", "shards"):
        shutil.rmtree(pipe.artifact_dir(stage))
    result = run_audit(pipe)
    checks = {c.name: c for c in result.checks}
    for name in ("eval_sentences_as_negatives", "positives_as_negatives",
                 "eval_sentences_as_training_rows"):
        assert checks[name].status == "skipped"
        assert "hard_negatives missing" in checks[name].why
    for name in ("eval_images_as_mosaic_negatives", "duplicate_negatives",
                 "own_image_negatives", "k_shortfall"):
        assert checks[name].status == "ok" and set(checks[name].audited) <= {
            "mosaic images", "mosaic rows"}
    assert result.exit_code == 0


def test_shards_without_hard_negatives_skip_the_text_checks(built, demo, tmp_path):
    pipe = clone(built, demo, tmp_path / "work")
    shutil.rmtree(pipe.artifact_dir("hard_negatives"))
    plain = pipe_for(demo, tmp_path / "work", "shards.with_hard_negatives=false",
                     "shards.same_image_negatives=false")
    plain.run("shards")
    result = run_audit(plain)
    c = result.check("positives_as_negatives")
    assert c.status == "skipped" and "hard negatives not included" in c.why


def test_nothing_built_and_bad_tables_are_input_errors(built, demo, tmp_path):
    with pytest.raises(InputError, match="nemo-pipe run --stage shards --dataset refcoco"):
        run_audit(pipe_for(demo, tmp_path / "empty"))
    pipe = clone(built, demo, tmp_path / "work")
    part = table_files(pipe.artifact_dir("hard_negatives") / "hard_negatives")[0]
    pq.write_table(pq.read_table(part).drop(["neg_source_ids"]), part)
    # the rewritten part no longer matches its manifest: corrupt, never audited as evidence
    with pytest.raises(InputError, match="hard_negatives under the current config is corrupt"):
        run_audit(pipe)
    pipe = clone(built, demo, tmp_path / "work2")
    shutil.rmtree(pipe.artifact_dir("ingest"))
    with pytest.raises(InputError, match="ingest"):
        run_audit(pipe)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "audit", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_exit_codes_and_json(clean, tmp_path):
    pipe, t = clean
    work = str(pipe.env.work_dir)
    sets = [a for s in SETS for a in ("--set", s)]
    sets += ["--data-root", str(pipe.env.locations["data_root"]),
             "--images", str(pipe.env.locations["images"])]
    ok = _cli("--dataset", "refcoco", "--work-dir", work, *sets, "--json",
              str(tmp_path / "ok.json"))
    assert ok.returncode == 0, ok.stderr
    assert "no findings" in ok.stdout and "positives_as_negatives" in ok.stdout
    assert json.loads((tmp_path / "ok.json").read_text())["findings"] == 0

    sid = rows_of(pipe, "hard_negatives", "hard_negatives")[0]["sent_id"]
    leak = _eval_only_sentence(t)

    def plant(rows):
        r = next(r for r in rows if r["sent_id"] == sid)
        r["neg_texts"][0], r["neg_source_ids"][0] = t.sent[leak]["sent"], leak
        return rows

    edit(pipe, "hard_negatives", "hard_negatives", plant)
    bad = _cli("--dataset", "refcoco", "--work-dir", work, *sets, "--json",
               str(tmp_path / "bad.json"))
    assert bad.returncode == 1, bad.stderr
    line = next(x for x in bad.stdout.splitlines() if x.startswith("eval_sentences_as_neg"))
    assert line.split()[1:3] == ["finding", "1"]
    report = json.loads((tmp_path / "bad.json").read_text())
    check = next(c for c in report["checks"] if c["name"] == "eval_sentences_as_negatives")
    assert check["count"] == 1 and check["examples"][0]["sent_id"] == sid
    assert check["examples"][0]["source_id"] == leak

    # a --json path that is a directory: exit 2 naming it, no temp file left beside it
    (tmp_path / "jdir").mkdir()
    into_dir = _cli("--dataset", "refcoco", "--work-dir", work, *sets, "--json",
                    str(tmp_path / "jdir"))
    assert into_dir.returncode == 2 and "Traceback" not in into_dir.stderr
    assert f"{tmp_path / 'jdir'}: cannot write the audit JSON" in into_dir.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".jdir")]

    empty = _cli("--dataset", "refcoco", "--work-dir", str(tmp_path / "nothing"), *sets)
    assert empty.returncode == 2
    assert "error: nothing to audit" in empty.stderr and "--stage shards" in empty.stderr


def test_report_shows_the_audit(clean, tmp_path):
    pipe, t = clean
    doc = write_report(pipe, tmp_path / "clean.html", ks=(3,)).read_text(encoding="utf-8")
    section = doc[doc.index("<section id='audit'>"):]
    section = section[:section.index("</section>")]
    assert "No findings." in section
    for name in run_audit(pipe).checks:
        assert f"<tr data-check='{name.name}'>" in section
    assert section.count("class='audit-ok'") == 9  # every check

    sid = rows_of(pipe, "mosaic_tables", "mosaic")[0]["sent_id"]

    def plant(rows):
        r = next(r for r in rows if r["sent_id"] == sid)
        r["neg_image_ids"][0] = t.image[sid]
        return rows

    edit(pipe, "mosaic_tables", "mosaic", plant)
    doc = write_report(pipe, tmp_path / "bad.html", ks=(3,)).read_text(encoding="utf-8")
    section = doc[doc.index("<section id='audit'>"):]
    section = section[:section.index("</section>")]
    assert "1 check(s) with findings" in section
    row = section[section.index("<tr data-check='own_image_negatives'>"):]
    row = row[:row.index("</tr>")]
    assert "class='audit-finding'" in row and "data-count='1'" in row
    assert f"sent_id={sid}" in row
