"""mosaic_tables: NeMo's filtered top-K negative images per training sentence.

From the negatives table (top-M candidates by rho', with both raw cosine scores), exclude the
candidates that are too relevant to be safe negatives: rho >= tau, with rho the text-to-image
score (`ti`), the image-to-image score (`ii`), or `both` (excluded when either passes its own
threshold). tau is applied on a declared scale: `minmax` (per query, (rho - min) / (max - min)
over the whole pool, own image excluded; a query whose pool scores are all equal scales to 0) or
`cosine` (raw). The first K survivors, in rank order, are the mosaic candidates. A query left
with fewer than K is reported (`k_shortfall`), never silently padded.

Positional words of the sentence restrict the quadrant of the positive (see stages.positional).
tau, K and relevance default to the paper's values in the data manifest. Changing them re-runs
this stage only; the expensive search in `negatives` stays cached.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from pipeline.context import ShardTask, ShardWriter, StageContext
from pipeline.errors import ConfigError, InputError
from pipeline.stage import INT_MAX, ParamDomainError, Params, RunEnv, Stage
from pipeline.upstream import UpstreamTable
from stages.datasets import load_data_manifest

if TYPE_CHECKING:
    from collections.abc import Mapping

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
    k: Annotated[int, Field(ge=MIN_K, le=INT_MAX)] | Literal["auto"] = Field(
        "auto", description="negatives kept, >= 3 and <= negatives.m (auto: data manifest)")

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
    if params.relevance in ("ti", "both") and params.tau_ti is not None:
        s = scaled(rho_ti, extremes["ti_min"][row], extremes["ti_max"][row], params.scale)
        excluded |= s >= params.tau_ti
    if params.relevance in ("ii", "both") and params.tau_ii is not None:
        s = scaled(rho_ii, extremes["ii_min"][row], extremes["ii_max"][row], params.scale)
        excluded |= s >= params.tau_ii
    keep = ~excluded
    running = np.cumsum(keep)
    before_row = np.concatenate([[0], running])[offsets[:-1]]
    rank_in_row = running - before_row[row]
    chosen = keep & (rank_in_row <= params.k)
    kept = np.bincount(row[chosen], minlength=n)
    return chosen, kept


class MosaicTables(Stage):
    """Per training sentence: the tau-filtered top-K negative images and allowed quadrants."""

    name = "mosaic_tables"
    version = "1"
    inputs = ("negatives", "ingest")
    params_model = MosaicParams
    tables = ("mosaic",)
    libraries = ("pyarrow", "numpy")

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

    def resolve_params(self, env: RunEnv, params: Params) -> Params:
        p: MosaicParams = params  # type: ignore[assignment]
        manifest = load_data_manifest(env.dataset)
        defaults = manifest.defaults
        update: dict[str, Any] = {}
        if p.k == "auto":
            update["k"] = defaults.k
        for rel, key in (("ti", "tau_ti"), ("ii", "tau_ii")):
            if p.relevance not in (rel, "both"):
                update[key] = None  # unused: keep it out of the key
            elif getattr(p, key) == "auto":
                update[key] = defaults.tau
        try:  # validated again: the manifest's values must fit the domain too
            return MosaicParams(**{**p.model_dump(), **update})
        except ValidationError as exc:
            raise InputError(
                f"data manifest {manifest.source_path}: defaults k={defaults.k}, "
                f"tau={defaults.tau} do not fit mosaic_tables (scale {p.scale}): "
                f"{exc.errors()[0]['msg']}; fix the manifest's defaults or set "
                "mosaic_tables.k and mosaic_tables.tau_ti / tau_ii explicitly") from None

    def run(self, ctx: StageContext) -> None:
        import numpy as np

        p: MosaicParams = ctx.params  # type: ignore[assignment]
        parts = ctx.upstream_table("negatives", "negatives").parts
        sentences = ctx.upstream_table("ingest", "sentences")
        tasks = [ShardTask(int(Path(part.rel).stem.split("-")[1]),
                           {"part": part, "sentences": sentences, "params": p.model_dump()})
                 for part in parts]
        stats = ctx.run_shards(_mosaic_shard, tasks, desc="filter")
        n = sum(s["queries"] for s in stats)
        short = sum(s["short"] for s in stats)
        kept_hist = np.sum([s["kept_hist"] for s in stats], axis=0).tolist() if stats else []
        ctx.record(
            queries=n, k=p.k, queries_short_of_k=short,
            share_short_of_k=round(short / n, 4) if n else 0.0,
            kept_mean=round(sum(s["kept_sum"] for s in stats) / n, 2) if n else 0.0,
            kept_min=min((s["kept_min"] for s in stats), default=0),
            kept_histogram={"bins": HIST_BINS, "range": [0, p.k], "counts": kept_hist},
            rho_ti_histogram=_merge_hist(stats, "ti_hist"),
            rho_ii_histogram=_merge_hist(stats, "ii_hist"),
            with_positional_words=sum(s["positional"] for s in stats),
        )
        negatives = ctx.upstream_manifest("negatives")
        ctx.extra.update(scale=p.scale, clip_model=negatives.get("clip_model", {}),
                         rank_by=negatives["params"]["rank_by"], m=negatives["params"]["m"])
        log = logging.getLogger(__name__)
        m = negatives["params"]["m"]
        if p.k > m:  # only with K = auto: check_config rejects an explicit K above m
            log.warning("mosaic_tables.k=%d (the data manifest's K) is above negatives.m=%d: no "
                        "query can keep K negatives; pass --set negatives.m=%d or a smaller "
                        "mosaic_tables.k", p.k, m, p.k)
        if short:
            log.warning(
                "%d of %d queries have fewer than K=%d negatives after filtering (the pool or "
                "negatives.m=%d is too small for this tau); see k_shortfall", short, n, p.k, m)


def _merge_hist(stats: list[dict[str, Any]], key: str) -> dict[str, Any]:
    import numpy as np

    counts = np.sum([s[key] for s in stats], axis=0).tolist() if stats else []
    return {"bins": HIST_BINS, "range": [-1.0, 1.0], "counts": counts,
            "of": "raw cosine of the kept negatives"}


def _tokens_by_sent(sentences: UpstreamTable) -> dict[int, list[str]]:
    from pipeline.process_cache import process_cached

    def build() -> dict[int, list[str]]:
        t = sentences.read(["sent_id", "tokens"])
        return dict(zip(t.column("sent_id").to_pylist(), t.column("tokens").to_pylist(),
                        strict=True))

    return process_cached("mosaic_tables.tokens", sentences.ident, build, max_entries=1)


def _mosaic_shard(payload: dict[str, Any], writer: ShardWriter) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa

    from stages.positional import quadrants_for_tokens

    p = MosaicParams(**payload["params"])
    neg = payload["part"].read_table()
    cand = neg.column("cand_image_ids").combine_chunks()
    offsets = cand.offsets.to_numpy()
    flat_ids = cand.values.to_numpy()
    rho_ti = neg.column("rho_ti").combine_chunks().values.to_numpy(zero_copy_only=False)
    rho_ii = neg.column("rho_ii").combine_chunks().values.to_numpy(zero_copy_only=False)
    extremes = {k: neg.column(k).to_numpy() for k in ("ti_min", "ti_max", "ii_min", "ii_max")}
    chosen, kept = select_negatives(offsets, rho_ti, rho_ii, extremes, p)
    new_offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int32)

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
        "neg_image_ids": pa.ListArray.from_arrays(
            pa.array(new_offsets), pa.array(flat_ids[chosen].astype(np.int64), pa.int64())),
        "k_shortfall": pa.array(np.maximum(0, p.k - kept).astype(np.int32), pa.int32()),
        "positional_words": pa.array(words, pa.list_(pa.string())),
        "allowed_quadrants": pa.array(quads, pa.list_(pa.int8())),
    }))
    bins = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    return {
        "queries": len(kept), "short": int((kept < p.k).sum()),
        "kept_sum": int(kept.sum()), "kept_min": int(kept.min()) if len(kept) else 0,
        "kept_hist": np.histogram(kept, bins=HIST_BINS, range=(0, p.k))[0].tolist(),
        "ti_hist": np.histogram(rho_ti[chosen].astype(np.float64), bins=bins)[0].tolist(),
        "ii_hist": np.histogram(rho_ii[chosen].astype(np.float64), bins=bins)[0].tolist(),
        "positional": sum(1 for w in words if w),
    }
