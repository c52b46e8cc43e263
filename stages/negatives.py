"""negatives: for every query sentence, the top-M pool images by the ranking relevance rho'.

NeMo ranks candidate negative images of a training expression T (image I) by CLIP relevance:
rho_ti = t.v' (text to image) or rho_ii = v.v' (image to image). This stage keeps, per query,
the M best candidates by `rank_by` with both scores, unfiltered, plus the query's pool extremes
(for the per-query min-max scale). Filtering by tau and cutting to K happen in mosaic_tables, so
a tau or K sweep never recomputes this.

The pool is the training split's images only, and a query's own image is never a candidate:
validation and test images cannot leak into training mosaics. Search is exact: blocked matrix
products (torch, on GPU when present) with a top-M per block, never the full score matrix.
Ties are broken by ascending image_id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.io import ParquetFormat
from pipeline.stage import (
    INT_MAX,
    Count,
    Device,
    Params,
    RunEnv,
    ShardTask,
    ShardWriter,
    Splits,
    Stage,
    StageContext,
    runtime_field,
)
from pipeline.upstream import UpstreamTable
from stages.ops.topm import select_topm
from stages.refer.manifests import check_splits, load_data_manifest

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


class NegativesParams(Params):
    rank_by: Literal["ti", "ii"] = Field("ti", description="rho' that ranks candidates")
    m: int = Field(2048, ge=3, le=INT_MAX, description="candidates kept per query (a mosaic "
                   "shows 3 negatives; mosaic_tables.k <= m)")
    query_splits: Splits = Field(["train"], description="splits whose sentences are queries")
    score_dtype: Literal["float32", "float16"] = Field(
        "float32", description="stored dtype of rho_ti / rho_ii lists (float16 halves the size)")
    queries_per_shard: Count = Field(8192, description="queries per resumable shard")
    block: Count = runtime_field(1024, "queries per matrix product")
    device: Device = runtime_field("auto", "auto (CUDA when present), cpu, cuda:N")
    selection: Literal["auto", "sort", "topk"] = runtime_field(
        "auto", "top-M method: sort (CPU), topk (GPU); auto picks by device; same output")


class Negatives(Stage[NegativesParams]):
    """Top-M candidate negative images per training sentence, ranked by rho', with both scores."""

    name = "negatives"
    version = "1"
    inputs = ("ingest", "embed_images", "embed_texts")
    tables = ("negatives",)
    libraries = ("pyarrow", "torch", "numpy")

    def preflight(self, env: RunEnv, params: NegativesParams) -> None:
        p = params
        check_splits("negatives.query_splits", p.query_splits, env.dataset)

    def run(self, ctx: StageContext[NegativesParams]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        p = ctx.params
        manifest = load_data_manifest(ctx.env.dataset)
        refs = ctx.read_table("ingest", "refs")
        sents = ctx.read_table("ingest", "sentences").select(["sent_id", "ref_id"])
        query_refs = refs.filter(pc.is_in(refs.column("split"), pa.array(p.query_splits)))
        ref_image = dict(zip(query_refs.column("ref_id").to_pylist(),
                             query_refs.column("image_id").to_pylist(), strict=True))
        queries = sorted((s, r, ref_image[r]) for s, r in zip(
            sents.column("sent_id").to_pylist(), sents.column("ref_id").to_pylist(), strict=True)
            if r in ref_image)
        dirs = {"images": ctx.upstream_table("embed_images", "embeddings"),
                "texts": ctx.upstream_table("embed_texts", "embeddings"),
                "refs": ctx.upstream_table("ingest", "refs"),
                "train_split": manifest.train_split}
        tasks = [ShardTask(n, {"queries": queries[s:s + p.queries_per_shard], "dirs": dirs})
                 for n, s in enumerate(range(0, len(queries), p.queries_per_shard))]
        stats = ctx.run_shards(_negatives_shard, tasks, desc="search")
        pool = _pool(dirs)
        model = ctx.upstream_manifest("embed_images").get("model", {})
        ctx.extra.update(clip_model=model, score_scale="raw cosine",
                         id_dtype="int32", score_dtype=p.score_dtype)
        ctx.record(queries=sum(s["queries"] for s in stats), pool_images=len(pool[0]),
                   skipped_queries=sum(s["skipped"] for s in stats),
                   m_effective=min(p.m, len(pool[0])),
                   device=stats[0]["device"] if stats else None)


# -- per-process caches of the upstream matrices (built inside the worker, never pickled) ----
def _cached(key: str, build: Any) -> Any:
    from pipeline.process_cache import process_cached

    return process_cached("negatives", key, build)


def _embeddings_by_id(table: UpstreamTable, id_col: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted ascending, float32 matrix in that order)."""
    import numpy as np

    from stages.embed import embeddings_matrix

    t = table.read()
    ids = t.column(id_col).to_numpy()
    order = np.argsort(ids, kind="stable")
    return ids[order], embeddings_matrix(t.column("embedding"))[order]


def _pool(dirs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Train-split images that have an embedding: (image ids ascending, vectors)."""
    def build() -> tuple[np.ndarray, np.ndarray]:
        import numpy as np
        import pyarrow.compute as pc

        refs = dirs["refs"].read()
        train = refs.filter(pc.equal(refs.column("split"), dirs["train_split"]))
        train_ids = np.unique(train.column("image_id").to_numpy())
        ids, vecs = _cached("img:" + dirs["images"].ident,
                            lambda: _embeddings_by_id(dirs["images"], "image_id"))
        keep = np.isin(ids, train_ids)
        return ids[keep], np.ascontiguousarray(vecs[keep])

    return _cached("pool:" + dirs["images"].ident + dirs["refs"].ident, build)


def topm_tiebreak(rank: np.ndarray, vals: np.ndarray, idx: np.ndarray,
                  boundary: np.ndarray | None = None) -> np.ndarray:
    """Exact top-M column indices of `rank` rows, descending, ties by ascending column.

    `vals`/`idx` are a descending top-M selection whose order among equal values is arbitrary
    (torch.topk). Only rows with a tie, inside the selection or at its boundary with unselected
    columns, are redone; with real-valued scores those are rare. `boundary` (rows whose M-th
    value is tied with an unselected column) may be passed in when computed elsewhere.
    """
    import numpy as np

    m = idx.shape[1]
    kth = vals[:, -1:]
    inner = (vals[:, 1:] == vals[:, :-1]).any(axis=1) if m > 1 else np.zeros(len(idx), bool)
    if boundary is None:
        boundary = (rank == kth).sum(axis=1) > (vals == kth).sum(axis=1)
    for row in np.nonzero(inner | boundary)[0]:
        r = rank[row]
        above = np.nonzero(r > kth[row, 0])[0]
        ties = np.nonzero(r == kth[row, 0])[0][: m - len(above)]
        cols = np.concatenate([above, ties])
        idx[row] = cols[np.lexsort((cols, -r[cols]))]
    return idx


def _exclude_own(scores: Any, own: Any) -> tuple[Any, Any]:
    """Leave column own[r] (-1: none) out of row r of `scores` (torch, rows x pool): return
    the row minima and maxima of the rest, and set the own cells to -inf so that they are
    never selected while other columns remain. Each extreme takes one pass: the own column
    first takes a neighbour's value, which changes neither extreme of the rest. A pool of just
    the own image has extremes (inf, -inf), as over an empty set."""
    import torch

    rows = torch.nonzero(own >= 0).reshape(-1)
    cols = own[rows]
    n_cols = scores.shape[1]
    if n_cols > 1 and len(rows):
        neighbour = torch.where(cols + 1 < n_cols, cols + 1, cols - 1)
        scores[rows, cols] = scores[rows, neighbour]
    lo, hi = scores.amin(1), scores.amax(1)
    if n_cols == 1 and len(rows):
        lo[rows], hi[rows] = float("inf"), float("-inf")
    scores[rows, cols] = float("-inf")
    return lo, hi


def search_block(t: np.ndarray, v: np.ndarray, inverse: np.ndarray, own: np.ndarray,
                 pool: Any, m: int, rank_by: str, device: Any, selection: str = "sort",
                 threads: int = 2) -> dict[str, np.ndarray]:
    """Both scores of the top-M pool columns of a block of queries, own image excluded.

    t: (B, d) text vectors; v: (U, d) the block's distinct query images, inverse: (B,) row of
    each query's image in v; own: (U,) pool column of each of those images or -1; pool: (P, d)
    torch tensor on `device`. The sentences of one image share their image-to-image row, so it
    is computed, reduced and (for rank_by ii) ranked once per image. Returns idx (B, m') with
    m' = min(m, P), own-image entries marked -1, rho_ti and rho_ii at idx, and per-row pool
    extremes of both scores. `selection`: `sort` (threshold then one key sort, fast on CPU) or
    `topk` (torch.topk plus a tie pass, fast on GPU); both exact.
    """
    import numpy as np
    import torch

    inverse_t = torch.from_numpy(inverse).to(device)
    own_t = torch.from_numpy(own).to(device)
    ti = torch.from_numpy(t).to(device) @ pool.T
    ii = torch.from_numpy(v).to(device) @ pool.T
    result: dict[str, np.ndarray] = {}
    for name, scores, own_rows in (("ti", ti, own_t[inverse_t]), ("ii", ii, own_t)):
        lo, hi = _exclude_own(scores, own_rows)
        if name == "ii":
            lo, hi = lo[inverse_t], hi[inverse_t]
        result[f"{name}_min"], result[f"{name}_max"] = lo.cpu().numpy(), hi.cpu().numpy()
    rank = ti if rank_by == "ti" else ii
    mm = min(m, rank.shape[1])
    if selection == "topk":
        vals, top = torch.topk(rank, mm, dim=1, largest=True, sorted=True)
        kth = vals[:, -1:]
        boundary = ((rank == kth).sum(1) > (vals == kth).sum(1)).cpu().numpy()
        idx = topm_tiebreak(rank.cpu().numpy(), vals.cpu().numpy(), top.cpu().numpy(), boundary)
    else:
        idx = select_topm(rank.cpu().numpy(), mm, threads=threads)
    if rank_by == "ii":
        idx = idx[inverse]
    idx_t = torch.from_numpy(idx).to(device)
    rho_ti = ti.gather(1, idx_t)
    rho_ii = ii[inverse_t[:, None], idx_t]
    if mm == rank.shape[1]:  # only a top-M that takes the whole pool reaches the own image
        own_hit = (rho_ti if rank_by == "ti" else rho_ii) == float("-inf")
        idx = np.where(own_hit.cpu().numpy(), -1, idx)
    result["idx"] = idx
    result["rho_ti"] = rho_ti.cpu().numpy()
    result["rho_ii"] = rho_ii.cpu().numpy()
    return result


# candidate lists dominate the table (M values per query): they write several times faster
# without dictionary or statistics, and the score lists gain under 10% from compression
NEGATIVES_FORMAT = ParquetFormat(use_dictionary=False, compression_level=1,
                                 uncompressed=("rho_ti", "rho_ii"),
                                 statistics=("sent_id", "ref_id", "image_id"))


def negatives_schema(score_type: pa.DataType) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        ("sent_id", pa.int64()), ("ref_id", pa.int64()), ("image_id", pa.int64()),
        ("cand_image_ids", pa.list_(pa.int32())), ("rho_ti", pa.list_(score_type)),
        ("rho_ii", pa.list_(score_type)),
        *[(k, pa.float32()) for k in ("ti_min", "ti_max", "ii_min", "ii_max")]])


def _block_table(q: np.ndarray, r: dict[str, np.ndarray], pool_ids: np.ndarray,
                 schema: pa.Schema) -> pa.Table:
    """One block's rows; own-image entries (idx -1, only when M reaches the pool size) are
    dropped from the lists."""
    import numpy as np
    import pyarrow as pa

    idx = r["idx"]
    keep = idx >= 0
    full = bool(keep.all())
    lengths = np.full(len(idx), idx.shape[1]) if full else keep.sum(axis=1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    score_type = schema.field("rho_ti").type.value_type
    np_score = np.float16 if score_type == pa.float16() else np.float32

    def flat(values: np.ndarray) -> np.ndarray:
        return values.reshape(-1) if full else values[keep]

    def lists(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values, typ))

    ids = pool_ids.astype(np.int32)[flat(np.where(keep, idx, 0))]
    return pa.table({
        "sent_id": pa.array(q[:, 0], pa.int64()),
        "ref_id": pa.array(q[:, 1], pa.int64()),
        "image_id": pa.array(q[:, 2], pa.int64()),
        "cand_image_ids": lists(ids, pa.int32()),
        "rho_ti": lists(flat(r["rho_ti"]).astype(np_score, copy=False), score_type),
        "rho_ii": lists(flat(r["rho_ii"]).astype(np_score, copy=False), score_type),
        **{k: pa.array(r[k].astype(np.float32, copy=False), pa.float32())
           for k in ("ti_min", "ti_max", "ii_min", "ii_max")},
    }, schema=schema)


def _negatives_shard(payload: dict[str, Any],
                     writer: ShardWriter[NegativesParams]) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import torch

    p = writer.params
    dirs = payload["dirs"]
    pool_ids, pool_vecs = _pool(dirs)
    img_ids, img_vecs = _cached("img:" + dirs["images"].ident,
                                lambda: _embeddings_by_id(dirs["images"], "image_id"))
    txt_ids, txt_vecs = _cached("txt:" + dirs["texts"].ident,
                                lambda: _embeddings_by_id(dirs["texts"], "sent_id"))
    device = torch.device("cuda" if p.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if p.device == "auto" else p.device))

    q = np.array(payload["queries"], dtype=np.int64).reshape(-1, 3)
    t_pos = np.searchsorted(txt_ids, q[:, 0])
    v_pos = np.searchsorted(img_ids, q[:, 2])
    ok = ((t_pos < len(txt_ids)) & (txt_ids[np.minimum(t_pos, len(txt_ids) - 1)] == q[:, 0])
          & (v_pos < len(img_ids)) & (img_ids[np.minimum(v_pos, len(img_ids) - 1)] == q[:, 2]))
    q, t_pos, v_pos = q[ok], t_pos[ok], v_pos[ok]
    own = np.searchsorted(pool_ids, q[:, 2])
    own = np.where((own < len(pool_ids)) & (pool_ids[np.minimum(own, len(pool_ids) - 1)]
                                            == q[:, 2]), own, -1)

    pool_t = torch.from_numpy(pool_vecs).to(device)
    selection = p.selection if p.selection != "auto" else (
        "topk" if device.type == "cuda" else "sort")
    score_type = pa.float16() if p.score_dtype == "float16" else pa.float32()
    schema = negatives_schema(score_type)
    with writer.stream_table("negatives", schema, NEGATIVES_FORMAT) as out:
        for s in range(0, len(q), p.block):
            images, first, inverse = np.unique(v_pos[s:s + p.block], return_index=True,
                                               return_inverse=True)
            r = search_block(txt_vecs[t_pos[s:s + p.block]], img_vecs[images],
                             inverse.reshape(-1), own[s:s + p.block][first], pool_t, p.m,
                             p.rank_by, device, selection, threads=torch.get_num_threads())
            out.write(_block_table(q[s:s + p.block], r, pool_ids, schema))
    return {"queries": int(len(q)), "skipped": int((~ok).sum()), "device": str(device)}
