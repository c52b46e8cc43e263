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

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.io import CloseOrAbort, ParquetFormat, ParquetStream, part_name
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
from stages.ops.topm import CHUNK_ROWS, topm_rows, topm_with_values
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
    # 2: non-null fields, parts of ROWS_PER_PART rows; 3: with float16 scores, the extremes
    # are rounded like the scores (the minmax scale of the top candidate is exactly 1)
    version = "3"
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
        inputs = SearchInputs(images=ctx.upstream_table("embed_images", "embeddings"),
                              refs=ctx.upstream_table("ingest", "refs"),
                              train_split=manifest.train_split,
                              texts=ctx.upstream_table("embed_texts", "embeddings"))
        # a shard writes parts index .. index + parts_per_shard - 1 (see PartWriter)
        parts_per_shard = -(-p.queries_per_shard // ROWS_PER_PART)
        tasks = [ShardTask(n * parts_per_shard, {
                     "queries": queries[s:s + p.queries_per_shard], "inputs": inputs})
                 for n, s in enumerate(range(0, len(queries), p.queries_per_shard))]
        stats = ctx.run_shards(_negatives_shard, tasks, desc="search")
        pool = training_pool(inputs)
        model = ctx.upstream_manifest("embed_images").get("model", {})
        ctx.extra.update(clip_model=model, score_scale="raw cosine",
                         id_dtype="int32", score_dtype=p.score_dtype)
        ctx.record(queries=sum(s["queries"] for s in stats), pool_images=len(pool[0]),
                   skipped_queries=sum(s["skipped"] for s in stats),
                   m_effective=min(p.m, len(pool[0])),
                   device=stats[0]["device"] if stats else None,
                   # where the shards' time went: reading the embeddings, the search (products,
                   # top-M, gathers, copies to the host), building and writing the table
                   # (waits for the part encoders included)
                   **{k: round(sum(s.get(k, 0.0) for s in stats), 3)
                      for k in ("inputs_s", "search_s", "write_s")})


# -- per-process caches of the upstream matrices (built inside the worker, never pickled) ----
def _cached(key: Any, build: Any) -> Any:
    from pipeline.process_cache import process_cached

    return process_cached("negatives", key, build)


def _embeddings_by_id(table: UpstreamTable, id_col: str,
                      as_stored: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted ascending, matrix in that order: float32, or the stored float type)."""
    import numpy as np

    from stages.embed import embeddings_matrix

    t = table.read([id_col, "embedding"])
    ids = t.column(id_col).to_numpy()
    column = t.column("embedding")
    vectors = embeddings_matrix(column, column.type.value_type.to_pandas_dtype()
                                if as_stored else np.float32)
    if len(ids) < 2 or bool((ids[1:] >= ids[:-1]).all()):  # the embed stages write in id order
        return ids, vectors
    order = np.argsort(ids, kind="stable")
    return ids[order], vectors[order]


def cached_embeddings(table: UpstreamTable, id_col: str,
                      as_stored: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An embeddings table as (ids ascending, float32 matrix), read once per process (this
    stage's shards and mosaic_tables' full-row recompute share it). `as_stored` keeps the
    stored float type (float16 from the embed stages): exact, half the memory, and no cast of
    the whole matrix up front (0.3 s and 250 MiB of fresh pages for RefCOCO's sentences); the
    search casts each block's rows as it takes them."""
    return _cached((id_col, table.ident, as_stored),
                   lambda: _embeddings_by_id(table, id_col, as_stored))


@dataclass(frozen=True)
class SearchInputs:
    """The upstream tables the search reads: shards get it in their payload (picklable: the
    tables are paths and content hashes), and mosaic_tables' whole-pool recompute builds the
    same one, so both share the per-process caches below."""

    images: UpstreamTable  # embed_images: image_id, embedding
    refs: UpstreamTable  # ingest: ref_id, image_id, split (the pool is the training split's)
    train_split: str
    texts: UpstreamTable | None = None  # embed_texts: sent_id, embedding (for the products)


def training_pool(inputs: SearchInputs) -> tuple[np.ndarray, np.ndarray]:
    """Train-split images that have an embedding: (image ids ascending, vectors)."""
    def build() -> tuple[np.ndarray, np.ndarray]:
        import numpy as np
        import pyarrow.compute as pc

        refs = inputs.refs.read()
        train = refs.filter(pc.equal(refs.column("split"), inputs.train_split))
        train_ids = np.unique(train.column("image_id").to_numpy())
        ids, vecs = cached_embeddings(inputs.images, "image_id")
        keep = np.isin(ids, train_ids)
        return ids[keep], np.ascontiguousarray(vecs[keep])

    return _cached("pool:" + inputs.images.ident + inputs.refs.ident, build)


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
    """Leave column own[r] (-1: none) out of row r of `scores` (rows x pool, a torch tensor or
    a numpy array, changed in place): return the row minima and maxima of the rest, and set
    the own cells to -inf so that they are never selected while other columns remain. Both
    extremes take one pass: the own column first takes a neighbour's value, which changes
    neither extreme of the rest. A pool of just the own image has extremes (inf, -inf), as
    over an empty set. numpy on the host: its row reductions are several times faster there
    than torch's."""
    import numpy as np

    host = isinstance(scores, np.ndarray)
    if host:
        rows = np.flatnonzero(own >= 0)
    else:
        import torch

        rows = torch.nonzero(own >= 0).reshape(-1)
    cols = own[rows]
    n_cols = scores.shape[1]
    if n_cols > 1 and len(rows):
        neighbour = cols + 1
        neighbour[neighbour == n_cols] = n_cols - 2
        scores[rows, cols] = scores[rows, neighbour]
    if host:
        lo, hi = scores.min(axis=1), scores.max(axis=1)
    else:
        lo, hi = torch.aminmax(scores, dim=1)
    if n_cols == 1 and len(rows):
        lo[rows], hi[rows] = float("inf"), float("-inf")
    scores[rows, cols] = float("-inf")
    return lo, hi


def _topk_exact(rank: Any, m: int) -> tuple[Any, Any]:
    """torch.topk made exact: (values, columns) of each row's m best, descending, ties by
    ascending column. Ties inside the selection are ordered by two stable sorts on the
    device; rows whose m-th value is also held by an unselected column (the selection itself
    is then arbitrary) are redone on the host, only those rows."""
    import torch

    vals, top = torch.topk(rank, m, dim=1, largest=True, sorted=True)
    top, perm = torch.sort(top, dim=1)
    vals, perm = torch.sort(vals.gather(1, perm), dim=1, descending=True, stable=True)
    top = top.gather(1, perm)
    kth = vals[:, -1:]
    rows = torch.nonzero((rank == kth).sum(1) > (vals == kth).sum(1)).reshape(-1)
    if len(rows):
        import numpy as np

        fixed = topm_tiebreak(rank[rows].cpu().numpy(), vals[rows].cpu().numpy(),
                              top[rows].cpu().numpy(), np.ones(len(rows), bool))
        top[rows] = torch.from_numpy(fixed).to(top.device)
    return vals, top


def search_block(t: np.ndarray, v: np.ndarray, inverse: np.ndarray, own: np.ndarray,
                 pool: Any, m: int, rank_by: str, device: Any, selection: str = "sort",
                 threads: int = 2, pool_ids: np.ndarray | None = None,
                 scratch: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Both scores of the top-M pool columns of a block of queries, own image excluded.

    t: (B, d) text vectors, float16 as stored or float32 (cast exactly to the pool's float32);
    v: (U, d) the block's distinct query images, inverse: (B,) row of each query's image in v;
    own: (U,) pool column of each of those images or -1; pool: (P, d) torch tensor on
    `device`. The sentences of one image share their image-to-image row, so it
    is computed, reduced and (for rank_by ii) ranked once per image. Returns idx (B, m') int32
    with m' = min(m, P), own-image entries marked -1, rho_ti and rho_ii at idx, and per-row
    pool extremes of both scores; with `pool_ids` (int32 (P,)), also ids: the pool ids at
    idx (-1 where idx is), mapped where the work is spread (device or chunk threads).
    `selection`: `sort` (threshold then a sort of packed keys, on the host: `_search_host`)
    or `topk` (torch.topk plus tie passes, on the device); both exact. `scratch`: a dict kept
    across a shard's blocks, where the host path keeps the buffer of its products.
    """
    import numpy as np
    import torch

    inverse_t = torch.from_numpy(inverse).to(device)
    own_t = torch.from_numpy(own).to(device)
    if selection == "sort" and scratch is not None and pool.device.type == "cpu":
        ti, ii = _products_into(t, v, pool, scratch)
    else:  # float16 vectors (as stored) cross to the device at half the bytes
        ti = torch.from_numpy(t).to(device).to(pool.dtype) @ pool.T
        ii = torch.from_numpy(v).to(device).to(pool.dtype) @ pool.T
    mm = min(m, ti.shape[1])
    if selection == "sort":
        return _search_host(ti.cpu().numpy(), ii.cpu().numpy(), inverse, own, mm, rank_by,
                            threads, pool_ids)
    result: dict[str, np.ndarray] = {}
    for name, scores, own_rows in (("ti", ti, own_t[inverse_t]), ("ii", ii, own_t)):
        lo, hi = _exclude_own(scores, own_rows)
        if name == "ii":
            lo, hi = lo[inverse_t], hi[inverse_t]
        result[f"{name}_min"], result[f"{name}_max"] = lo.cpu().numpy(), hi.cpu().numpy()
    vals, idx_t = _topk_exact(ti if rank_by == "ti" else ii, mm)
    if rank_by == "ii":  # one ranking per image, shared by its sentences
        idx_t, vals = idx_t[inverse_t], vals[inverse_t]
        rho_ti, rho_ii = ti.gather(1, idx_t), vals
    else:
        rho_ti, rho_ii = vals, ii[inverse_t[:, None], idx_t]
    if mm == ti.shape[1]:  # only a top-M that takes the whole pool reaches the own image
        idx_t = torch.where(vals == float("-inf"), -1, idx_t)
    if pool_ids is not None:
        ids_t = torch.from_numpy(pool_ids.astype(np.int32, copy=False)).to(device)
        result["ids"] = torch.where(idx_t >= 0, ids_t[idx_t.clamp(min=0)], -1).cpu().numpy()
    result["idx"] = idx_t.to(torch.int32).cpu().numpy()
    result["rho_ti"] = rho_ti.cpu().numpy()
    result["rho_ii"] = rho_ii.cpu().numpy()
    return result


def _products_into(t: np.ndarray, v: np.ndarray, pool: Any,
                   scratch: dict[str, Any]) -> tuple[Any, Any]:
    """(t @ pool^T, v @ pool^T) as two row ranges of one product written into a buffer
    reused across blocks. Fresh result tensors cost their pages from the kernel again each
    block (torch's CPU allocator maps them anew: about 20,000 faults a block at RefCOCO size,
    dearer than the image rows' product itself), and the image rows alone (about 150 a block)
    are a product too thin to run at full speed. The host search returns new arrays, so
    nothing refers to the buffer once `search_block` has returned."""
    import numpy as np
    import torch

    rows = len(t) + len(v)
    buf = scratch.get("scores")
    if buf is None or buf.shape[0] < rows or buf.shape[1] != len(pool):
        # a quarter more rows: later blocks may hold more distinct images than the first
        buf = scratch["scores"] = torch.empty((rows + rows // 4, len(pool)), dtype=pool.dtype)
    both = torch.from_numpy(np.concatenate([t, v]).astype(np.float32, copy=False))
    out = torch.matmul(both, pool.T, out=buf[:rows])
    return out[:len(t)], out[len(t):]


_GATHER = threading.local()


def _gather_buffer(shape: tuple[int, int]) -> np.ndarray:
    """This thread's int64 scratch for a chunk's flat gather indices, kept across chunks and
    blocks (a fresh 2 MiB array per chunk costs its pages from the kernel again)."""
    import numpy as np

    buf = getattr(_GATHER, "buf", None)
    if buf is None or buf.shape[1] != shape[1] or buf.shape[0] < shape[0]:
        buf = _GATHER.buf = np.empty((max(shape[0], CHUNK_ROWS), shape[1]), np.int64)
    return buf[:shape[0]]


def _search_host(ti: np.ndarray, ii: np.ndarray, inverse: np.ndarray, own: np.ndarray,
                 mm: int, rank_by: str, threads: int,
                 pool_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`search_block` after the products, with numpy on the host. The text-to-image rows are
    taken CHUNK_ROWS at a time by each thread, which reduces, ranks and gathers a chunk while
    it is in cache (one pass over the block's scores from memory instead of four); the few
    image-to-image rows are reduced (and for rank_by ii ranked) first, once per image."""
    import numpy as np

    n, n_cols = ti.shape
    out = {"idx": np.empty((n, mm), np.int32), "rho_ti": np.empty((n, mm), np.float32),
           "rho_ii": np.empty((n, mm), np.float32),
           **{k: np.empty(n, np.float32) for k in ("ti_min", "ti_max")}}
    ii_lo, ii_hi = _exclude_own(ii, own)
    out["ii_min"], out["ii_max"] = ii_lo[inverse], ii_hi[inverse]
    if rank_by == "ii":
        by_image, by_image_vals = topm_with_values(ii, mm, threads)
    ii_flat = ii.reshape(-1)
    if pool_ids is not None:
        ids32 = np.append(pool_ids.astype(np.int32), np.int32(-1))  # [-1] -> -1
        out["ids"] = np.empty((n, mm), np.int32)

    def chunk(start: int) -> None:
        rows = slice(start, start + CHUNK_ROWS)
        part, images = ti[rows], inverse[rows]
        idx = out["idx"][rows]  # results go straight into the block's arrays (no temporaries)
        out["ti_min"][rows], out["ti_max"][rows] = _exclude_own(part, own[images])
        if rank_by == "ti":
            topm_rows(part, mm, idx, out["rho_ti"][rows])
            # rows of one image are neighbours: its row of ii stays in cache for them
            flat = _gather_buffer(idx.shape)
            np.add(idx, (images * n_cols)[:, None], out=flat)
            np.take(ii_flat, flat, out=out["rho_ii"][rows], mode="wrap")  # in range: unbuffered
        else:
            idx[:] = by_image[images]
            out["rho_ii"][rows] = by_image_vals[images]
            out["rho_ti"][rows] = np.take_along_axis(part, idx, axis=1)
        if mm == n_cols:  # only a top-M that takes the whole pool reaches the own image
            rank = out["rho_ti" if rank_by == "ti" else "rho_ii"][rows]
            np.putmask(idx, rank == -np.inf, -1)
        if pool_ids is not None:
            np.take(ids32, idx, out=out["ids"][rows], mode="wrap")  # ids32[-1] is -1

    starts = range(0, n, CHUNK_ROWS)
    if threads <= 1 or len(starts) == 1:
        for s in starts:
            chunk(s)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(chunk, starts))
    return out


# The table is M values per query in three lists (2.76 GiB at RefCOCO size), so writing it
# is most of the stage once the products are fast. Measured per 100 MB on one core: Parquet's
# plain encoding of these lists costs about 120 ms (0.8 GB/s); zstd level 1 would cost more
# CPU than the disk time it saves (the ids shrink by a third, the scores by under 10%), and
# dictionaries and statistics only add work. Non-null fields (none is ever null) drop the
# definition levels: 12% less encoding. Fixed-size lists gain nothing measurable and cannot
# hold the one-shorter lists of a pool smaller than M; float16 scores cost more CPU per value
# (Parquet's float16 is a 2-byte fixed-length type) for a third fewer bytes, so they stay an
# option. Per-column codecs here name top-level columns only: the lists' leaf columns
# (`x.list.element`) are stored without compression.
NEGATIVES_FORMAT = ParquetFormat(use_dictionary=False, compression_level=1,
                                 uncompressed=("cand_image_ids", "rho_ti", "rho_ii"),
                                 statistics=("sent_id", "ref_id", "image_id"),
                                 row_group_rows=1024)
# A shard's rows go to consecutive part files of this many rows, each encoded by its own
# thread while the search goes on, so encoding uses every core (on a GPU the search takes
# milliseconds and one encoder would set the pace). A constant: the layout is part of the
# output, never of the machine.
ROWS_PER_PART = 1024


def negatives_schema(score_type: pa.DataType) -> pa.Schema:
    import pyarrow as pa

    def col(name: str, typ: pa.DataType) -> pa.Field:
        return pa.field(name, typ, nullable=False)

    def values(typ: pa.DataType) -> pa.DataType:
        return pa.list_(pa.field("item", typ, nullable=False))

    return pa.schema([
        col("sent_id", pa.int64()), col("ref_id", pa.int64()), col("image_id", pa.int64()),
        col("cand_image_ids", values(pa.int32())), col("rho_ti", values(score_type)),
        col("rho_ii", values(score_type)),
        *[col(k, pa.float32()) for k in ("ti_min", "ti_max", "ii_min", "ii_max")]])


class PartWriter(CloseOrAbort):
    """Writes one shard's table as consecutive part files of `rows_per_part` rows, named by
    consecutive indices from `first_index` (so every reader's `part-*.parquet` order is the
    row order). Each part is a background `ParquetStream`: up to `threads` encode at once,
    and when more are pending the oldest is closed first, which bounds the memory held."""

    def __init__(self, staging: Path, table: str, schema: pa.Schema, schema_version: str,
                 fmt: ParquetFormat, first_index: int, rows_per_part: int,
                 threads: int) -> None:
        self.dir = staging / table
        self.schema, self.version, self.fmt = schema, schema_version, fmt
        self.next_index = first_index
        self.rows_per_part = rows_per_part
        self.threads = max(1, threads)
        self.open: list[ParquetStream] = []
        self.room = 0  # rows the newest part can still take
        self.parts = 0

    def _new_part(self) -> ParquetStream:
        while len(self.open) >= self.threads:
            self.open.pop(0).close()
        stream = ParquetStream(self.dir / part_name(self.next_index), self.schema, self.version,
                               self.fmt, background=True)
        self.open.append(stream)
        self.next_index += 1
        self.parts += 1
        self.room = self.rows_per_part
        return stream

    def write(self, piece: pa.Table) -> None:
        start = 0
        while start < piece.num_rows:
            stream = self.open[-1] if self.room else self._new_part()
            take = min(self.room, piece.num_rows - start)
            stream.write(piece.slice(start, take))
            start += take
            self.room -= take

    def close(self) -> None:
        if not self.parts:  # an empty shard still writes its (empty) first part
            self._new_part()
        while self.open:
            self.open.pop(0).close()

    def abort(self) -> None:
        for stream in self.open:
            stream.abort()
        self.open.clear()



def _block_table(q: np.ndarray, r: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """One block's rows from `search_block` (with ids); own-image entries (idx -1, only when
    M reaches the pool size) are dropped from the lists."""
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

    def lists(values: np.ndarray, name: str) -> pa.Array:
        typ = schema.field(name).type
        return pa.ListArray.from_arrays(offsets, pa.array(values, typ.value_type), type=typ)

    ids = flat(r["ids"])
    return pa.table({
        "sent_id": pa.array(q[:, 0], pa.int64()),
        "ref_id": pa.array(q[:, 1], pa.int64()),
        "image_id": pa.array(q[:, 2], pa.int64()),
        "cand_image_ids": lists(ids, "cand_image_ids"),
        "rho_ti": lists(flat(r["rho_ti"]).astype(np_score, copy=False), "rho_ti"),
        "rho_ii": lists(flat(r["rho_ii"]).astype(np_score, copy=False), "rho_ii"),
        # the pool's extremes as rounded as the scores they scale: with float16 lists, the top
        # candidate then scales to exactly 1 and the pool's lowest to 0, as with float32
        **{k: pa.array(r[k].astype(np_score).astype(np.float32, copy=False), pa.float32())
           for k in ("ti_min", "ti_max", "ii_min", "ii_max")},
    }, schema=schema)


# Whole-block workers at most: each holds a product buffer and up to two blocks of results
# (about 170 MiB at RefCOCO size), so a many-core machine shares the rest of its cores out as
# threads within each worker instead of holding one buffer per core.
MAX_BLOCK_WORKERS = 8


def _blocks_in_order(search: Callable[[int, int, dict[str, Any]], dict[str, np.ndarray]],
                     starts: range, threads: int,
                     whole_blocks: bool) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(start, `search` result) of each block, in block order.

    On the CPU (`whole_blocks`) up to MAX_BLOCK_WORKERS threads each search whole blocks, with
    `threads` shared out between them (one each on up to 8 cores: torch's thread count is
    per thread), at most one block per worker started ahead of the one handed over. Sharing
    each block's work between all the threads instead makes every product wait for its
    slowest thread, and the part encoders and the hashes, running alongside, make one thread
    slow at every step: the products then cost a third more than they do alone. Elsewhere
    (GPU) blocks go one at a time."""
    if not whole_blocks or threads <= 1 or len(starts) <= 1:
        scratch: dict[str, Any] = {}
        for s in starts:
            yield s, search(s, threads, scratch)
        return
    import torch

    workers = min(threads, MAX_BLOCK_WORKERS)
    per_worker = threads // workers
    local = threading.local()

    def job(s: int) -> dict[str, np.ndarray]:
        if not hasattr(local, "scratch"):
            torch.set_num_threads(per_worker)  # this worker thread only (OpenMP and MKL)
            local.scratch = {}
        return search(s, per_worker, local.scratch)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="negatives-block")
    pending: deque[tuple[int, Future[dict[str, np.ndarray]]]] = deque()
    try:
        for s in starts:
            pending.append((s, pool.submit(job, s)))
            if len(pending) > workers:
                first, done = pending.popleft()
                yield first, done.result()
        while pending:
            first, done = pending.popleft()
            yield first, done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _negatives_shard(payload: dict[str, Any],
                     writer: ShardWriter[NegativesParams]) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import torch

    p = writer.params
    inputs: SearchInputs = payload["inputs"]
    t0 = time.perf_counter()
    pool_ids, pool_vecs = training_pool(inputs)
    img_ids, img_vecs = cached_embeddings(inputs.images, "image_id")
    assert inputs.texts is not None  # the stage always passes them
    txt_ids, txt_vecs = cached_embeddings(inputs.texts, "sent_id", as_stored=True)
    device = torch.device("cuda" if p.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if p.device == "auto" else p.device))
    timing = {"inputs_s": time.perf_counter() - t0, "search_s": 0.0, "write_s": 0.0}

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
    out = PartWriter(writer.staging, "negatives", schema, writer.schema_version,
                     NEGATIVES_FORMAT, writer.index, ROWS_PER_PART, os.cpu_count() or 1)

    def search(s: int, threads: int, scratch: dict[str, Any]) -> dict[str, np.ndarray]:
        images, first, inverse = np.unique(v_pos[s:s + p.block], return_index=True,
                                           return_inverse=True)
        return search_block(txt_vecs[t_pos[s:s + p.block]], img_vecs[images],
                            inverse.reshape(-1), own[s:s + p.block][first], pool_t, p.m,
                            p.rank_by, device, selection, threads=threads,
                            pool_ids=pool_ids, scratch=scratch)

    with out:
        t0 = time.perf_counter()
        for s, r in _blocks_in_order(search, range(0, len(q), p.block),
                                     torch.get_num_threads(),
                                     whole_blocks=selection == "sort" and device.type == "cpu"):
            t1 = time.perf_counter()
            out.write(_block_table(q[s:s + p.block], r, schema))
            timing["search_s"] += t1 - t0
            t0 = time.perf_counter()
            timing["write_s"] += t0 - t1
        t0 = time.perf_counter()
    timing["write_s"] += time.perf_counter() - t0  # the last parts' encoding
    return {"queries": int(len(q)), "skipped": int((~ok).sum()), "device": str(device),
            **timing}
