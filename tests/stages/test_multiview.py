"""multiview (template backend) grounded in the synthetic scene; clusters against open_clip."""

from __future__ import annotations

import contextlib
import io
import pickle

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.api import open_pipeline
from pipeline.errors import InputError
from stages.embed import embeddings_matrix
from stages.models.clip import save_tiny_checkpoint
from stages.multiview import BASIC_COLORS

SIDES = {"left", "right", "middle"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=3)


def pipe_for(demo, work, checkpoint, *sets, dataset="refcoco"):
    return open_pipeline(dataset, work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=["embed.model=tiny", f"embed.pretrained={checkpoint}",
                               "multiview.backend=template", *sets], progress=False)


def test_template_views_grounded_in_annotations(demo, work, checkpoint):
    pipe = pipe_for(demo, work, checkpoint)
    pipe.run("multiview")
    views = pq.read_table(pipe.artifact_dir("multiview") / "views").to_pylist()
    refs = pickle.loads((demo.refer_root / "refcoco" / "refs(unc).p").read_bytes())
    train = {r["ref_id"]: r for r in refs if r["split"] == "train"}
    assert {v["ref_id"] for v in views} == set(train)  # every train instance, no other
    with contextlib.redirect_stdout(io.StringIO()):
        from pycocotools.coco import COCO

        coco = COCO(str(demo.refer_root / "refcoco" / "instances.json"))
    by_ref: dict[int, dict[str, str]] = {}
    for v in views:
        by_ref.setdefault(v["ref_id"], {})[v["view"]] = v["text"]
        assert v["backend"] == "template" and v["attempts"] == 1
    checked_color = 0
    for ref_id, got in by_ref.items():
        assert set(got) == {"appearance", "spatial", "appearance_alt"}  # no action: alt instead
        ref = train[ref_id]
        cat = coco.cats[ref["category_id"]]["name"]
        assert cat in got["appearance"] and cat in got["spatial"]
        # colour: the synthetic generator names the drawn colour in the original sentences
        color = next(c for c in BASIC_COLORS if f" {c} " in f" {got['appearance']} ")
        said = {c for s in ref["sentences"] for c in BASIC_COLORS if c in s["tokens"]}
        if said:
            assert color in said, (ref_id, got["appearance"], said)
            checked_color += 1
        # side: from the box centre, computed here by hand
        x, _, w, _ = coco.anns[ref["ann_id"]]["bbox"]
        width = coco.imgs[ref["image_id"]]["width"]
        cx = (x + w / 2) / width
        side = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "middle"
        head = got["spatial"].split(",")[0]
        words = head.split()
        if side == "middle":  # "in the middle", or only a vertical word ("on the bottom")
            assert "left" not in words and "right" not in words, (head, cx)
        else:
            assert side in words, (head, cx)
    assert checked_color >= 10


def test_clusters_mu_is_mean_of_normalised_view_embeddings(demo, work, checkpoint):
    pipe = pipe_for(demo, work, checkpoint)
    pipe.run("clusters")
    views = pq.read_table(pipe.artifact_dir("multiview") / "views").to_pylist()
    clusters = pq.read_table(pipe.artifact_dir("clusters") / "clusters")
    with contextlib.redirect_stderr(io.StringIO()):
        model, _, _ = open_clip.create_model_and_transforms("nemo-tiny",
                                                            pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer("nemo-tiny")
    texts: dict[int, list[str]] = {}
    for v in views:
        texts.setdefault(v["ann_id"], []).append(v["text"])
    mus = embeddings_matrix(clusters.column("mu"))
    spreads = clusters.column("spread").to_numpy()
    for i, ann_id in enumerate(clusters.column("ann_id").to_pylist()):
        with torch.no_grad():
            e = model.encode_text(tokenizer(texts[ann_id])).numpy().astype(np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        mu = e.mean(axis=0)
        mu /= np.linalg.norm(mu)
        np.testing.assert_allclose(mus[i], mu, atol=2e-3)
        assert abs(spreads[i] - (e @ mu).mean()) < 1e-3
    assert clusters.column("n_views").to_pylist() == [len(texts[a]) for a in
                                                      clusters.column("ann_id").to_pylist()]


def test_grefcoco_multi_and_no_target_refs_are_skipped(demo, work, checkpoint):
    pipe = pipe_for(demo, work, checkpoint, dataset="grefcoco")
    pipe.run("multiview")
    refs = pq.read_table(pipe.artifact_dir("ingest") / "refs").to_pylist()
    single = {r["ref_id"] for r in refs if len(r["ann_ids"]) == 1 and r["split"] == "train"}
    views = pq.read_table(pipe.artifact_dir("multiview") / "views").to_pylist()
    assert {v["ref_id"] for v in views} == single
    m = pipe.store.manifest("grefcoco", "multiview", pipe.resolve("multiview").key)
    assert m["stats"]["skipped_multi_or_no_target"] > 0


def test_clusters_key_follows_embed_config(demo, work, checkpoint, tmp_path):
    a = pipe_for(demo, work, checkpoint).resolve("clusters").key
    other = save_tiny_checkpoint(tmp_path / "other.pt", seed=4)
    assert pipe_for(demo, work, other).resolve("clusters").key != a
    assert pipe_for(demo, work, checkpoint, "clusters.threshold=0.5").resolve("clusters").key != a
    # multiview does not embed: its key ignores the CLIP model
    assert (pipe_for(demo, work, other).resolve("multiview").key
            == pipe_for(demo, work, checkpoint).resolve("multiview").key)


def test_unknown_split_is_an_error(demo, work, checkpoint):
    with pytest.raises(InputError, match="multiview.splits"):
        pipe_for(demo, work, checkpoint, "multiview.splits=[training]").run("multiview")


@pytest.mark.parametrize("stage", ["multiview", "augment"])
def test_a_split_left_empty_by_ingest_is_an_error(demo, tmp_path, checkpoint, stage):
    """testB's only images unreadable, so ingest (not strict) drops its refs: multiview over
    testB had no work, published no tables and ended in a traceback (augment too)."""
    import shutil

    first = pipe_for(demo, tmp_path / "w0", checkpoint)
    first.run("ingest")
    refs = pq.read_table(first.artifact_dir("ingest") / "refs").to_pylist()
    only_b = ({r["image_id"] for r in refs if r["split"] == "testB"}
              - {r["image_id"] for r in refs if r["split"] != "testB"})
    assert only_b
    images = tmp_path / "images"
    shutil.copytree(demo.images_dir, images)
    for image_id in only_b:
        (images / f"COCO_train2014_{image_id:012d}.jpg").write_bytes(b"not a jpeg")
    pipe = open_pipeline("refcoco", tmp_path / "w1", data_root=demo.refer_root, images=images,
                         sets=["embed.model=tiny", f"embed.pretrained={checkpoint}",
                               "multiview.backend=template", f"{stage}.splits=[testB]"],
                         progress=False)
    with pytest.raises(InputError, match=rf"{stage}.splits=\['testB'\]: no .* in these splits"):
        pipe.run(stage)
    assert not pipe.store.is_published("refcoco", stage, pipe.resolve(stage).key)


class _CutAfterAllButLast:
    """A stand-in model: valid views for every instance of the prompt except the last listed,
    where its answer is cut off at the token limit (an image of one instance gets a full one)."""

    def __init__(self) -> None:
        from stages.models.generation.answers import GenerationStats

        self.stats = GenerationStats()

    def generate(self, requests, max_new_tokens=256, batch_size=8):
        import json
        import re

        from stages.models.generation.answers import Answer

        out = []
        for _, prompt in requests:
            ids = re.findall(r'^- instance id "(\d+)"', prompt, flags=re.M)
            entry = {"appearance": "the thing", "action": None, "spatial": "the thing here",
                     "appearance_alt": "the other thing"}
            text = json.dumps({i: entry for i in ids})
            truncated = len(ids) > 1
            if truncated:
                text = text[:text.rindex(f'"{ids[-1]}"') + 12]
            self.stats.requests += 1
            self.stats.truncated += truncated
            out.append(Answer(text, truncated=truncated))
        return out


def test_partly_valid_truncated_answers_in_views_failures_manifest_and_status(
        demo, work, checkpoint, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from stages.models.generation import engines

    stand_in = _CutAfterAllButLast()
    monkeypatch.setattr(engines, "get_generator", lambda *args, **kwargs: stand_in)
    sets = ["multiview.backend=hf", "multiview.model=tiny", "multiview.device=cpu",
            "multiview.max_attempts=1"]
    pipe = pipe_for(demo, work, checkpoint, *sets)
    pipe.run("multiview")
    views = pq.read_table(pipe.artifact_dir("multiview") / "views").to_pylist()
    failures = pq.read_table(pipe.artifact_dir("multiview") / "failures").to_pylist()
    # by hand from the REFER file: the train instances of each image
    refs = pickle.loads((demo.refer_root / "refcoco" / "refs(unc).p").read_bytes())
    anns: dict[int, set[int]] = {}
    for r in refs:
        if r["split"] == "train":
            anns.setdefault(r["image_id"], set()).add(r["ann_id"])
    multi = {i for i, a in anns.items() if len(a) > 1}
    assert multi and len(multi) < len(anns)
    failed = {(f["image_id"], a) for f in failures for a in f["ann_ids"]}
    assert {f["reason"].split(":")[0] for f in failures} == {"truncated"}
    assert {i for i, _ in failed} == multi and len(failed) == len(multi)  # one per image
    viewed = {(v["image_id"], v["ann_id"]) for v in views}
    everything = {(i, a) for i, ids in anns.items() for a in ids}
    assert viewed | failed == everything and not viewed & failed  # the good ones are kept
    stats = pipe.store.manifest("refcoco", "multiview", pipe.resolve("multiview").key)["stats"]
    assert stats["failure_reasons"] == {"truncated": len(multi)}
    assert stats["failed_instances"] == len(multi) == stats["truncated_answers"]
    args = ["status", "--stage", "multiview", "--dataset", "refcoco", "--work-dir", str(work),
            "--data-root", str(demo.refer_root), "--images", str(demo.images_dir)]
    for s in ["embed.model=tiny", f"embed.pretrained={checkpoint}", *sets]:
        args += ["--set", s]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert f'"truncated": {len(multi)}' in shown.output


def _refcoco_copy_with_a_second_referent(demo, tmp_path):
    """The demo's refcoco files under a new root, plus a train ref on the object of the first
    train ref (another ref id and sentences): two referents of one annotation."""
    import shutil

    root = tmp_path / "refer"
    shutil.copytree(demo.refer_root / "refcoco", root / "refcoco")
    path = root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    first = next(r for r in refs if r["split"] == "train")
    next_sent = max(s["sent_id"] for r in refs for s in r["sentences"]) + 1
    twin = {**first, "ref_id": max(r["ref_id"] for r in refs) + 1,
            "sent_ids": [next_sent],
            "sentences": [{"sent_id": next_sent, "sent": "that very thing",
                           "raw": "That very thing", "tokens": ["that", "very", "thing"]}]}
    path.write_bytes(pickle.dumps([*refs, twin], protocol=2))
    return root, first, twin


def test_two_referents_of_one_object_get_that_objects_views(demo, tmp_path, checkpoint):
    """The template backend took the second referent of an object as the object's nearest
    neighbour ("..., right of the gray person" of the gray person itself), and clusters counted
    its views twice. Adding a referent to an object must change no view and no cluster."""
    root, first, twin = _refcoco_copy_with_a_second_referent(demo, tmp_path)

    def run(data_root, work):
        pipe = open_pipeline("refcoco", work, data_root=data_root, images=demo.images_dir,
                             sets=["embed.model=tiny", f"embed.pretrained={checkpoint}",
                                   "multiview.backend=template"], progress=False)
        pipe.run("clusters")
        views = pq.read_table(pipe.artifact_dir("multiview") / "views").to_pylist()
        clusters = pq.read_table(pipe.artifact_dir("clusters") / "clusters").to_pylist()
        return views, {c["ann_id"]: c for c in clusters}

    base_views, base_clusters = run(demo.refer_root, tmp_path / "w0")
    views, clusters = run(root, tmp_path / "w1")
    by_ref: dict[int, dict[str, str]] = {}
    for v in views:
        by_ref.setdefault(v["ref_id"], {})[v["view"]] = v["text"]
    base = {}
    for v in base_views:
        base.setdefault(v["ref_id"], {})[v["view"]] = v["text"]
    assert {r: t for r, t in by_ref.items() if r != twin["ref_id"]} == base
    assert by_ref[twin["ref_id"]] == base[first["ref_id"]]
    ann = first["ann_id"]
    assert clusters[ann]["n_views"] == base_clusters[ann]["n_views"] == len(base[first["ref_id"]])
    np.testing.assert_allclose(clusters[ann]["mu"], base_clusters[ann]["mu"], atol=1e-3)
    assert set(clusters) == set(base_clusters)


def test_limit_images_counts_refs_it_leaves_out_apart(demo, work, checkpoint):
    pipe = pipe_for(demo, work, checkpoint, "multiview.limit_images=2")
    pipe.run("multiview")
    refs = pickle.loads((demo.refer_root / "refcoco" / "refs(unc).p").read_bytes())
    train = [r for r in refs if r["split"] == "train"]
    first_two = sorted({r["image_id"] for r in train})[:2]
    stats = pipe.store.manifest("refcoco", "multiview", pipe.resolve("multiview").key)["stats"]
    assert stats["skipped_multi_or_no_target"] == 0  # refcoco: every ref has one target
    assert stats["skipped_by_limit_images"] == sum(r["image_id"] not in first_two for r in train)
    assert stats["instances"] == sum(r["image_id"] in first_two for r in train)
