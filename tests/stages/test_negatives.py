"""negatives + mosaic_tables against a brute-force numpy oracle (full score matrix, sort).

The embeddings are replaced by dyadic vectors (entries k/8): every dot product is exact in
float16 storage, float32 torch and float64 numpy alike, so the oracle comparison is exact and
ties, which are frequent with such vectors, exercise the ascending-image_id tie rule.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.api import open_pipeline
from pipeline.io import describe_file, table_files
from stages.embed import embedding_array
from stages.negatives import topm_tiebreak

DIM = 16


def pipe_for(demo, work, *sets, dataset="refcoco"):
    return open_pipeline(dataset, work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=["embed.model=tiny", "embed.pretrained=null", *sets],
                         progress=False)


def reopen(base, *sets, dataset="refcoco"):
    """Another config on the same work dir and data as `base`."""
    return open_pipeline(dataset, base.env.work_dir, data_root=base.env.locations["data_root"],
                         images=base.env.locations["images"],
                         sets=["embed.model=tiny", "embed.pretrained=null", *sets],
                         progress=False)


def replace_embeddings(pipe, stage: str, id_cols: list[str], seed: int) -> None:
    """Swap a published embeddings table for dyadic vectors (same ids), manifest kept true."""
    d = pipe.artifact_dir(stage)
    manifest = json.loads((d / "_manifest.json").read_text())
    rng = np.random.default_rng(seed)
    for path in table_files(d / "embeddings"):
        t = pq.read_table(path)
        vecs = rng.integers(-2, 3, size=(t.num_rows, DIM)).astype(np.float16) / 8
        new = pa.table({**{c: t.column(c) for c in id_cols}, "embedding": embedding_array(vecs)})
        pq.write_table(new, path)
        manifest["files"][path.relative_to(d).as_posix()] = describe_file(path)
    (d / "_manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def dyadic(demo, work):
    def build(dataset="refcoco"):
        pipe = pipe_for(demo, work, dataset=dataset)
        pipe.run("embed_images")
        pipe.run("embed_texts")
        replace_embeddings(pipe, "embed_images", ["image_id"], seed=1)
        replace_embeddings(pipe, "embed_texts", ["sent_id", "ref_id"], seed=2)
        return pipe
    return build


def load(pipe, stage, table):
    return pq.read_table(pipe.artifact_dir(stage) / table)


def matrix(table, id_col):
    ids = np.array(table.column(id_col).to_pylist())
    emb = np.array(table.column("embedding").to_pylist(), dtype=np.float64)
    return dict(zip(ids.tolist(), emb, strict=True))


def oracle(pipe, rank_by="ti", m=2048, splits=("train",)):
    """Per query sentence: candidates sorted by (-rho', image_id) and both scores; extremes."""
    refs = load(pipe, "ingest", "refs").to_pylist()
    sents = load(pipe, "ingest", "sentences").to_pylist()
    img = matrix(load(pipe, "embed_images", "embeddings"), "image_id")
    txt = matrix(load(pipe, "embed_texts", "embeddings"), "sent_id")
    train_images = sorted({r["image_id"] for r in refs if r["split"] == "train"})
    ref_by_id = {r["ref_id"]: r for r in refs}
    out = {}
    for s in sents:
        ref = ref_by_id[s["ref_id"]]
        if ref["split"] not in splits:
            continue
        pool = [i for i in train_images if i != ref["image_id"]]
        V = np.stack([img[i] for i in pool])
        ti = V @ txt[s["sent_id"]]
        ii = V @ img[ref["image_id"]]
        key = ti if rank_by == "ti" else ii
        order = sorted(range(len(pool)), key=lambda j: (-key[j], pool[j]))[:m]
        out[s["sent_id"]] = {
            "image_id": ref["image_id"], "cands": [pool[j] for j in order],
            "ti": ti[order], "ii": ii[order],
            "ti_min": ti.min(), "ti_max": ti.max(), "ii_min": ii.min(), "ii_max": ii.max(),
        }
    return out


def oracle_mosaic(neg, relevance, tau_ti, tau_ii, scale, k):
    out = {}
    for sid, q in neg.items():
        def sc(x, lo, hi):
            if scale == "cosine":
                return x
            return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

        bad = np.zeros(len(q["cands"]), bool)
        if relevance in ("ti", "both") and tau_ti is not None:
            bad |= sc(q["ti"], q["ti_min"], q["ti_max"]) >= tau_ti
        if relevance in ("ii", "both") and tau_ii is not None:
            bad |= sc(q["ii"], q["ii_min"], q["ii_max"]) >= tau_ii
        kept = [c for c, b in zip(q["cands"], bad, strict=True) if not b][:k]
        out[sid] = (kept, k - len(kept))
    return out


@pytest.fixture(params=[1, 2], ids=["serial", "threaded"])
def torch_threads(request):
    """torch's thread count, which sets the stage's block threads: 1 searches blocks one at
    a time, 2 gives whole blocks to two threads (stages.negatives._blocks_in_order)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("rank_by,m", [("ti", 2048), ("ii", 2048), ("ti", 7)])
def test_negatives_equal_bruteforce(dyadic, rank_by, m, torch_threads):
    pipe = dyadic()
    pipe = reopen(pipe, f"negatives.rank_by={rank_by}", f"negatives.m={m}", "negatives.block=5")
    pipe.run("negatives")
    got = {r["sent_id"]: r for r in load(pipe, "negatives", "negatives").to_pylist()}
    want = oracle(pipe, rank_by, m)
    assert set(got) == set(want) and want
    ties = 0
    for sid, w in want.items():
        g = got[sid]
        assert g["image_id"] == w["image_id"]
        assert g["cand_image_ids"] == w["cands"], sid
        np.testing.assert_array_equal(g["rho_ti"], w["ti"])
        np.testing.assert_array_equal(g["rho_ii"], w["ii"])
        for key in ("ti_min", "ti_max", "ii_min", "ii_max"):
            assert g[key] == w[key]
        ties += len(w["ti"]) - len(set(w["ti" if rank_by == "ti" else "ii"].tolist()))
    assert ties > 0  # the tie rule was exercised


def test_no_leakage_own_and_eval_images_never_candidates(dyadic):
    pipe = dyadic()
    pipe.run("mosaic_tables")
    refs = load(pipe, "ingest", "refs").to_pylist()
    train = {r["image_id"] for r in refs if r["split"] == "train"}
    train_refs = {r["ref_id"] for r in refs if r["split"] == "train"}
    neg = load(pipe, "negatives", "negatives").to_pylist()
    assert {r["ref_id"] for r in neg} <= train_refs
    for r in neg:
        assert r["image_id"] not in r["cand_image_ids"]
        assert set(r["cand_image_ids"]) <= train
    for r in load(pipe, "mosaic_tables", "mosaic").to_pylist():
        assert r["image_id"] not in r["neg_image_ids"] and set(r["neg_image_ids"]) <= train


CASES = [
    ("ti", 0.75, None, "minmax", 5),
    ("ti", 0.5, None, "minmax", 100),
    ("ii", None, 0.8, "minmax", 10),
    ("both", 0.75, 0.6, "minmax", 8),
    ("ti", 0.1, None, "cosine", 6),
    ("both", 0.2, 0.3, "cosine", 12),
    ("ti", None, None, "minmax", 4),
]


def test_mosaic_tables_equal_oracle(dyadic):
    base = dyadic()
    want_neg = oracle(base)
    for relevance, tau_ti, tau_ii, scale, k in CASES:
        pipe = reopen(base, f"mosaic_tables.relevance={relevance}",
                      f"mosaic_tables.tau_ti={'null' if tau_ti is None else tau_ti}",
                      f"mosaic_tables.tau_ii={'null' if tau_ii is None else tau_ii}",
                      f"mosaic_tables.scale={scale}", f"mosaic_tables.k={k}")
        pipe.run("mosaic_tables")
        got = {r["sent_id"]: r for r in load(pipe, "mosaic_tables", "mosaic").to_pylist()}
        want = oracle_mosaic(want_neg, relevance, tau_ti, tau_ii, scale, k)
        assert set(got) == set(want)
        filtered = 0
        for sid, (kept, short) in want.items():
            assert got[sid]["neg_image_ids"] == kept, (relevance, tau_ti, tau_ii, scale, k)
            assert got[sid]["k_shortfall"] == max(0, short)
            filtered += len(want_neg[sid]["cands"]) - len(kept)
        assert filtered > 0 or k >= 30


@pytest.mark.parametrize("rank_by", ["ti", "ii"])
def test_float16_scores_scale_like_float32_at_the_extremes(demo, work, rank_by):
    """float16 lists with float32 extremes made the top candidate scale to 1 +- an ulp, so
    tau = 1.0 excluded it in some rows only. The tiny model's (non-dyadic) embeddings round:
    the stored extremes must be rounded like the scores, checked with numpy on the table."""
    pipe = pipe_for(demo, work, "negatives.score_dtype=float16", f"negatives.rank_by={rank_by}",
                    "mosaic_tables.relevance=both", "mosaic_tables.tau_ti=1.0",
                    "mosaic_tables.tau_ii=1.0", "mosaic_tables.k=5")
    pipe.run("mosaic_tables")
    rows = load(pipe, "negatives", "negatives").to_pylist()
    rounded = 0
    for r in rows:
        for score in ("ti", "ii"):
            rho = np.array(r[f"rho_{score}"], np.float64)
            lo, hi = r[f"{score}_min"], r[f"{score}_max"]
            assert hi > lo
            unit = (rho - lo) / (hi - lo)
            assert unit.min() >= 0.0 and unit.max() <= 1.0, (r["sent_id"], score)
            rounded += np.float32(hi) != np.float32(np.float16(hi)) or any(
                np.float16(v) != v for v in rho)
        ranked = np.array(r[f"rho_{rank_by}"], np.float64)
        lo, hi = r[f"{rank_by}_min"], r[f"{rank_by}_max"]
        assert (ranked[0] - lo) / (hi - lo) == 1.0, r["sent_id"]
    assert rounded == 0  # every stored value is a float16 value
    # at tau = 1 (minmax) the top candidate of every query is excluded, as with float32
    mosaic = {r["sent_id"]: r for r in load(pipe, "mosaic_tables", "mosaic").to_pylist()}
    assert set(mosaic) == {r["sent_id"] for r in rows}
    for r in rows:
        assert r["cand_image_ids"][0] not in mosaic[r["sent_id"]]["neg_image_ids"]


def test_paper_defaults_from_data_manifest(demo, work):
    pipe = pipe_for(demo, work)
    p = pipe.resolve("mosaic_tables").params
    assert (p.k, p.tau_ti, p.tau_ii) == (800, 0.85, None)  # RefCOCO; ii unused with relevance ti
    g = pipe_for(demo, work, "mosaic_tables.relevance=both", dataset="refcocog-umd")
    p = g.resolve("mosaic_tables").params
    assert (p.k, p.tau_ti, p.tau_ii) == (200, 0.75, 0.75)
    # an unused threshold stays out of the key
    a = pipe_for(demo, work, "mosaic_tables.tau_ii=0.1").resolve("mosaic_tables").key
    assert a == pipe.resolve("mosaic_tables").key


def test_cache_tau_k_relevance_rerun_mosaic_only_rank_by_reruns_negatives(demo, work):
    pipe_for(demo, work).run("mosaic_tables")
    for change in ("mosaic_tables.k=3", "mosaic_tables.tau_ti=0.5",
                   "mosaic_tables.relevance=ii", "mosaic_tables.scale=cosine"):
        plan = {i.name: i.state for i in pipe_for(demo, work, change).plan("mosaic_tables")}
        assert plan == {"ingest": "cached", "embed_images": "cached", "embed_texts": "cached",
                        "negatives": "cached", "mosaic_tables": "stale"}, change
    plan = {i.name: i.state
            for i in pipe_for(demo, work, "negatives.rank_by=ii").plan("mosaic_tables")}
    assert plan["embed_images"] == plan["embed_texts"] == "cached"
    assert plan["negatives"] == "stale" and plan["mosaic_tables"] == "stale"


def test_shortfall_reported_when_m_too_small(dyadic, caplog):
    base = dyadic()
    # K = auto: refcoco's data manifest says 800, far above m = 4 (an explicit K above m is a
    # config error: tests/pipeline/test_param_domains.py); the run warns and reports the shortfall
    pipe = reopen(base, "negatives.m=4", "mosaic_tables.tau_ti=null")
    assert pipe.resolve("mosaic_tables").params.k == 800
    with caplog.at_level("WARNING", logger="stages.mosaic_tables"):
        pipe.run("mosaic_tables")
    assert "mosaic_tables.k=800 (the data manifest's K) is above negatives.m=4" in caplog.text
    rows = load(pipe, "mosaic_tables", "mosaic").to_pylist()
    assert all(len(r["neg_image_ids"]) == 4 and r["k_shortfall"] == 796 for r in rows)
    m = json.loads((pipe.artifact_dir("mosaic_tables") / "_manifest.json").read_text())
    assert m["stats"]["queries_short_of_k"] == len(rows) and m["stats"]["share_short_of_k"] == 1


def test_grefcoco_no_target_sentences_are_queries(dyadic):
    pipe = dyadic("grefcoco")
    pipe.run("mosaic_tables")
    refs = load(pipe, "ingest", "refs").to_pylist()
    no_target = {r["ref_id"] for r in refs if not r["ann_ids"] and r["split"] == "train"}
    assert no_target
    queried = {r["ref_id"] for r in load(pipe, "negatives", "negatives").to_pylist()}
    assert no_target <= queried


def test_topm_tiebreak_boundary_ties():
    rank = np.array([[0.5, 0.9, 0.5, 0.5, 0.1, 0.9]])
    # a top-3 selection that took the tied 0.5 at column 3 instead of column 0
    vals = np.array([[0.9, 0.9, 0.5]])
    idx = np.array([[5, 1, 3]])
    assert topm_tiebreak(rank, vals, idx).tolist() == [[1, 5, 0]]


def test_unknown_query_split_is_an_error(demo, work):
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="query_splits"):
        pipe_for(demo, work, "negatives.query_splits=[training]").run("negatives")
    assert not (work / "refcoco" / "ingest").exists()  # caught before any work


def test_blocks_come_back_in_order_from_one_threaded_workers():
    """Whole blocks run in worker threads that finish out of order; the caller still gets
    them in block order, each worker's products run on one torch thread while the caller
    keeps its own count, and at most `threads` blocks start ahead of the one handed over."""
    import threading
    import time

    import torch

    from stages.negatives import _blocks_in_order

    main_threads = torch.get_num_threads()
    started, seen = [], []

    def search(s, threads, scratch):
        started.append(s)
        scratch.setdefault("owner", threading.get_ident())
        assert scratch["owner"] == threading.get_ident()  # one scratch per worker thread
        time.sleep(0.02 if s % 20 == 0 else 0.0)  # every other block finishes late
        return {"start": s, "threads": threads, "torch": torch.get_num_threads()}

    for s, r in _blocks_in_order(search, range(0, 100, 10), 2, whole_blocks=True):
        seen.append(s)
        assert r["start"] == s and r["threads"] == 1 and r["torch"] == 1
        assert max(started) <= s + 2 * 10  # at most threads blocks ahead of the caller
    assert seen == list(range(0, 100, 10))
    assert torch.get_num_threads() == main_threads
    serial = [(s, r["threads"]) for s, r in _blocks_in_order(search, range(0, 30, 10), 2,
                                                              whole_blocks=False)]
    assert serial == [(0, 2), (10, 2), (20, 2)]  # the device path: one block at a time


def test_many_cores_share_out_between_at_most_eight_block_workers():
    """20 threads: 8 workers (each holds a buffer) of 2 torch threads, not 20 of 1."""
    import threading

    import torch

    from stages.negatives import MAX_BLOCK_WORKERS, _blocks_in_order

    owners = set()

    def search(s, threads, scratch):
        owners.add(threading.get_ident())
        return {"threads": threads, "torch": torch.get_num_threads()}

    got = list(_blocks_in_order(search, range(0, 400, 10), 20, whole_blocks=True))
    assert MAX_BLOCK_WORKERS == 8 and 1 < len(owners) <= 8
    assert [s for s, _ in got] == list(range(0, 400, 10))
    assert all(r["threads"] == 2 and r["torch"] == 2 for _, r in got)


def test_a_failing_block_stops_the_search_and_raises():
    from stages.negatives import _blocks_in_order

    started = []

    def search(s, threads, scratch):
        started.append(s)
        if s == 3:
            raise ValueError("block 3 failed")
        return {}

    got = []
    with pytest.raises(ValueError, match="block 3 failed"):
        for s, _ in _blocks_in_order(search, range(50), 2, whole_blocks=True):
            got.append(s)
    assert got == [0, 1, 2]
    assert len(started) < 50  # queued blocks were cancelled, not run
