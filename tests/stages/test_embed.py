"""embed_images / embed_texts / index against open_clip, faiss-free numpy and the cache."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.api import open_pipeline
from pipeline.errors import InputError
from pipeline.executor import DaskExecutor
from pipeline.io import sha256_file
from stages.embed import embeddings_matrix
from stages.models.clip import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny CLIP checkpoint with non-default weights, loaded through the local-file path."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=7)


def pipe_for(demo, work, checkpoint, *sets, executor=None):
    return open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=["embed.model=tiny", f"embed.pretrained={checkpoint}",
                               "embed.batch_size=8", *sets],
                         executor=executor, progress=False)


def oracle_model(checkpoint):
    with contextlib.redirect_stderr(io.StringIO()):
        model, _, preprocess = open_clip.create_model_and_transforms("nemo-tiny",
                                                                     pretrained=str(checkpoint))
    return model.eval(), preprocess, open_clip.get_tokenizer("nemo-tiny")


def stored(pipe, stage):
    return pq.read_table(pipe.artifact_dir(stage) / "embeddings")


def test_image_embeddings_equal_open_clip(demo, work, checkpoint):
    pipe = pipe_for(demo, work, checkpoint)
    pipe.run("embed_images")
    table = stored(pipe, "embed_images")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[64]"
    ours = embeddings_matrix(table.column("embedding"))
    ids = table.column("image_id").to_pylist()
    images = pq.read_table(pipe.artifact_dir("ingest") / "images").to_pylist()
    assert sorted(ids) == sorted(i["image_id"] for i in images)
    names = {i["image_id"]: i["file_name"] for i in images}
    model, preprocess, _ = oracle_model(checkpoint)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(demo.images_dir / names[i])) for i in ids])
        want = model.encode_image(pixels).numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    cos = (ours * want).sum(1) / np.linalg.norm(ours, axis=1)
    assert cos.min() > 0.999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=2e-3)
    m = pipe.store.manifest("refcoco", "embed_images", pipe.resolve("embed_images").key)
    assert m["model"]["weights_sha256"] == sha256_file(checkpoint)
    assert m["model"]["dim"] == 64 and m["device"] == "cpu" and m["dtype"] == "float16"
    assert {"read_s", "infer_s", "write_s", "model_busy_share"} <= set(m["stats"])


def test_text_embeddings_equal_open_clip(demo, work, checkpoint):
    pipe = pipe_for(demo, work, checkpoint)
    pipe.run("embed_texts")
    table = stored(pipe, "embed_texts")
    sents = pq.read_table(pipe.artifact_dir("ingest") / "sentences")
    assert table.column("sent_id").to_pylist() == sorted(sents.column("sent_id").to_pylist())
    by_id = dict(zip(sents.column("sent_id").to_pylist(), sents.column("sent").to_pylist(),
                     strict=True))
    model, _, tokenizer = oracle_model(checkpoint)
    texts = [by_id[s] for s in table.column("sent_id").to_pylist()]
    with torch.no_grad():
        want = model.encode_text(tokenizer(texts)).numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    ours = embeddings_matrix(table.column("embedding"))
    assert ((ours * want).sum(1) / np.linalg.norm(ours, axis=1)).min() > 0.999


def test_index_search_equals_numpy_topk(demo, work, checkpoint):
    import faiss

    pipe = pipe_for(demo, work, checkpoint)
    pipe.run("index")
    d = pipe.artifact_dir("index")
    images = embeddings_matrix(stored(pipe, "embed_images").column("embedding"))
    texts = embeddings_matrix(stored(pipe, "embed_texts").column("embedding"))
    img_index = faiss.read_index(str(d / "images.faiss"))
    ids = pq.read_table(d / "image_ids").column("image_id").to_numpy()
    assert ids.tolist() == stored(pipe, "embed_images").column("image_id").to_pylist()
    k = 5
    scores, rows = img_index.search(texts, k)
    brute = texts @ images.T
    for q in range(len(texts)):
        want = np.sort(brute[q])[::-1][:k]
        np.testing.assert_allclose(scores[q], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(brute[q, rows[q]], want, rtol=1e-4, atol=1e-5)
    txt_index = faiss.read_index(str(d / "texts.faiss"))
    assert txt_index.ntotal == len(texts)


def test_ivf_index_reports_recall(demo, work, checkpoint):
    import faiss

    pipe = pipe_for(demo, work, checkpoint, "index.kind=ivf", "index.nlist=2", "index.nprobe=2")
    pipe.run("index")
    m = pipe.store.manifest("refcoco", "index", pipe.resolve("index").key)
    info = m["stats"]["indices"]["texts"]
    assert info["kind"] == "ivf" and info["nlist"] == 2
    assert info["recall_at_10"] == 1.0  # all lists probed: exact
    index = faiss.read_index(str(pipe.artifact_dir("index") / "texts.faiss"))
    assert index.nlist == 2 and index.nprobe == 2


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def test_sigkill_mid_embed_resumes_byte_identical(demo, tmp_path, checkpoint):
    common = ["--dataset", "refcoco", "--data-root", str(demo.refer_root), "--images",
              str(demo.images_dir), "--set", "embed.model=tiny", "--set",
              f"embed.pretrained={checkpoint}", "--set", "embed.batch_size=4", "--set",
              "embed.images_per_shard=6"]
    ok = run_cli("run", "--stage", "embed_images", "--work-dir", str(tmp_path / "a"), *common)
    assert ok.returncode == 0, ok.stderr
    # the kill hook counts the shards of each stage: ingest (1 shard) finishes, embed dies
    killed = run_cli("run", "--stage", "embed_images", "--work-dir", str(tmp_path / "b"),
                     *common, env={"NEMO_PIPE_TEST_KILL_AFTER_SHARDS": "3"})
    assert killed.returncode == -9, killed.stderr
    resumed = run_cli("run", "--stage", "embed_images", "--work-dir", str(tmp_path / "b"),
                      *common)
    assert resumed.returncode == 0, resumed.stderr

    def parts(root):
        (d,) = [p for p in (root / "refcoco" / "embed_images").iterdir()
                if not p.name.startswith(".")]
        return {p.relative_to(d).as_posix(): sha256_file(p) for p in d.rglob("*.parquet")}, d

    (a, _), (b, bdir) = parts(tmp_path / "a"), parts(tmp_path / "b")
    assert a == b and len(a) > 3
    import json

    assert json.loads((bdir / "_manifest.json").read_text())["stats"]["shards_resumed"] >= 1


def test_dask_executor_equals_local(demo, tmp_path, checkpoint):
    local = pipe_for(demo, tmp_path / "local", checkpoint, "embed.images_per_shard=10")
    local.run("embed_images")
    dist = pipe_for(demo, tmp_path / "dask", checkpoint, "embed.images_per_shard=10",
                    executor=DaskExecutor(workers=2))
    dist.run("embed_images")

    def parts(pipe):
        d = pipe.artifact_dir("embed_images")
        return {p.relative_to(d).as_posix(): sha256_file(p) for p in d.rglob("*.parquet")}

    assert parts(dist) == parts(local)


def test_undecodable_image_is_recorded_not_fatal(tmp_path, checkpoint):
    from pipeline.stage import ShardWriter
    from stages.embed import EmbedParams, _embed_images_shard

    good = tmp_path / "good.jpg"
    Image.new("RGB", (50, 40), (200, 10, 10)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:100])
    params = EmbedParams(model="tiny", pretrained=str(checkpoint), batch_size=2)
    writer = ShardWriter(tmp_path / "out", 0, "1", params)
    stats = _embed_images_shard({"items": [(1, str(good)), (2, str(bad))], "batch": 2}, writer)
    assert stats["rows"] == 1
    assert [f[0] for f in stats["failed"]] == [2] and "undecodable" in stats["failed"][0][2]
    table = pq.read_table(tmp_path / "out" / "embeddings" / "part-00000.parquet")
    assert table.column("image_id").to_pylist() == [1]


def test_fast_decode_is_in_the_key_and_close(demo, work, checkpoint):
    plain = pipe_for(demo, work, checkpoint)
    fast = pipe_for(demo, work, checkpoint, "embed.fast_decode=true")
    assert plain.resolve("embed_images").key != fast.resolve("embed_images").key
    assert pipe_for(demo, work, checkpoint, "embed.batch_size=3", "embed.workers=1").resolve(
        "embed_images").key == plain.resolve("embed_images").key
    plain.run("embed_images")
    fast.run("embed_images")
    a = embeddings_matrix(stored(plain, "embed_images").column("embedding"))
    b = embeddings_matrix(stored(fast, "embed_images").column("embedding"))
    assert ((a * b).sum(1)).min() > 0.9


@pytest.mark.parametrize("name", ["weights.ckpt", "weights", "sub/w.pt"])
def test_a_replaced_checkpoint_changes_the_key_whatever_its_name(demo, tmp_path, monkeypatch,
                                                                   name):
    """Only names with a path separator or a .pt/.bin/... suffix were hashed into the key: a
    checkpoint `weights.ckpt` (or a bare `weights` in the working directory) overwritten with
    other weights was served from the old one's cache. Every file open_clip would load is."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tiny_checkpoint(path, seed=1)

    def key():
        return open_pipeline("refcoco", tmp_path / "w", data_root=demo.refer_root,
                             images=demo.images_dir, progress=False,
                             sets=["embed.model=tiny", f"embed.pretrained={name}"]
                             ).resolve("embed_texts").key

    first = key()
    assert key() == first  # same bytes, same key
    save_tiny_checkpoint(path, seed=2)
    os.utime(path, ns=(1, 1))  # another mtime too: the file hash cache must see the change
    assert key() != first


def test_bad_model_config_fails_before_any_work(demo, work, tmp_path):
    with pytest.raises(InputError, match="ViT-B-16"):
        open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                      sets=["embed.model=ViT-B-166"], progress=False).run("embed_images")
    with pytest.raises(InputError, match="nope.pt does not exist"):
        open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                      sets=["embed.model=tiny", f"embed.pretrained={tmp_path}/nope.pt"],
                      progress=False).run("embed_images")
    with pytest.raises(InputError, match="embed.batch_size"):
        open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                      sets=["embed.model=tiny", "embed.pretrained=null",
                            "embed.batch_size=100000000"], progress=False).run("embed_images")
    assert not (work / "refcoco" / "ingest").exists()  # nothing ran


def test_tiny_alone_needs_no_pretrained_setting(demo, tmp_path, checkpoint):
    """`--set embed.model=tiny` alone works: `auto` weights are none for the tiny model (it has
    no pretrained tag), `openai` for an open_clip model; explicit values are kept."""
    def params(*sets):
        return open_pipeline("refcoco", tmp_path / "w", sets=list(sets),
                             data_root=demo.refer_root,
                             images=demo.images_dir).resolve("embed_texts")

    tiny = params("embed.model=tiny")
    assert tiny.params.pretrained is None
    assert tiny.key == params("embed.model=tiny", "embed.pretrained=null").key
    assert params().params.pretrained == "openai"
    assert params("embed.pretrained=auto").params.pretrained == "openai"
    explicit = params("embed.model=tiny", f"embed.pretrained={checkpoint}")
    assert explicit.params.pretrained == str(checkpoint)
    res = run_cli("run", "--stage", "embed_texts", "--dataset", "refcoco", "--work-dir",
                  str(tmp_path / "w"), "--data-root", str(demo.refer_root), "--images",
                  str(demo.images_dir), "--set", "embed.model=tiny")
    assert res.returncode == 0, res.stderr


def test_embeddings_matrix_reads_chunked_and_sliced_columns():
    """Chunks read into one matrix in row order; a sliced chunk contributes only its rows
    (its child array still holds the rows before and after the slice)."""
    import pyarrow as pa

    from stages.embed import embedding_array

    x = np.random.default_rng(3).standard_normal((10, 4)).astype(np.float16)
    arr = embedding_array(x)
    col = pa.chunked_array([arr.slice(0, 3), arr.slice(3, 5), arr.slice(8)])
    got = embeddings_matrix(col)
    assert got.dtype == np.float32 and got.shape == (10, 4)
    np.testing.assert_array_equal(got, x.astype(np.float32))
    np.testing.assert_array_equal(embeddings_matrix(arr.slice(2, 4)), x[2:6].astype(np.float32))
    assert embeddings_matrix(arr, np.float16).dtype == np.float16
    assert embeddings_matrix(pa.chunked_array([], arr.type)).shape == (0, 4)
    with_null = pa.FixedSizeListArray.from_arrays(arr.values, 4, mask=pa.array(
        [False, True] + [False] * 8))
    with pytest.raises(ValueError, match="1 null rows"):
        embeddings_matrix(with_null)
