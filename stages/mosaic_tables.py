"""mosaic_tables: NeMo's filtered top-K negative images per training sentence.

From the negatives table (top-M candidates by rho', with both raw cosine scores), exclude the
candidates that are too relevant to be safe negatives: rho >= tau, with rho the text-to-image
score (`ti`), the image-to-image score (`ii`), or `both` (excluded when either passes its own
threshold). tau is applied on a declared scale: `minmax` (per query, (rho - min) / (max - min)
over the whole pool, own image excluded; a query whose pool scores are all equal scales to 0) or
`cosine` (raw). The first K survivors, in rank order, are the mosaic candidates. A query left
with fewer than K is reported (`k_shortfall`), never silently padded.

`k=all` keeps every survivor of the whole pool (the paper's uniform selection, K = the pool).
The survivors are then the pool minus the own image minus the images with rho >= tau; a row
stores whichever of survivors and exclusions is shorter, and the pool itself is written once
(`pool.parquet`); `pipeline.training.mosaic_candidates` declares the layout and gives
readers the set.
The exclusions are exact over the whole pool, not just the top-M that `negatives` kept: they
come from the stored candidates only when no unstored image can reach tau (the ranking score is
the filter's and the M-th stored score is already below tau, or M covers the pool); other queries
get their full score rows recomputed from the embeddings, as `negatives` computes them (rounded
to its score dtype, scaled with its pool extremes).

Positional words of the sentence restrict the quadrant of the positive (see stages.text.positional).
tau, K and relevance default to the paper's values in the data manifest. Changing them re-runs
this stage only; the expensive search in `negatives` stays cached.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from pipeline.errors import ConfigError, InputError
from pipeline.io import write_parquet
from pipeline.stage import (
    INT_MAX,
    Count,
    Device,
    ParamDomainError,
    Params,
    RunEnv,
    ShardTask,
    ShardWriter,
    Stage,
    StageContext,
    runtime_field,
)
from pipeline.training.mosaic_candidates import EXCLUDED, FROM_POOL, POOL_FILE, uniform_candidates
from pipeline.upstream import UpstreamTable
from stages.negatives import SearchInputs, cached_embeddings, training_pool
from stages.refer.manifests import load_data_manifest

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import numpy as np

HIST_BINS = 20
MIN_K = 3  # a mosaic shows 3 negative images next to the positive
TAU_RANGE = {"minmax": (0.0, 1.0), "cosine": (-1.0, 1.0)}  # the values rho takes on each scale
Tau = Annotated[float, Field(allow_inf_nan=False)] | None | Literal["auto"]


class MosaicParams(Params):
    relevance: Literal["ti", "ii", "both"] = Field("ti", description="rho used to exclude")
    tau_ti: Tau = Field(
        "auto", description="exclude rho_ti >= tau_ti (null: no filter; auto: data manifest); "
                            "in [0, 1] on the minmax scale, [-1, 1] on the cosine scale")
    tau_ii: Tau = Field(
        "auto", description="exclude rho_ii >= tau_ii (null: no filter; auto: data manifest); "
                            "in [0, 1] on the minmax scale, [-1, 1] on the cosine scale")
    scale: Literal["minmax", "cosine"] = Field("minmax", description="scale tau applies on")
    k: Annotated[int, Field(ge=MIN_K, le=INT_MAX)] | Literal["auto", "all"] = Field(
        "auto", description="negatives kept, >= 3 and <= negatives.m (auto: data manifest; "
                            "all: every survivor of the whole pool)")
    block: Count = runtime_field(256, "queries per matrix product when k=all recomputes scores")
    device: Device = runtime_field("auto", "auto (CUDA when present), cpu, cuda:N (k=all)")

    @model_validator(mode="after")
    def _tau_on_scale(self) -> MosaicParams:
        """tau outside the range of its scale filters all or nothing: a mistake, not a choice."""
        lo, hi = TAU_RANGE[self.scale]
        for key in ("tau_ti", "tau_ii"):
            tau = getattr(self, key)
            if isinstance(tau, float) and not lo <= tau <= hi:
                raise ParamDomainError(
                    key, f"a number in [{lo:g}, {hi:g}] (mosaic_tables.scale={self.scale}), "
                         "null (no filter) or auto", tau)
        return self

    def taus(self) -> dict[str, Any]:
        """`active_taus` of these params: the threshold each score is filtered at."""
        return active_taus(self.relevance, self.tau_ti, self.tau_ii)


RELEVANCE_SCORES = {"ti": ("ti",), "ii": ("ii",), "both": ("ti", "ii")}
"""The scores each `mosaic_tables.relevance` filters on."""


def active_taus(relevance: str, tau_ti: Any, tau_ii: Any) -> dict[str, Any]:
    """`{"tau_ti": ..., "tau_ii": ...}`: the threshold that applies to each score under
    `relevance` (`ti`, `ii`, or `both`, which filters on each score at its own threshold), None
    for a score the relevance does not use. The one place that says which tau a relevance uses:
    the stage, its resolved params, `report` and `calibrate` all ask it."""
    used = RELEVANCE_SCORES[relevance]
    return {"tau_ti": tau_ti if "ti" in used else None, "tau_ii": tau_ii if "ii" in used else None}


def scaled(rho: np.ndarray, lo: np.ndarray, hi: np.ndarray, scale: str) -> np.ndarray:
    """Scores on the declared scale, in float64."""
    import numpy as np

    rho = rho.astype(np.float64)
    if scale == "cosine":
        return rho
    span = hi.astype(np.float64) - lo.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (rho - lo) / span
    return np.where(span > 0, out, 0.0)


def select_negatives(
    offsets: np.ndarray,
    rho_ti: np.ndarray,
    rho_ii: np.ndarray,
    extremes: dict[str, np.ndarray],
    params: MosaicParams,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean mask over the flattened candidates (kept ones) and the kept count per query."""
    import numpy as np

    n = len(offsets) - 1
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(n), lengths)
    excluded = np.zeros(len(row), dtype=bool)
    rho = {"tau_ti": ("ti", rho_ti), "tau_ii": ("ii", rho_ii)}
    for key, tau in params.taus().items():
        if tau is not None:
            rel, scores = rho[key]
            s = scaled(scores, extremes[f"{rel}_min"][row], extremes[f"{rel}_max"][row],
                       params.scale)
            excluded |= s >= tau
    keep = ~excluded
    running = np.cumsum(keep)
    before_row = np.concatenate([[0], running])[offsets[:-1]]
    rank_in_row = running - before_row[row]
    chosen = keep & (rank_in_row <= params.k)
    kept = np.bincount(row[chosen], minlength=n)
    return chosen, kept


def pool_exclusions(
    offsets: np.ndarray,
    flat_ids: np.ndarray,
    rho_ti: np.ndarray,
    rho_ii: np.ndarray,
    extremes: dict[str, np.ndarray],
    params: MosaicParams,
    rank_by: str,
    pool_ids: np.ndarray,
    own_col: np.ndarray,
    full_rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    block: int = 256,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per query, every pool image with rho >= tau (ascending ids), exact over the whole pool,
    and which queries needed their full score rows.

    The stored candidates (`offsets`, `flat_ids`, `rho_*`: the top-M by `rank_by`, descending)
    hold all of a query's exclusions when M covers the pool, or when an unstored image cannot
    be excluded: it scores at most the last stored value on `rank_by` and (unknown) up to +inf on
    the other score, so the query is settled when that worst case passes the filter. The other
    queries get `full_rows(rows)` -> (rho_ti, rho_ii) over the whole pool (rows x pool columns);
    `own_col` is each query's pool column or -1. The filter is `select_negatives` itself, with
    K out of the way, so both paths apply one rule.
    """
    import numpy as np

    every = params.model_copy(update={"k": INT_MAX})
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    kept, _ = select_negatives(offsets, rho_ti, rho_ii, extremes, every)
    rank = rho_ti if rank_by == "ti" else rho_ii
    last = np.full(n, np.inf)
    filled = np.flatnonzero(lengths > 0)
    if len(filled):
        last[filled] = np.minimum.reduceat(rank.astype(np.float64), offsets[filled])
    worst = {"ti": np.full(n, np.inf), "ii": np.full(n, np.inf), rank_by: last}
    settled, _ = select_negatives(np.arange(n + 1), worst["ti"], worst["ii"], extremes, every)
    exact = settled | (lengths == len(pool_ids) - (own_col >= 0))

    out: list[np.ndarray] = [np.sort(flat_ids[offsets[i]:offsets[i + 1]][
        ~kept[offsets[i]:offsets[i + 1]]]) for i in range(n)]
    todo = np.flatnonzero(~exact)
    for start in range(0, len(todo), block):
        rows = todo[start:start + block]
        ti, ii = full_rows(rows)
        valid = np.ones(ti.shape, dtype=bool)
        has_own = own_col[rows] >= 0
        valid[np.flatnonzero(has_own), own_col[rows][has_own]] = False
        row_offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])
        sub = {k: v[rows] for k, v in extremes.items()}
        keep, _ = select_negatives(row_offsets, ti[valid], ii[valid], sub, every)
        ids = np.broadcast_to(pool_ids, ti.shape)[valid]
        for j, i in enumerate(rows):
            a, b = row_offsets[j], row_offsets[j + 1]
            out[i] = ids[a:b][~keep[a:b]]  # pool order: ascending
    return out, ~exact


class MosaicTables(Stage[MosaicParams]):
    """Per training sentence: the tau-filtered top-K negative images and allowed quadrants."""

    name = "mosaic_tables"
    # 2: pool.parquet, neg_from_pool and excluded_image_ids (k=all)
    # 3: and "higher" / "lowermost" are positional words (one lexicon, issue 14)
    # 4: positional words read negation ("not on the left" -> right), settle each axis on its
    # own, and let relational / gaze / body-part / verb "left" give way to a real position
    version = "4"
    inputs = ("negatives", "ingest", "embed_images")
    tables = ("mosaic",)
    libraries = ("pyarrow", "numpy", "torch")

    def upstream(self, params: Params) -> tuple[str, ...]:
        """k=all may recompute full score rows: it reads the sentence embeddings too."""
        k = getattr(params, "k", None)
        return (*self.inputs, "embed_texts") if k == "all" else self.inputs

    @classmethod
    def check_config(cls, sections: Mapping[str, Params]) -> None:
        """K above negatives.m can never be met: every query would come up short of K. (K =
        auto is resolved per dataset; the run warns when the manifest's K exceeds m.)"""
        p = sections.get(cls.config_section())
        neg = sections.get("negatives")
        m = getattr(neg, "m", None)
        if isinstance(p, MosaicParams) and isinstance(p.k, int) and isinstance(m, int) and p.k > m:
            raise ConfigError(
                f"mosaic_tables.k: must be <= negatives.m, the candidates kept per query (got "
                f"k={p.k}, m={m}); lower mosaic_tables.k or pass --set negatives.m={p.k} "
                "(or more)")

    def resolve_params(self, env: RunEnv, params: MosaicParams) -> MosaicParams:
        p = params
        manifest = load_data_manifest(env.dataset)
        defaults = manifest.defaults
        update: dict[str, Any] = {}
        if p.k == "auto":
            update["k"] = defaults.k
        for key, tau in p.taus().items():  # an unused tau is None: kept out of the key
            update[key] = defaults.tau if tau == "auto" else tau
        try:  # validated again: the manifest's values must fit the domain too
            return MosaicParams(**{**p.model_dump(), **update})
        except ValidationError as exc:
            raise InputError(
                f"data manifest {manifest.source_path}: defaults k={defaults.k}, "
                f"tau={defaults.tau} do not fit mosaic_tables (scale {p.scale}): "
                f"{exc.errors()[0]['msg']}; fix the manifest's defaults or set "
                "mosaic_tables.k and mosaic_tables.tau_ti / tau_ii explicitly") from None

    def run(self, ctx: StageContext[MosaicParams]) -> None:
        import numpy as np
        import pyarrow as pa

        p = ctx.params
        negatives = ctx.upstream_manifest("negatives")
        parts = ctx.upstream_table("negatives", "negatives").parts
        sentences = ctx.upstream_table("ingest", "sentences")
        whole = p.k == "all"
        inputs = SearchInputs(
            images=ctx.upstream_table("embed_images", "embeddings"),
            refs=ctx.upstream_table("ingest", "refs"),
            train_split=load_data_manifest(ctx.env.dataset).train_split,
            # what the shards need to settle every query over the whole pool
            texts=ctx.upstream_table("embed_texts", "embeddings") if whole else None)
        pool_ids = training_pool(inputs)[0]
        pool = {"inputs": inputs, "rank_by": negatives["params"]["rank_by"],
                "score_dtype": negatives["params"].get("score_dtype", "float32")}
        tasks = [ShardTask(int(Path(part.rel).stem.split("-")[1]),
                           {"part": part, "sentences": sentences,
                            **({"pool": pool} if whole else {})})
                 for part in parts]
        stats = ctx.run_shards(_mosaic_shard, tasks, desc="filter")
        write_parquet(pa.table({"image_id": pa.array(pool_ids, pa.int64())}),
                      ctx.tmp_dir / POOL_FILE, self.version)
        n = sum(s["queries"] for s in stats)
        short = sum(s["short"] for s in stats)
        kept_hist = np.sum([s["kept_hist"] for s in stats], axis=0).tolist() if stats else []
        ctx.record(
            queries=n, k=p.k, queries_short_of_k=short,
            share_short_of_k=round(short / n, 4) if n else 0.0,
            kept_mean=round(sum(s["kept_sum"] for s in stats) / n, 2) if n else 0.0,
            kept_min=min((s["kept_min"] for s in stats), default=0),
            kept_histogram={"bins": HIST_BINS, "range": [0, _k_range(p.k, len(pool_ids))],
                            "counts": kept_hist},
            rho_ti_histogram=_merge_hist(stats, "ti_hist"),
            rho_ii_histogram=_merge_hist(stats, "ii_hist"),
            with_positional_words=sum(s["positional"] for s in stats),
            pool_images=len(pool_ids),
            **({"rows_from_pool": sum(s["from_pool"] for s in stats),
                "queries_recomputed": sum(s["recomputed"] for s in stats)} if whole else {}),
        )
        ctx.extra.update(scale=p.scale, clip_model=negatives.get("clip_model", {}),
                         rank_by=negatives["params"]["rank_by"], m=negatives["params"]["m"])
        log = logging.getLogger(__name__)
        m = negatives["params"]["m"]
        if whole:
            if short:
                log.warning("%d of %d queries have fewer than %d images left in the whole pool "
                            "after filtering (tau is too low for this pool); see k_shortfall",
                            short, n, MIN_K)
            return
        if p.k > m:  # only with K = auto: check_config rejects an explicit K above m
            log.warning("mosaic_tables.k=%d (the data manifest's K) is above negatives.m=%d: no "
                        "query can keep K negatives; pass --set negatives.m=%d or a smaller "
                        "mosaic_tables.k", p.k, m, p.k)
        if short:
            log.warning(
                "%d of %d queries have fewer than K=%d negatives after filtering (the pool or "
                "negatives.m=%d is too small for this tau); see k_shortfall", short, n, p.k, m)


def _k_range(k: int | str, pool_size: int) -> int:
    """The most negatives a query can keep: K, or the pool with k=all."""
    return pool_size if k == "all" else int(k)


def _merge_hist(stats: list[dict[str, Any]], key: str) -> dict[str, Any]:
    import numpy as np

    counts = np.sum([s[key] for s in stats], axis=0).tolist() if stats else []
    return {"bins": HIST_BINS, "range": [-1.0, 1.0], "counts": counts,
            "of": "raw cosine of the kept negatives among negatives' top-M"}


def _tokens_by_sent(sentences: UpstreamTable) -> dict[int, list[str]]:
    from pipeline.process_cache import process_cached

    def build() -> dict[int, list[str]]:
        t = sentences.read(["sent_id", "tokens"])
        return dict(zip(t.column("sent_id").to_pylist(), t.column("tokens").to_pylist(),
                        strict=True))

    return process_cached("mosaic_tables.tokens", sentences.ident, build, max_entries=1)


def _mosaic_shard(payload: dict[str, Any], writer: ShardWriter[MosaicParams]) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa

    from stages.text.positional import quadrants_for_tokens

    p = writer.params
    neg = payload["part"].read_table()
    cand = neg.column("cand_image_ids").combine_chunks()
    offsets = cand.offsets.to_numpy()
    flat_ids = cand.values.to_numpy()
    rho_ti = neg.column("rho_ti").combine_chunks().values.to_numpy(zero_copy_only=False)
    rho_ii = neg.column("rho_ii").combine_chunks().values.to_numpy(zero_copy_only=False)
    extremes = {k: neg.column(k).to_numpy() for k in ("ti_min", "ti_max", "ii_min", "ii_max")}
    if "pool" in payload:  # k=all
        chosen, _ = select_negatives(offsets, rho_ti, rho_ii, extremes,
                                     p.model_copy(update={"k": INT_MAX}))
        lists = _whole_pool(neg, offsets, flat_ids, rho_ti, rho_ii, extremes, p, payload["pool"])
        kept, need, top = lists["kept"], MIN_K, lists["pool_size"]
    else:
        chosen, kept = select_negatives(offsets, rho_ti, rho_ii, extremes, p)
        new_offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int32)
        need = top = p.k
        lists = {"neg": pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(
                     flat_ids[chosen].astype(np.int64), pa.int64())),
                 "from_pool": np.zeros(len(kept), dtype=bool),
                 "excluded": pa.nulls(len(kept), pa.list_(pa.int64())), "recomputed": 0}

    tokens = _tokens_by_sent(payload["sentences"])
    words, quads = [], []
    for sid in neg.column("sent_id").to_pylist():
        w, q = quadrants_for_tokens(tokens.get(sid, []))
        words.append(w)
        quads.append(q)

    writer.write_table("mosaic", pa.table({
        "sent_id": neg.column("sent_id"),
        "ref_id": neg.column("ref_id"),
        "image_id": neg.column("image_id"),
        "neg_image_ids": lists["neg"],
        "k_shortfall": pa.array(np.maximum(0, need - kept).astype(np.int32), pa.int32()),
        "positional_words": pa.array(words, pa.list_(pa.string())),
        "allowed_quadrants": pa.array(quads, pa.list_(pa.int8())),
        FROM_POOL: pa.array(lists["from_pool"], pa.bool_()),
        EXCLUDED: lists["excluded"],
    }))
    bins = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    return {
        "queries": len(kept), "short": int((kept < need).sum()),
        "kept_sum": int(kept.sum()), "kept_min": int(kept.min()) if len(kept) else 0,
        "kept_hist": np.histogram(kept, bins=HIST_BINS, range=(0, top))[0].tolist(),
        "ti_hist": np.histogram(rho_ti[chosen].astype(np.float64), bins=bins)[0].tolist(),
        "ii_hist": np.histogram(rho_ii[chosen].astype(np.float64), bins=bins)[0].tolist(),
        "positional": sum(1 for w in words if w),
        "from_pool": int(lists["from_pool"].sum()), "recomputed": int(lists["recomputed"]),
    }


def _whole_pool(neg: Any, offsets: np.ndarray, flat_ids: np.ndarray, rho_ti: np.ndarray,
                rho_ii: np.ndarray, extremes: dict[str, np.ndarray], p: MosaicParams,
                pool: dict[str, Any]) -> dict[str, Any]:
    """k=all: each row's exact exclusions over the whole pool, stored as survivors or as
    exclusions, whichever list is shorter (survivors on a tie: a listed row needs no pool)."""
    import numpy as np
    import pyarrow as pa

    pool_ids = training_pool(pool["inputs"])[0]
    images = neg.column("image_id").to_numpy()
    col = np.searchsorted(pool_ids, images)
    found = col < len(pool_ids)
    found[found] = pool_ids[col[found]] == images[found]
    own_col = np.where(found, col, -1)
    rows = _FullRows(pool, neg.column("sent_id").to_numpy(), images, p.device)
    excluded, recomputed = pool_exclusions(offsets, flat_ids, rho_ti, rho_ii, extremes, p,
                                           pool["rank_by"], pool_ids, own_col, rows, p.block)
    n_excluded = np.array([len(e) for e in excluded], dtype=np.int64)
    kept = len(pool_ids) - (own_col >= 0) - n_excluded
    from_pool = kept > n_excluded
    listed = [None if fp else uniform_candidates(
        {"image_id": img, FROM_POOL: True, EXCLUDED: e}, pool_ids).tolist()
        for img, e, fp in zip(images.tolist(), excluded, from_pool.tolist(), strict=True)]
    return {"kept": kept, "pool_size": len(pool_ids), "from_pool": from_pool,
            "neg": pa.array(listed, pa.list_(pa.int64())),
            "excluded": pa.array([e.tolist() if fp else None for e, fp in zip(
                excluded, from_pool.tolist(), strict=True)], pa.list_(pa.int64())),
            "recomputed": int(recomputed.sum())}


class _FullRows:
    """Full score rows of some queries over the pool, as `negatives` computes them: float32
    products on the device (one image-to-image row per distinct image), rounded to the
    negatives table's score dtype. The embeddings load on the first call only."""

    def __init__(self, pool: dict[str, Any], sent_ids: np.ndarray, image_ids: np.ndarray,
                 device: str) -> None:
        self.pool, self.sent_ids, self.image_ids, self.device = pool, sent_ids, image_ids, device
        self._loaded: tuple[Any, ...] | None = None

    def _load(self) -> tuple[Any, ...]:
        if self._loaded is None:
            import torch

            from stages.models.loading import resolve_device

            inputs = self.pool["inputs"]
            device = resolve_device(self.device)
            images = cached_embeddings(inputs.images, "image_id")
            # as negatives holds them (float16 as stored): one cached copy for both stages
            texts = cached_embeddings(inputs.texts, "sent_id", as_stored=True)
            pool_t = torch.from_numpy(training_pool(inputs)[1]).to(device)
            self._loaded = (device, images, texts, pool_t)
        return self._loaded

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np
        import torch

        device, (img_ids, img_vecs), (txt_ids, txt_vecs), pool_t = self._load()
        t = txt_vecs[np.searchsorted(txt_ids, self.sent_ids[rows])]
        distinct, inverse = np.unique(self.image_ids[rows], return_inverse=True)
        v = img_vecs[np.searchsorted(img_ids, distinct)]
        ti = (torch.from_numpy(t).to(device).to(pool_t.dtype) @ pool_t.T).cpu().numpy()
        ii = (torch.from_numpy(v).to(device) @ pool_t.T).cpu().numpy()[inverse.reshape(-1)]
        dtype = np.float16 if self.pool["score_dtype"] == "float16" else np.float32
        return ti.astype(dtype, copy=False), ii.astype(dtype, copy=False)
