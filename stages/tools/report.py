"""One self-contained HTML report of a dataset's pipeline under the current config.

`write_report(pipe, out.html)` reads only published artifacts (nothing is built) and writes one
file with every image embedded as a base64 PNG data URI, inline CSS and no external resource:

1. the stages: state, key, rows, bytes, seconds, peak memory and the notable params (tau, K,
   CLIP model, ...);
2. histograms of rho_ti and rho_ii over every candidate of the `negatives` table, on the raw
   cosine scale and on the declared scale of `mosaic_tables` with its tau drawn;
3. mean kept candidates per query against tau for several K, computed with
   `stages.mosaic_tables.select_negatives` (the stage's own filter) over the training queries
   only (the only ones made into mosaics; `negatives.query_splits` may add others), also as
   tables;
4. hard-negative counts by kind (`hard_negatives`, else the shards' `hn_kinds`) and augment's
   per-kind report;
5. a contact sheet of training mosaics (`pipeline.training.preview.render_preview`);
6. the audit of the training material (`stages.tools.audit.run_audit`, what `nemo-pipe audit`
   prints).

A section whose stage is not built under the current config says so. The negatives table is
read one part file at a time, so memory stays at one part (8192 queries by default) however
large the dataset is. Plots use matplotlib's Agg canvas directly (imported lazily; pyplot's
global state is never touched).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import NemoError
from pipeline.io import human_bytes, output_file, read_table_dir, table_files

if TYPE_CHECKING:
    import numpy as np

    from pipeline.runner import Pipeline
    from stages.mosaic_tables import MosaicParams

log = logging.getLogger(__name__)

TAUS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
KS: tuple[int, ...] = (3, 25, 100, 200, 800)
MAX_SWEEP_QUERIES = 20000
RAW_BINS = 400  # on [-1, 1]: 0.005 wide
SCALED_BINS = 100  # on [0, 1] for the minmax scale
NOT_BUILT = "not built"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.current td, td.current { background: #fff4c2; font-weight: bold; }
.state-done { color: #1a7f37; } .state-missing, .state-unresolved { color: #b3261e; }
.state-stale { color: #9a6700; }
.audit-ok { color: #1a7f37; } .audit-finding { color: #b3261e; font-weight: bold; }
.audit-skipped { color: #555; }
.note { background: #f6f8fa; border-left: 4px solid #9a6700; padding: .5em .8em; }
.meta, .caption { color: #555; font-size: .9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
code { background: #f2f2f2; padding: 0 .2em; }
"""


# -- public API -------------------------------------------------------------------------------
def write_report(pipe: Pipeline, out_html: Path, images_dir: Path | None = None,
                 n_mosaics: int = 8, *, taus: Sequence[float] = TAUS,
                 ks: Sequence[int] | None = None,
                 max_sweep_queries: int | None = MAX_SWEEP_QUERIES) -> Path:
    """Write the report of `pipe`'s dataset under its current config to `out_html`.

    `images_dir` (the COCO train2014 folder) is needed only for the mosaic contact sheet.
    `taus` are the swept thresholds (the configured one and "off" are always added) and `ks`
    the K values of the kept-candidates curves (default `KS` plus the configured K). The
    histograms cover every candidate; the tau/K sweep runs `select_negatives` once per tau on
    at most `max_sweep_queries` queries (every n-th one; None: all of them), which keeps a
    RefCOCO-sized report at minutes, not a quarter of an hour.
    """
    out_html = Path(out_html)
    ctx = _Context(pipe)
    body = [
        f"<h1>nemo-pipe report: {_e(pipe.env.dataset)}</h1>",
        f"<p class='meta'>work dir <code>{_e(pipe.env.work_dir)}</code>; generated "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}. Everything below is read "
        "from the artifacts the current config resolves to; nothing was built.</p>",
        _section_stages(ctx),
        _section_scores_and_kept(ctx, taus, ks, max_sweep_queries),
        _section_hard_negatives(ctx),
        _section_mosaics(ctx, images_dir, n_mosaics),
        _section_audit(ctx),
    ]
    doc = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
           f"<title>nemo-pipe report: {_e(pipe.env.dataset)}</title>"
           f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    with output_file(out_html, "report", "OUT path") as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return out_html


def report_command(dataset: str, out_html: Path, work_dir: Path | None = None,
                   config: Path | None = None, sets: Sequence[str] = (),
                   data_root: Path | None = None, images: Path | None = None,
                   n_mosaics: int = 8) -> Path:
    """`nemo-pipe report --dataset D OUT.html`: open the pipeline as the CLI does, resolve the
    images dir as `nemo-pipe preview` does (an unresolvable one only drops the mosaic sheet),
    and write the report."""
    from pipeline.api import open_pipeline

    pipe = open_pipeline(dataset, work_dir, config, sets, data_root, images, progress=False)
    images_dir: Path | None = None
    try:
        from stages.ingest import data_locations
        from stages.refer.manifests import load_data_manifest

        _, images_dir = data_locations(pipe.env, load_data_manifest(dataset))
    except NemoError as exc:
        log.warning("report without the mosaic sheet: %s", str(exc).splitlines()[0])
    return write_report(pipe, Path(out_html), images_dir=images_dir, n_mosaics=n_mosaics)


# -- what is published ------------------------------------------------------------------------
@dataclass
class _Stage:
    name: str
    state: str  # done | stale | missing | unresolved
    key: str
    note: str
    dir: Path | None
    manifest: dict[str, Any] | None
    params: dict[str, Any] | None


class _Context:
    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.dataset = pipe.env.dataset
        self.rows = pipe.status()
        self.stages: dict[str, _Stage] = {}
        for row in self.rows:
            manifest, directory, params = None, None, None
            if row.state == "done":
                manifest = pipe.store.manifest(self.dataset, row.name, row.key)
                directory = pipe.store.artifact_dir(self.dataset, row.name, row.key)
                params = manifest.get("params", {})
            elif row.state != "unresolved":
                params = pipe.resolve(row.name).params.model_dump(mode="json")
            self.stages[row.name] = _Stage(row.name, row.state, row.key, row.note, directory,
                                           manifest, params)

    def built(self, name: str) -> _Stage | None:
        s = self.stages.get(name)
        return s if s is not None and s.state == "done" else None

    def not_built(self, name: str, what: str, alternative: str = "") -> str:
        """A note saying why a section is empty (`alternative`: HTML appended to it)."""
        s = self.stages.get(name)
        cmd = f"nemo-pipe run --stage {name} --dataset {self.dataset}"
        fix = f" Build it with <code>{_e(cmd)}</code>."
        if s is None:
            why, fix = f"there is no stage {name!r} in this version", ""
        elif s.state == "unresolved":
            why = f"{name} is {NOT_BUILT}: it cannot even be resolved ({s.note})"
            fix = ""
        elif s.state == "stale":
            why = (f"{name} is {NOT_BUILT} under the current config (key {s.key}; an artifact "
                   "under another key exists, built with other params or inputs)")
        else:
            why = f"{name} is {NOT_BUILT} under the current config (key {s.key})"
        return f"<p class='note'>No {_e(what)}: {_e(why)}.{fix}{alternative}</p>"

    def mosaic_params(self) -> MosaicParams | None:
        try:
            return self.pipe.resolve("mosaic_tables").params  # type: ignore[return-value]
        except NemoError:
            return None


# -- 1. stages --------------------------------------------------------------------------------
def _section_stages(ctx: _Context) -> str:
    head = ("<tr><th>stage</th><th>state</th><th>key</th><th>rows</th><th>bytes</th>"
            "<th>seconds</th><th>peak memory (MiB)</th><th>notable params</th></tr>")
    body = []
    total_s = 0.0
    for row in ctx.rows:
        s = ctx.stages[row.name]
        stats = (s.manifest or {}).get("stats", {})
        peak = stats.get("peak_rss_mb")
        total_s += row.seconds or 0.0
        state = row.state + (f" ({row.note})" if row.note else "")
        body.append(
            f"<tr><td>{_e(row.name)}</td><td class='state-{_e(row.state)}'>{_e(state)}</td>"
            f"<td><code>{_e(row.key or '-')}</code></td>"
            f"<td class='num'>{_num(row.rows)}</td><td class='num'>{human_bytes(row.bytes)}</td>"
            f"<td class='num'>{_num(row.seconds, '.2f')}</td><td class='num'>{_num(peak, '.1f')}"
            f"</td><td>{_e(_notable(s))}</td></tr>")
    done = sum(r.state == "done" for r in ctx.rows)
    return (
        "<section id='stages'><h2>1. Stages</h2>"
        f"<p>{done} of {len(ctx.rows)} stages are built under the current config; their build "
        f"time adds up to {total_s:.1f} s. Rows count every table of the artifact. Peak memory "
        "is the peak resident set size of the process that built the stage (it includes "
        "whatever that process ran before it, e.g. upstream stages of the same run). Params of "
        "an unbuilt stage are the ones the current config resolves to.</p>"
        f"<table id='stage-table'>{head}{''.join(body)}</table></section>")


def _clip(model: dict[str, Any] | None) -> str | None:
    if not model:
        return None
    name = model.get("model", "?")
    pre = model.get("pretrained")
    if pre and ("/" in str(pre) or os.sep in str(pre)):
        pre = Path(str(pre)).name
    return f"{name} ({pre})" if pre else f"{name} (random init)"


def _notable(s: _Stage) -> str:
    p = s.params or {}
    m = s.manifest or {}
    out: list[str] = []

    def add(label: str, value: Any) -> None:
        if value is not None:
            out.append(f"{label}={value}")

    name = s.name
    if name == "ingest":
        add("strict", p.get("strict"))
    elif name in ("embed_images", "embed_texts"):
        add("CLIP", _clip(m.get("model")) or _clip(p))
        add("fast_decode", p.get("fast_decode"))
    elif name == "index":
        add("kind", p.get("kind"))
    elif name == "negatives":
        add("CLIP", _clip(m.get("clip_model")))
        add("M", p.get("m"))
        add("rank_by", p.get("rank_by"))
        add("score_dtype", p.get("score_dtype"))
    elif name == "mosaic_tables":
        add("relevance", p.get("relevance"))
        add("tau_ti", p.get("tau_ti"))
        add("tau_ii", p.get("tau_ii"))
        add("scale", p.get("scale"))
        add("K", p.get("k"))
        add("CLIP", _clip(m.get("clip_model")))
    elif name == "multiview":
        add("backend", p.get("backend"))
        if p.get("backend") != "template":
            add("model", p.get("model"))
    elif name == "clusters":
        add("threshold", p.get("threshold"))
        add("CLIP", _clip(m.get("clip_model")))
    elif name == "augment":
        add("backend", p.get("backend"))
        add("kinds", len(p["kinds"]) if "kinds" in p else None)
        add("per_kind", p.get("per_kind"))
    elif name == "hard_negatives":
        add("n", p.get("n"))
        if p.get("mix"):
            add("mix", "/".join(str(v) for v in p["mix"].values()))
    elif name == "shards":
        add("with_hard_negatives", p.get("with_hard_negatives"))
        up = m.get("upstream_artifacts", {})
        mp = up.get("mosaic_tables", {}).get("params", {})
        for k in ("tau_ti", "tau_ii"):
            add(k, mp.get(k))
        add("K", mp.get("k"))
        add("CLIP", _clip(up.get("embed_images", {}).get("model")))
    return ", ".join(out) or "-"


# -- 2 and 3. scores and kept candidates ------------------------------------------------------
@dataclass
class _Scan:
    queries: int
    candidates: int
    training: int | None  # training queries (the sweep's population); None: ingest unknown
    swept: int  # queries of the kept-candidates sweep
    stride: int  # the sweep takes every stride-th query
    raw: dict[str, np.ndarray]  # rel -> counts over RAW_BINS on [-1, 1]
    declared: dict[str, np.ndarray]  # rel -> counts on the declared scale
    at_or_above_tau: dict[str, int]  # rel -> candidates excluded by that rel's own tau
    kept: dict[tuple[float | None, int], float]  # (tau, K) -> mean kept per query
    short: dict[tuple[float | None, int], float]  # (tau, K) -> share of queries with < K


def _sweep_params(mp: MosaicParams, tau: float | None) -> MosaicParams:
    from stages.mosaic_tables import active_taus

    return mp.model_copy(update=active_taus(mp.relevance, tau, tau))


def _candidate_arrays(t: Any) -> tuple[np.ndarray, dict[str, np.ndarray],
                                        dict[str, np.ndarray]]:
    """Zero-based offsets, flat rho_ti / rho_ii and the per-query extremes of a table."""
    cand = t.column("cand_image_ids").combine_chunks()
    offsets = cand.offsets.to_numpy()
    offsets = offsets - offsets[0]
    rho = {r: t.column(f"rho_{r}").combine_chunks().flatten().to_numpy(zero_copy_only=False)
           for r in ("ti", "ii")}
    ext = {k: t.column(k).to_numpy() for k in ("ti_min", "ti_max", "ii_min", "ii_max")}
    return offsets, rho, ext


def _training_ids(ctx: _Context) -> np.ndarray | None:
    """Sorted sentence ids of the training split from ingest (None when ingest is not built
    under the current config: the sweep then says it ran over every query)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.tools.calibrate import training_sentence_ids

    ingest = ctx.built("ingest")
    if ingest is None or ingest.dir is None:
        return None
    refs, sents = (pa.concat_tables([pq.read_table(p, columns=cols)
                                     for p in table_files(ingest.dir / name)])
                   for name, cols in (("refs", ["ref_id", "split"]),
                                      ("sentences", ["sent_id", "ref_id"])))
    return training_sentence_ids(refs, sents, _train_split(ctx))


def _scan_negatives(neg_dir: Path, mp: MosaicParams, taus: list[float | None],
                    ks: list[int], max_sweep_queries: int | None,
                    train_ids: np.ndarray | None = None) -> _Scan:
    """Histograms over every candidate; the kept sweep over the rows whose sent_id is in
    `train_ids` (every row when None)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.mosaic_tables import scaled, select_negatives

    parts = table_files(neg_dir)
    sweepable = []  # per part: rows of the sweep's population
    for part in parts:
        if train_ids is None:
            sweepable.append(np.arange(pq.ParquetFile(part).metadata.num_rows))
            continue
        sid = np.asarray(pq.read_table(part, columns=["sent_id"]).column("sent_id").to_numpy(),
                         np.int64)
        sweepable.append(np.flatnonzero(np.isin(sid, train_ids)))
    total = sum(len(rows) for rows in sweepable)
    stride = (max(1, -(-total // max_sweep_queries)) if max_sweep_queries else 1)
    raw_edges = np.linspace(-1.0, 1.0, RAW_BINS + 1)
    dec_edges = (raw_edges if mp.scale == "cosine"
                 else np.linspace(0.0, 1.0, SCALED_BINS + 1))
    raw = {r: np.zeros(RAW_BINS, np.int64) for r in ("ti", "ii")}
    declared = {r: np.zeros(len(dec_edges) - 1, np.int64) for r in ("ti", "ii")}
    above = {"ti": 0, "ii": 0}
    kept_sum = {(t, k): 0 for t in taus for k in ks}
    short_n = dict.fromkeys(kept_sum, 0)
    queries = candidates = swept = seen = 0
    cols = ["cand_image_ids", "rho_ti", "rho_ii", "ti_min", "ti_max", "ii_min", "ii_max"]
    for part, rows in zip(parts, sweepable, strict=True):
        t = pq.read_table(part, columns=cols)
        offsets, rho, ext = _candidate_arrays(t)
        n = len(offsets) - 1
        row = np.repeat(np.arange(n), np.diff(offsets))
        candidates += int(offsets[-1])
        # Histograms: every candidate.
        for r in ("ti", "ii"):
            raw[r] += np.histogram(np.clip(rho[r].astype(np.float64), -1.0, 1.0),
                                   bins=raw_edges)[0]
            s = scaled(rho[r], ext[f"{r}_min"][row], ext[f"{r}_max"][row], mp.scale)
            declared[r] += np.histogram(np.clip(s, dec_edges[0], dec_edges[-1]),
                                        bins=dec_edges)[0]
            tau = getattr(mp, f"tau_{r}")
            if tau is not None:
                above[r] += int((s >= tau).sum())
        # Sweep: every training query, or every stride-th one (by position in the table).
        pick = rows[(seen + np.arange(len(rows))) % stride == 0]
        if len(pick) != n:
            offsets, rho, ext = _candidate_arrays(t.take(pa.array(pick, pa.int64())))
        seen += len(rows)
        queries += n
        swept += len(offsets) - 1
        # One select_negatives call per tau with K at least every list's length: `survivors`
        # is then the number of candidates passing the filter, and the stage's rule (the first
        # K survivors in rank order) makes the count for any K exactly min(survivors, K).
        longest = int(np.diff(offsets).max()) if len(offsets) > 1 else 0
        for tau in taus:
            p = _sweep_params(mp, tau).model_copy(update={"k": max(longest, 1)})
            _, survivors = select_negatives(offsets, rho["ti"], rho["ii"], ext, p)
            for k in ks:
                kept_sum[(tau, k)] += int(np.minimum(survivors, k).sum())
                short_n[(tau, k)] += int((survivors < k).sum())
    kept = {key: (v / swept if swept else 0.0) for key, v in kept_sum.items()}
    short = {key: (v / swept if swept else 0.0) for key, v in short_n.items()}
    return _Scan(queries, candidates, None if train_ids is None else total, swept, stride, raw,
                 declared, above, kept, short)


def _section_scores_and_kept(ctx: _Context, taus: Sequence[float], ks: Sequence[int] | None,
                             max_sweep_queries: int | None) -> str:
    head2 = "<section id='scores'><h2>2. Relevance scores of the negative candidates</h2>"
    head3 = "<section id='kept'><h2>3. Kept candidates against tau and K</h2>"
    neg = ctx.built("negatives")
    mp = ctx.mosaic_params()
    if neg is None or neg.dir is None:
        note = ctx.not_built("negatives", "score histograms")
        note3 = ctx.not_built("negatives", "kept-candidates curves")
        return f"{head2}{note}</section>\n{head3}{note3}</section>"
    if mp is None:
        note = ctx.not_built("mosaic_tables", "declared scale or tau")
        return f"{head2}{note}</section>\n{head3}{note}</section>"

    current_tau = _config_tau(mp)
    sweep: list[float | None] = sorted({*map(float, taus)} | (
        {float(current_tau)} if isinstance(current_tau, float) else set()))
    sweep.append(None)
    current = {int(mp.k)} if isinstance(mp.k, int) else set()  # k=all has no single K
    k_list = sorted({int(k) for k in (ks if ks is not None else KS)} | current)
    scan = _scan_negatives(neg.dir / "negatives", mp, sweep, k_list, max_sweep_queries,
                           _training_ids(ctx))
    return (_scores_html(ctx, head2, mp, scan) + "\n"
            + _kept_html(ctx, head3, mp, scan, sweep, k_list, current_tau))


def _tau_text(mp: MosaicParams, rel: str) -> str:
    tau = getattr(mp, f"tau_{rel}")
    if tau is None:
        from stages.mosaic_tables import RELEVANCE_SCORES

        used = rel in RELEVANCE_SCORES[mp.relevance]
        return (f"tau_{rel} = off (no filter)" if used
                else f"tau_{rel} unused (relevance = {mp.relevance})")
    return f"tau_{rel} = {tau:g}"


def _scores_html(ctx: _Context, head: str, mp: MosaicParams, scan: _Scan) -> str:
    neg = ctx.stages["negatives"]
    m = neg.manifest or {}
    dtype = m.get("score_dtype", "float32")
    scale_name = "min-max per query" if mp.scale == "minmax" else "raw cosine"
    taus = "; ".join(
        _tau_text(mp, r) + (f" ({scan.at_or_above_tau[r] / max(1, scan.candidates):.1%} of the "
                            "candidates are at or above it)"
                            if getattr(mp, f"tau_{r}") is not None else "")
        for r in ("ti", "ii"))
    text = (
        f"<p>Every candidate of the <code>negatives</code> table: {scan.candidates:,} candidates "
        f"of {scan.queries:,} query sentences (top M = {m.get('params', {}).get('m', '?')} per "
        f"query, ranked by rho_{m.get('params', {}).get('rank_by', '?')}; scores stored as "
        f"{_e(dtype)}). rho_ti is the text-to-image cosine t&middot;v', rho_ii the image-to-image "
        f"cosine v&middot;v'. CLIP model: {_e(_clip(m.get('clip_model')) or '?')}.</p>"
        f"<p id='tau-used'>Threshold used by <code>mosaic_tables</code> under the current config: "
        f"relevance = {_e(mp.relevance)}, scale = {_e(mp.scale)} ({scale_name}); "
        f"{_e(taus)}. A candidate is excluded when its score on the declared scale is &ge; "
        "tau.</p>")
    raw_png = _plot_hist(scan.raw, mp, declared=False)
    dec_png = _plot_hist(scan.declared, mp, declared=True)
    return (f"{head}{text}<h3>Raw cosine</h3>{_img(raw_png, 'raw cosine histograms')}"
            f"<h3>Declared scale ({_e(mp.scale)}) with tau</h3>"
            f"{_img(dec_png, 'declared-scale histograms with tau')}</section>")


def _plot_hist(counts: dict[str, np.ndarray], mp: MosaicParams, declared: bool) -> bytes:
    import numpy as np

    fig, _canvas = _figure(10.0, 3.6)
    titles = {"ti": "text to image (rho_ti)", "ii": "image to image (rho_ii)"}
    for i, rel in enumerate(("ti", "ii")):
        ax = fig.add_subplot(1, 2, i + 1)
        c = counts[rel]
        if declared and mp.scale == "minmax":
            edges = np.linspace(0.0, 1.0, len(c) + 1)
            lo, hi = 0.0, 1.0
        else:
            edges = np.linspace(-1.0, 1.0, len(c) + 1)
            nz = np.flatnonzero(c)
            lo, hi = ((edges[nz[0]], edges[nz[-1] + 1]) if len(nz) else (-1.0, 1.0))
            pad = max(0.02, 0.05 * (hi - lo))
            lo, hi = max(-1.0, lo - pad), min(1.0, hi + pad)
        ax.stairs(c, edges, fill=True, color="#4c72b0" if rel == "ti" else "#55a868",
                  alpha=0.85)
        tau = getattr(mp, f"tau_{rel}")
        show_tau = declared or mp.scale == "cosine"
        if show_tau and tau is not None:
            lo, hi = min(lo, tau - 0.02), max(hi, tau + 0.02)
            right_half = (tau - lo) / (hi - lo) > 0.5
            ax.axvline(tau, color="#c44e52", linestyle="--", linewidth=1.8)
            ax.text(tau, 0.97, f" tau_{rel} = {tau:g} ", color="#c44e52",
                    transform=ax.get_xaxis_transform(), ha="right" if right_half else "left",
                    va="top", fontsize=9, fontweight="bold")
        elif show_tau:
            ax.text(0.02, 0.97, _tau_text(mp, rel), transform=ax.transAxes, va="top",
                    fontsize=9, color="#555")
        ax.set_xlim(lo, hi)
        ax.set_title(titles[rel], fontsize=10)
        ax.set_xlabel("score, " + ("min-max per query" if declared and mp.scale == "minmax"
                                   else "raw cosine"))
        ax.set_ylabel("candidates")
    fig.suptitle("all negative candidates, " + (f"declared scale ({mp.scale})" if declared
                                                else "raw cosine"), fontsize=11)
    return _png(fig)


def _kept_html(ctx: _Context, head: str, mp: MosaicParams, scan: _Scan,
               sweep: list[float | None], ks: list[int],
               current_tau: float | None | str) -> str:
    rel = {"ti": "rho_ti", "ii": "rho_ii",
           "both": "rho_ti and rho_ii (one tau for both; excluded when either reaches it)"}
    if current_tau == _OFF_SWEEP:
        config = (f"The current config (tau_ti = {_fmt_tau(mp.tau_ti)}, tau_ii = "
                  f"{_fmt_tau(mp.tau_ii)}, K = {mp.k}) is not a point of this sweep.")
    else:
        config = (f"The current config (tau = {_fmt_tau(current_tau)}, K = {mp.k}) is "  # type: ignore[arg-type]
                  "highlighted.")
    population = scan.queries if scan.training is None else scan.training
    which = ("queries (ingest is not built: every query of the table, training or not)"
             if scan.training is None else "training queries")
    sample = (f"Computed on {scan.swept:,} of the {population:,} {which} (every "
              f"{scan.stride}th in table order)." if scan.stride > 1
              else f"Computed on all {population:,} {which}.")
    if scan.training is not None and scan.queries > scan.training:
        sample += (f" The {scan.queries - scan.training:,} queries of other splits in the "
                   "negatives table (negatives.query_splits) are left out: no mosaic is made "
                   "of them.")
    text = (
        f"<p>Mean number of negative candidates kept per query, as <code>mosaic_tables</code> "
        f"would keep them (<code>select_negatives</code>: the first K, in rank order, whose "
        f"score is below tau), for tau applied to {rel[mp.relevance]} on the {_e(mp.scale)} "
        f"scale; <em>off</em> = no filter. {sample} {config} With <em>off</em> the curve "
        "is bounded by M and the pool size only. K values whose curves coincide share one "
        "line.</p>")
    mt = ctx.built("mosaic_tables")
    if mt is not None and mt.manifest is not None:
        kept_mean = mt.manifest.get("stats", {}).get("kept_mean")
        text += (f"<p class='meta'>The published <code>mosaic_tables</code> artifact reports a "
                 f"mean of {_num(kept_mean, '.2f')} kept per query for its tau and K.</p>")

    fig, _canvas = _figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    numeric = [t for t in sweep if t is not None]
    off_x = (max(numeric) if numeric else 1.0) + 0.1
    xs = [t if t is not None else off_x for t in sweep]
    groups: list[tuple[list[int], list[float]]] = []  # K values whose curves coincide
    for k in ks:
        ys = [scan.kept[(t, k)] for t in sweep]
        if groups and all(abs(a - b) < 1e-9 for a, b in zip(groups[-1][1], ys, strict=True)):
            groups[-1][0].append(k)
        else:
            groups.append(([k], ys))
    for group, ys in groups:
        label = "K = " + ", ".join(f"{k}" + (" (config)" if k == mp.k else "") for k in group)
        ax.plot(xs, ys, marker="o", linewidth=2.2 if mp.k in group else 1.2, label=label)
    if isinstance(current_tau, float):
        ax.axvline(current_tau, color="#c44e52", linestyle=":", linewidth=1.2)
        ax.text(current_tau, 0.2, f" tau = {current_tau:g} (config)", color="#c44e52",
                transform=ax.get_xaxis_transform(), fontsize=8, rotation=90, va="bottom")
    ax.set_xticks(xs)
    ax.set_xticklabels([_fmt_tau(t) for t in sweep], fontsize=8)
    ax.set_xlabel(f"tau on {rel[mp.relevance]}, {mp.scale} scale")
    ax.set_ylabel("mean kept candidates per query")
    top = max((scan.kept[(t, k)] for t in sweep for k in ks), default=1.0)
    ax.set_ylim(0, max(1.0, top) * 1.08)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"kept candidates per query ({scan.swept:,} queries)", fontsize=10)
    png = _png(fig)

    def table(tid: str, values: dict[tuple[float | None, int], float], fmt: str) -> str:
        rows = ["<tr><th>tau</th>" + "".join(f"<th>K = {k}</th>" for k in ks) + "</tr>"]
        for t in sweep:
            cells = []
            for k in ks:
                cur = " current" if (t == current_tau and k == mp.k) else ""
                cells.append(f"<td class='num{cur}' data-tau='{_fmt_tau(t)}' data-k='{k}'>"
                             f"{format(values[(t, k)], fmt)}</td>")
            rows.append(f"<tr><td>{_fmt_tau(t)}</td>{''.join(cells)}</tr>")
        return f"<table id='{tid}'>{''.join(rows)}</table>"

    return (f"{head}{text}{_img(png, 'kept candidates against tau and K')}"
            "<h3>Mean kept candidates per query</h3>" + table("kept-table", scan.kept, ".3f")
            + "<h3>Share of queries with fewer than K kept</h3>"
            + table("short-table", scan.short, ".3f") + "</section>")


_OFF_SWEEP = "not on the sweep"


def _config_tau(mp: MosaicParams) -> float | None | str:
    """The configured tau as a point of the sweep (None: off), or _OFF_SWEEP when relevance is
    `both` with two different thresholds (the sweep moves both together)."""
    if mp.relevance == "ti":
        return None if mp.tau_ti is None else float(mp.tau_ti)
    if mp.relevance == "ii":
        return None if mp.tau_ii is None else float(mp.tau_ii)
    if mp.tau_ti != mp.tau_ii:
        return _OFF_SWEEP
    return None if mp.tau_ti is None else float(mp.tau_ti)


def _fmt_tau(t: float | None) -> str:
    return "off" if t is None else f"{t:g}"


# -- 4. hard negatives ------------------------------------------------------------------------
def _section_hard_negatives(ctx: _Context) -> str:
    import pyarrow.parquet as pq

    out = ["<section id='hard-negatives'><h2>4. Hard negatives</h2>"]
    hn, shards = ctx.built("hard_negatives"), ctx.built("shards")
    counts: dict[str, int] = {}
    source = ""
    if hn is not None and hn.dir is not None:
        t = read_table_dir(hn.dir / "hard_negatives")
        for kinds in t.column("neg_kinds").to_pylist():
            for k in kinds:
                counts[k] = counts.get(k, 0) + 1
        source = (f"the <code>hard_negatives</code> table ({t.num_rows:,} training sentences, "
                  "column <code>neg_kinds</code>)")
    elif shards is not None and shards.dir is not None:
        split = _train_split(ctx)
        n_rows = 0
        for part in table_files(shards.dir / split):
            col = pq.read_table(part, columns=["hn_kinds"]).column("hn_kinds")
            n_rows += len(col)
            for kinds in col.to_pylist():
                for k in kinds or []:
                    counts[k] = counts.get(k, 0) + 1
        source = (f"the shards' <code>hn_kinds</code> ({_e(split)} split, {n_rows:,} rows; "
                  "the hard_negatives stage is not built, so these are the shards' own "
                  "same-image negatives)")
    if source:
        out.append(_kinds_html(counts, source))
    else:
        out.append(ctx.not_built(
            "hard_negatives", "hard-negative counts",
            " Without it, the counts come from the <code>shards</code>' <code>hn_kinds</code>, "
            "but shards is not built either."))
    out.append("<h3>augment: per-kind report</h3>")
    aug = ctx.built("augment")
    if aug is None or aug.manifest is None:
        out.append(ctx.not_built("augment", "augment report"))
    else:
        out.append(_augment_html(aug.manifest))
    out.append("</section>")
    return "".join(out)


def _train_split(ctx: _Context) -> str:
    try:
        from stages.refer.manifests import load_data_manifest

        return load_data_manifest(ctx.dataset).train_split
    except NemoError:
        return "train"


def _kinds_html(counts: dict[str, int], source: str) -> str:
    from stages.hard_negatives import SOURCES

    order = [k for k in SOURCES if k in counts]
    order += sorted((k for k in counts if k not in SOURCES), key=lambda k: (-counts[k], k))
    total = sum(counts.values())
    text = f"<p>Hard negatives by kind, from {source}: {total:,} in all.</p>"
    if not counts:
        return text + "<p class='note'>No hard negatives at all.</p>"
    fig, _canvas = _figure(7.5, 0.45 * len(order) + 1.2)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(order)))[::-1]
    colors = ["#4c72b0" if k in SOURCES else "#dd8452" for k in order]
    bars = ax.barh(ys, [counts[k] for k in order], color=colors)
    ax.bar_label(bars, labels=[f"{counts[k]:,}" for k in order], padding=3, fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(order, fontsize=9)
    ax.set_xlabel("hard negatives")
    ax.set_xlim(0, max(counts.values()) * 1.15)
    ax.set_title("hard negatives by kind (blue: retrieved sources, orange: augmented edits)",
                 fontsize=10)
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td class='num' data-kind='{_e(k)}'>{counts[k]}</td>"
        f"<td class='num'>{counts[k] / total:.1%}</td></tr>" for k in order)
    table = (f"<table id='hn-kinds'><tr><th>kind</th><th>count</th><th>share</th></tr>{rows}"
             "</table>")
    return text + _img(_png(fig), "hard negatives by kind") + table


def _augment_html(manifest: dict[str, Any]) -> str:
    report = manifest.get("stats", {}).get("report", {})
    params = manifest.get("params", {})
    if not report:
        return "<p class='note'>The augment manifest has no per-kind report.</p>"
    head = ("<tr><th>kind</th><th>count</th><th>rejected</th><th>share valid</th>"
            "<th>mean CLIP cosine to source</th><th>rejection reasons</th><th>example</th></tr>")
    rows = []
    for kind, r in report.items():
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(
            r.get("rejected_reasons", {}).items(), key=lambda kv: -kv[1])) or "-"
        example = (r.get("examples") or ["-"])[0]
        share = r.get("share_valid")
        rows.append(
            f"<tr><td>{_e(kind)}</td><td class='num' data-augment-kind='{_e(kind)}'>"
            f"{_num(r.get('count'))}</td><td class='num'>{_num(r.get('rejected'))}</td>"
            f"<td class='num'>{'-' if share is None else f'{share:.1%}'}</td>"
            f"<td class='num'>{_num(r.get('mean_cosine_to_source'), '.3f')}</td>"
            f"<td>{_e(reasons)}</td><td>{_e(example)}</td></tr>")
    return (f"<p>Distractors per kind (backend {_e(params.get('backend', '?'))}, "
            f"{_e(params.get('per_kind', '?'))} per kind per sentence, splits "
            f"{_e(', '.join(params.get('splits', [])))}).</p>"
            f"<table id='augment-report'>{head}{''.join(rows)}</table>")


# -- 5. mosaics -------------------------------------------------------------------------------
def _section_mosaics(ctx: _Context, images_dir: Path | None, n: int) -> str:
    head = "<section id='mosaics'><h2>5. A sample of training mosaics</h2>"
    shards = ctx.built("shards")
    if shards is None or shards.dir is None:
        return head + ctx.not_built("shards", "mosaic sample") + "</section>"
    if images_dir is None:
        return (head + "<p class='note'>No mosaic sample: no images dir was given (pass "
                "<code>--images DIR</code>, the COCO train2014 folder, or set "
                "<code>NEMO_IMAGES</code>).</p></section>")
    from pipeline.training.preview import render_preview

    split = _train_split(ctx)
    with tempfile.TemporaryDirectory(prefix="nemo-report-") as tmp:
        try:
            png = render_preview(shards.dir, Path(images_dir), Path(tmp) / "sheet.png",
                                 split=split, n=n).read_bytes()
        except (ValueError, FileNotFoundError, OSError) as exc:
            return (head + f"<p class='note'>No mosaic sample: {_e(exc)}</p></section>")
    text = (f"<p class='caption'>{n} samples of the {_e(split)} split, spread evenly, drawn as "
            "training draws them with gamma = 1: the target tinted cyan and outlined green, the "
            "positive's quadrant framed yellow, the sentence (+) and its first hard negatives "
            "(-, with their kinds) below (the same sheet as <code>nemo-pipe preview</code>).</p>")
    return head + text + _img(png, "contact sheet of training mosaics") + "</section>"


# -- 6. audit ----------------------------------------------------------------------------------
def _section_audit(ctx: _Context) -> str:
    """The table `nemo-pipe audit` prints, from the same function."""
    from stages.tools.audit import check_detail, example_text, run_audit

    head = "<section id='audit'><h2>6. Audit of the training material</h2>"
    try:
        result = run_audit(ctx.pipe, train_split=_train_split(ctx))
    except NemoError as exc:
        return head + f"<p class='note'>No audit: {_e(exc)}</p></section>"
    verdict = (f"{result.findings} check(s) with findings: this training material should not "
               "be used as it is." if result.findings else "No findings.")
    text = ("<p>The published <code>mosaic</code>, <code>hard_negatives</code> and training "
            "shards checked against ingest's refs and sentences, independently of the stages' "
            f"code (<code>nemo-pipe audit</code>). {_e(verdict)}</p>")
    rows = ["<tr><th>check</th><th>status</th><th>count</th><th>rows</th><th>detail</th>"
            "<th>examples</th></tr>"]
    for c in result.checks:
        examples = "<br>".join(_e(example_text(x)) for x in c.examples[:3]) or "-"
        rows.append(
            f"<tr data-check='{_e(c.name)}'><td>{_e(c.name)}<br><span class='caption'>"
            f"{_e(c.description)}</span></td><td class='audit-{_e(c.status)}'>{_e(c.status)}"
            f"</td><td class='num' data-count='{c.count}'>{c.count:,}</td>"
            f"<td class='num'>{c.rows:,}</td><td>{_e(check_detail(c))}</td>"
            f"<td>{examples}</td></tr>")
    return head + text + f"<table id='audit-table'>{''.join(rows)}</table></section>"


# -- helpers ----------------------------------------------------------------------------------
def _figure(w: float, h: float) -> tuple[Any, Any]:
    """A figure on its own Agg canvas: no pyplot, no global backend switch, nothing to leak."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    return fig, FigureCanvasAgg(fig)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        fig.clear()  # the figure is closed: its artists are freed with it
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<p><img src=\"data:image/png;base64,{data}\" alt=\"{_e(alt)}\"></p>"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | int | None, fmt: str = ",") -> str:
    if value is None:
        return "-"
    return format(value, fmt)


