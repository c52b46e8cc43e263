"""shards: everything a trainer needs, one row per sentence, Parquet per split.

Joins ingest (text, image, target mask), mosaic_tables (the K negative images and allowed
quadrants, training split only) and hard negatives into `<split>/part-*.parquet` with small row
groups for random access, plus an `images` table (id -> file, size) for the positives and
negatives and a `pool` table (mosaic_tables' `pool.parquet`: the training images random mosaics
draw from). A `mosaic_tables.k=all` row keeps its layout (`neg_from_pool`, `excluded_image_ids`:
the reader gets its candidates from `uniform_candidates(row, pool)`). Evaluation splits pass
through unaugmented. The manifest carries a schema version and the key and params of every
upstream artifact (tau, K, CLIP model, ...), so a trainer can log exactly what it trained on;
`pipeline.training.dataset.NemoDataset` reads these shards. The layout (tables, columns, schema
versions) is declared once, in `pipeline.training.schema`.

Hard negatives (training split only; evaluation rows have none): with
`shards.with_hard_negatives` they come from the hard_negatives stage (ranked, labelled by source
or edit kind, scored by cosine to the cluster centre); otherwise, with
`shards.same_image_negatives`, the sentences of the other referents in the same image (kind
`same_image`, no score), which need only ingest. Those follow the rules hard_negatives follows
(`stages.text.negative_rules`): training-split sentences only (an evaluation referent on a
training image is never a negative), never a text equal (normalised) to a sentence of the query's
referent, never a repeated text; the drops are counted per reason in the manifest.

The hard-negative lists keep their first `shards.hard_negative_pool` entries (the best ranked),
with the source sentence id of each (`hn_source_ids`: the retrieved sentence, the edited query
sentence for `augmented`); `NemoDataset(n_hard_negatives=N)` draws N of that pool afresh each
epoch.

Multi-view expressions (`shards.with_views`, off by default): the training rows carry their
referent's valid views of the `multiview` stage (`view_names`, `view_texts`, in view order;
`stages.refer.views.valid_views`: no failed instance, no blank or repeated text), the
expressions `NemoDataset(expressions="views" | "both")` draws a sentence from. A view is then a
positive of the row, so a hard negative equal (normalised) to one of its views is dropped before
the pool is cut (counted as `negatives_equal_to_a_view`). Evaluation rows never carry views.

Thumbnails (`shards.thumbnails`, on by default): small JPEG copies of the training images, from
which the reader fills mosaic cells (a mosaic then costs about what a single image does instead
of four full decodes). They are the `thumbnails` stage's artifact, an upstream of this one, so a
tau or K sweep never re-encodes them: the manifest's `thumbnails` field records its key, its
place relative to this directory and the size and sha256 of each of its files (every one
re-hashed here before it is referenced), and the reader finds the packs through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.io import ParquetFormat, read_json
from pipeline.stage import Count, Params, ShardTask, ShardWriter, Stage, StageContext
from pipeline.training.schema import (
    ALL_QUADRANTS,
    EXCLUDED,
    FROM_POOL,
    IMAGE_COLUMNS,
    IMAGES_TABLE,
    POOL_TABLE,
    ROW_COLUMNS,
    SCHEMA_VERSION_FIELD,
    SHARDS_SCHEMA_VERSION,
    SHARDS_STAGE,
    SPLIT_TABLES,
    THUMBNAILS_FIELD,
    THUMBNAILS_STAGE,
    UPSTREAM_ARTIFACTS_FIELD,
    WITH_VIEWS_FIELD,
    ThumbnailsRef,
    pool_schema,
    row_schema,
)
from pipeline.upstream import UpstreamTable
from stages.refer.files import other_referent_sentences
from stages.refer.manifests import load_data_manifest
from stages.refer.views import valid_views
from stages.text.negative_rules import DROP_REASONS, TextRules
from stages.text.normalise import normalise_sentence
from stages.text.positional import quadrants_for_tokens, tokenize


class ShardsParams(Params):
    with_hard_negatives: bool = Field(False, description="include the hard_negatives table")
    same_image_negatives: bool = Field(
        True, description="without hard_negatives: other referents' sentences of the same image")
    rows_per_part: Count = Field(16384, description="sentences per Parquet part")
    rows_per_group: Count = Field(256, description="rows per row group (random access)")
    thumbnails: bool = Field(
        True, description="use the thumbnails stage's small JPEG copies of the training images "
                          "for mosaic cells (an upstream, referenced from the manifest)")
    hard_negative_pool: Count = Field(
        16, description="hard negatives kept per sentence (the best ranked first); the reader "
                        "draws n_hard_negatives of them afresh each epoch")
    with_views: bool = Field(
        False, description="store each training referent's valid multi-view expressions (the "
                           "multiview stage's views) for NemoDataset(expressions=...)")


class Shards(Stage[ShardsParams]):
    """Training shards per split: text, image, target mask, mosaic negatives, hard negatives."""

    name = SHARDS_STAGE
    version = SHARDS_SCHEMA_VERSION
    inputs = ("ingest", "mosaic_tables")
    tables = (IMAGES_TABLE, POOL_TABLE, *SPLIT_TABLES)
    optional_tables = SPLIT_TABLES  # each dataset has its own splits
    libraries = ("pyarrow", "pycocotools", "numpy")

    def upstream(self, params: ShardsParams) -> tuple[str, ...]:
        p = params
        return (*self.inputs, *((THUMBNAILS_STAGE,) if p.thumbnails else ()),
                *(("hard_negatives",) if p.with_hard_negatives else ()),
                *(("multiview",) if p.with_views else ()))

    def run(self, ctx: StageContext[ShardsParams]) -> None:
        p = ctx.params
        manifest = load_data_manifest(ctx.env.dataset)
        refs = ctx.read_table("ingest", "refs").select(["ref_id", "split"])
        split_of = dict(zip(refs.column("ref_id").to_pylist(), refs.column("split").to_pylist(),
                            strict=True))
        sents = ctx.read_table("ingest", "sentences").select(["sent_id", "ref_id"])
        by_split: dict[str, list[int]] = {}
        for sid, rid in zip(sents.column("sent_id").to_pylist(),
                            sents.column("ref_id").to_pylist(), strict=True):
            by_split.setdefault(split_of[rid], []).append(sid)
        inputs = RowInputs(
            **{t: ctx.upstream_table("ingest", t)
               for t in ("refs", "sentences", "objects", "images")},
            mosaic=ctx.upstream_table("mosaic_tables", "mosaic"),
            train_split=manifest.train_split,
            hard_negatives=(ctx.upstream_table("hard_negatives", "hard_negatives")
                            if p.with_hard_negatives else None),
            views=ctx.upstream_table("multiview", "views") if p.with_views else None,
            view_failures=(ctx.upstream_table("multiview", "failures")
                           if p.with_views else None))
        tasks = []
        for split in manifest.splits:
            ids = sorted(by_split.get(split, []))
            for start in range(0, len(ids), p.rows_per_part):
                tasks.append(ShardTask(len(tasks), {
                    "split": split, "sent_ids": ids[start:start + p.rows_per_part],
                    "train": split == manifest.train_split, "inputs": inputs}))
        stats = ctx.run_shards(_rows_shard, tasks, desc="join")
        images = ctx.read_table("ingest", "images").select(list(IMAGE_COLUMNS))
        ctx.write_table(IMAGES_TABLE, images)
        ctx.write_table(POOL_TABLE, mosaic_pool(ctx))
        ctx.extra[SCHEMA_VERSION_FIELD] = SHARDS_SCHEMA_VERSION
        ctx.extra[UPSTREAM_ARTIFACTS_FIELD] = upstream_artifacts(ctx)
        ctx.extra[WITH_VIEWS_FIELD] = p.with_views
        if p.thumbnails:
            ctx.extra[THUMBNAILS_FIELD] = thumbnails_reference(ctx).to_json()
        rows: dict[str, int] = {}
        for task, s in zip(tasks, stats, strict=True):
            rows[task.payload["split"]] = rows.get(task.payload["split"], 0) + s["rows"]
        ctx.record(rows_per_split=rows,
                   with_hard_negatives_share=round(
                       sum(s["with_hn"] for s in stats) / max(1, sum(rows.values())), 4))
        if p.with_views:
            train_rows = rows.get(manifest.train_split, 0)
            per_view: dict[str, int] = {}
            for s in stats:
                for view, n in s["views_per_name"].items():
                    per_view[view] = per_view.get(view, 0) + n
            ctx.record(training_rows_with_views=sum(s["with_views"] for s in stats),
                       training_rows_without_views=train_rows - sum(
                           s["with_views"] for s in stats),
                       rows_per_view_name=dict(sorted(per_view.items())),
                       negatives_equal_to_a_view=sum(s["views_as_negatives"] for s in stats))
        if not p.with_hard_negatives and p.same_image_negatives:
            ctx.record(same_image_dropped={r: sum(s.get("dropped", {}).get(r, 0) for s in stats)
                                           for r in DROP_REASONS})


def upstream_artifacts(ctx: StageContext[ShardsParams]) -> dict[str, dict[str, Any]]:
    """Key, version and params of every artifact this one was built from, transitively."""
    out: dict[str, dict[str, Any]] = {}
    todo = list(ctx.upstream_keys.items())
    while todo:
        stage, key = todo.pop()
        if stage in out:
            continue
        m = read_json(ctx.store.artifact_dir(ctx.env.dataset, stage, key) / "_manifest.json")
        out[stage] = {"key": key, "version": m["version"], "params": m["params"],
                      **({"model": m["model"]} if "model" in m else {})}
        todo.extend(m.get("upstream", {}).items())
    return dict(sorted(out.items()))


def mosaic_pool(ctx: StageContext[ShardsParams]) -> Any:
    """mosaic_tables' pool (`pool.parquet`, verified against its manifest) as the pool table:
    the images random mosaics draw from and k=all rows stored as exclusions are read against."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.training.mosaic_candidates import POOL_FILE

    data = ctx.upstream_file("mosaic_tables", POOL_FILE).read_bytes()
    ids = pq.read_table(pa.BufferReader(data), columns=["image_id"]).column("image_id")
    return pa.table({"image_id": ids.cast(pa.int64())}, schema=pool_schema())


def thumbnails_reference(ctx: StageContext) -> ThumbnailsRef:
    """The record of the thumbnails artifact these shards use: its key, its directory relative
    to this artifact's, and every file's size and sha256. Each file is re-hashed against its
    manifest first: the shards publish a reference to those bytes, so they are checked like any
    upstream bytes a stage consumes (a mismatch raises UpstreamCorrupt, and the runner rebuilds
    the thumbnails)."""
    manifest = ctx.upstream_manifest(THUMBNAILS_STAGE)
    files = {rel: {"bytes": f["bytes"], "sha256": f["sha256"]}
             for rel, f in sorted(manifest["files"].items())}
    for rel in files:
        ctx.upstream_file(THUMBNAILS_STAGE, rel).read_bytes()
    here = ctx.store.artifact_dir(ctx.env.dataset, ctx.stage.name, ctx.key)
    where = Path(os.path.relpath(ctx.upstream_dir(THUMBNAILS_STAGE), here)).as_posix()
    return ThumbnailsRef(ctx.upstream_keys[THUMBNAILS_STAGE], str(manifest["version"]), where,
                         files)


@dataclass(frozen=True)
class RowInputs:
    """The upstream tables a rows shard joins (picklable: paths and content hashes); the
    optional ones are there only when their `shards.with_*` switch is on."""

    refs: UpstreamTable
    sentences: UpstreamTable
    objects: UpstreamTable
    images: UpstreamTable
    mosaic: UpstreamTable
    train_split: str
    hard_negatives: UpstreamTable | None = None
    views: UpstreamTable | None = None
    view_failures: UpstreamTable | None = None


def _lookups(inputs: RowInputs) -> dict[str, Any]:
    """Per-process lookups from the upstream tables (built in the worker, never pickled)."""
    from pipeline.process_cache import process_cached

    # UpstreamTable's str: its dir and content hash
    key = "|".join(str(getattr(inputs, f.name)) for f in fields(inputs))
    return process_cached("shards.lookups", key, lambda: _read_lookups(inputs), max_entries=1)


def _read_lookups(inputs: RowInputs) -> dict[str, Any]:
    refs = inputs.refs.read().to_pylist()
    sents = inputs.sentences.read().select(["sent_id", "ref_id", "sent", "raw"])
    objects = inputs.objects.read().select(["ann_id", "rle"])
    images = inputs.images.read().select(["image_id", "file_name", "width",
                                          "height"]).to_pylist()
    mosaic = inputs.mosaic.read()
    ref_by_id = {r["ref_id"]: r for r in refs}
    sent_rows = {s: (r, t) for s, r, t in zip(sents.column("sent_id").to_pylist(),
                                               sents.column("ref_id").to_pylist(),
                                               sents.column("sent").to_pylist(), strict=True)}
    raw = dict(zip(sents.column("sent_id").to_pylist(), sents.column("raw").to_pylist(),
                   strict=True))
    sents_of_ref: dict[int, list[int]] = {}
    for sid, (rid, _) in sorted(sent_rows.items()):
        sents_of_ref.setdefault(rid, []).append(sid)
    refs_of_image: dict[int, list[int]] = {}
    for r in refs:
        refs_of_image.setdefault(r["image_id"], []).append(r["ref_id"])
    hard = {}
    if inputs.hard_negatives is not None:
        hard = {r["sent_id"]: r for r in inputs.hard_negatives.read().to_pylist()}
    views: dict[int, list[tuple[str, str]]] = {}
    if inputs.views is not None and inputs.view_failures is not None:
        from stages.multiview import VIEWS

        views = valid_views(inputs.views.read().select(
                                ["ref_id", "image_id", "ann_id", "view", "text"]).to_pylist(),
                            inputs.view_failures.read().select(
                                ["image_id", "ann_ids"]).to_pylist(), VIEWS)
    return {
        "train_split": inputs.train_split,
        "hard": hard,
        "views": views,
        "ref": ref_by_id,
        "sent": sent_rows,
        "raw": raw,
        "sents_of_ref": sents_of_ref,
        "refs_of_image": refs_of_image,
        "rle": dict(zip(objects.column("ann_id").to_pylist(), objects.column("rle").to_pylist(),
                        strict=True)),
        "image": {i["image_id"]: i for i in images},
        "mosaic": {row["sent_id"]: row for row in mosaic.select(
            ["sent_id", "neg_image_ids", "k_shortfall", "positional_words",
             "allowed_quadrants", FROM_POOL, EXCLUDED]).to_pylist()},
    }


def union_rle(rles: list[dict[str, Any]], height: int, width: int) -> dict[str, Any]:
    """Compressed RLE of the union of target masks; all-zero for no target."""
    from pycocotools import mask as mask_utils

    if not rles:
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": [height * width]},
                                     height, width)
    elif len(rles) == 1:
        return {"size": list(rles[0]["size"]), "counts": rles[0]["counts"]}
    else:
        rle = mask_utils.merge([{"size": r["size"], "counts": r["counts"].encode()}
                                for r in rles], intersect=False)
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.decode() if isinstance(counts, bytes) else counts}


def _rules(look: dict[str, Any]) -> TextRules:
    """The negative-text rules with the training split as the only source (built on first use:
    shards with hard_negatives never need them)."""
    if "rules" not in look:
        look["rules"] = TextRules(look["ref"], {s: r for s, (r, _) in look["sent"].items()},
                                  {s: t for s, (_, t) in look["sent"].items()},
                                  [look["train_split"]])
    return look["rules"]


def same_image_negatives(look: dict[str, Any], ref: dict[str, Any],
                         drops: dict[str, int] | None = None) -> tuple[list[str], list[int]]:
    """Texts and sent ids of the image's other referents whose targets do not overlap this
    one's, by ref id then sent id, minus what `stages.text.negative_rules` drops
    (training-split sentences only, no positive, no repeat); each drop counted in `drops`."""
    ids = other_referent_sentences(ref, look["ref"], look["refs_of_image"], look["sents_of_ref"])
    rules = _rules(look)
    kept = rules.keep_sentences(ids, rules.positives(ref["ref_id"]), drops)
    return [look["sent"][s][1] for s in kept], [int(s) for s in kept]


def _rows_shard(payload: dict[str, Any], writer: ShardWriter[ShardsParams]) -> dict[str, Any]:
    import pyarrow as pa

    p = writer.params
    look = _lookups(payload["inputs"])
    rows: dict[str, list[Any]] = {c: [] for c in ROW_COLUMNS}
    with_hn = with_views = views_as_negatives = 0
    views_per_name: dict[str, int] = {}
    dropped: dict[str, int] = {}
    pool = p.hard_negative_pool
    for sid in payload["sent_ids"]:
        rid, text = look["sent"][sid]
        ref = look["ref"][rid]
        img = look["image"][ref["image_id"]]
        mosaic = look["mosaic"].get(sid) if payload["train"] else None
        if p.with_hard_negatives:
            h = look["hard"].get(sid) if payload["train"] else None
            hn, kinds, scores, sources = ((h["neg_texts"], h["neg_kinds"], h["neg_scores"],
                                           h["neg_source_ids"]) if h else ([], [], [], []))
        else:  # evaluation rows pass through unaugmented
            hn, sources = (same_image_negatives(look, ref, dropped)
                           if p.same_image_negatives and payload["train"] else ([], []))
            kinds, scores = ["same_image"] * len(hn), [float("nan")] * len(hn)
        views = look["views"].get(rid, []) if payload["train"] else []
        if views and hn:  # a view is a positive of this row: never also its negative
            shown = {normalise_sentence(t) for _, t in views}
            keep = [i for i, t in enumerate(hn) if normalise_sentence(t) not in shown]
            views_as_negatives += len(hn) - len(keep)
            hn, kinds, scores, sources = ([xs[i] for i in keep]
                                          for xs in (hn, kinds, scores, sources))
        hn, kinds, scores, sources = hn[:pool], kinds[:pool], scores[:pool], sources[:pool]
        with_hn += bool(hn)
        with_views += bool(views)
        for view, _ in views:
            views_per_name[view] = views_per_name.get(view, 0) + 1
        for col, value in (
            ("sent_id", sid), ("ref_id", rid), ("image_id", ref["image_id"]),
            ("split", payload["split"]), ("sent", text), ("category_id", ref["category_id"]),
            ("ann_ids", ref["ann_ids"]), ("no_target", not ref["ann_ids"]),
            ("mask_rle", union_rle([look["rle"][a] for a in ref["ann_ids"]], img["height"],
                                   img["width"])),
            ("neg_image_ids", mosaic["neg_image_ids"] if mosaic else []),
            ("k_shortfall", mosaic["k_shortfall"] if mosaic else 0),
            ("positional_words", mosaic["positional_words"] if mosaic else []),
            ("allowed_quadrants", mosaic["allowed_quadrants"] if mosaic else list(ALL_QUADRANTS)),
            ("hn_texts", hn), ("hn_kinds", kinds), ("hn_scores", scores),
            ("hn_source_ids", sources), ("view_names", [v for v, _ in views]),
            ("view_texts", [t for _, t in views]),
            (FROM_POOL, bool(mosaic[FROM_POOL]) if mosaic else False),
            (EXCLUDED, mosaic[EXCLUDED] if mosaic else None),
            # a spatial view names its own position ("the cat on the left"): a sample showing
            # it must place the positive by its words, not by the original sentence's
            ("view_allowed_quadrants", [quadrants_for_tokens(tokenize(t))[1] for _, t in views]),
            # the sentence as written: LAVT and ReLA tokenize REFER's `raw`, not `sent`
            ("raw", look["raw"][sid]),
        ):
            rows[col].append(value)
    table = pa.Table.from_pydict(rows, schema=row_schema())
    writer.write_table(payload["split"], table, ParquetFormat(row_group_rows=p.rows_per_group))
    return {"rows": table.num_rows, "with_hn": with_hn, "dropped": dropped,
            "with_views": with_views, "views_per_name": views_per_name,
            "views_as_negatives": views_as_negatives}
