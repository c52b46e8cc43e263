"""multiview: three referring expressions per instance, from three views.

For every single-target referent of `multiview.splits`, a VLM is shown the image and the
original expressions of every instance in it and writes an appearance, an action and a spatial
expression, or a second appearance one (`appearance_alt`) where a view does not apply (the
method notes' prompt and worked examples, stages.text.view_prompts). One request per image covers
all its instances (`per_instance` asks per instance instead).

Backends: `hf` (transformers LLaVA, batched, the default `llava-hf/llava-1.5-7b-hf` or a local
dir, `tiny` for tests), `vllm` (structured JSON decoding; only where installed with a GPU), and
`template` (deterministic expressions from the annotations: dominant colour of the mask's
pixels, position from the box, relation to the nearest other instance; for the demo, CPU-only
users and as a baseline).

Model backends go through the request loop the augment stage uses too
(stages.models.generation.loop). Generation is the expensive stage, so they resume per request:
every finished request (success or recorded failure) goes to a request cache keyed by (model,
prompt hash, image id) as soon as it is done; after a kill nothing finished is generated again,
and a changed prompt redoes only what changed. Answers are validated per instance: the valid
instances of an answer keep their views, only the others are retried with a repair prompt and,
failing that, recorded in `failures` with their reason (`truncated`: cut off at the token limit;
`invalid`; `unreadable_image`), counted per reason in the manifest (`failure_reasons`). Each
request's token budget follows its instance count (`stages.text.view_prompts.views_budget`);
`max_new_tokens` only caps it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from pipeline.errors import InputError
from pipeline.stage import (
    INT_MAX,
    Count,
    Device,
    Name,
    NonNegInt,
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
from stages.ingest import data_locations
from stages.refer.manifests import check_splits, load_data_manifest

VIEWS = ("appearance", "action", "spatial", "appearance_alt")
# Bump when the prompt text or its examples change: model-backend keys depend on it.
PROMPT_VERSION = "1"

# The 11 basic colour terms (Berlin & Kay) and typical sRGB values: nearest one names a mask.
BASIC_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35), "orange": (240, 130, 20), "yellow": (240, 210, 40),
    "green": (40, 150, 60), "blue": (35, 75, 200), "purple": (125, 45, 160),
    "pink": (240, 145, 185), "brown": (120, 72, 35), "black": (25, 25, 25),
    "white": (240, 240, 240), "gray": (128, 128, 128),
}


class MultiviewParams(Params):
    backend: Literal["hf", "vllm", "template"] = Field("hf", description="generator")
    model: Name = Field("llava-hf/llava-1.5-7b-hf",
                        description="Hugging Face id (already cached), local dir, or `tiny`")
    splits: Splits = Field(["train"], description="splits whose referents get views")
    per_instance: bool = Field(False, description="one request per instance, not per image")
    max_attempts: Count = Field(3, description="generation + repair attempts per request")
    max_new_tokens: Annotated[int, Field(ge=16, le=INT_MAX)] | None = Field(
        None,
        description="cap on each request's answer tokens (null: none; the budget follows the "
                    "request's instance count, see stages.text.view_prompts)")
    images_per_shard: Count = Field(256, description="images per resumable shard")
    limit_images: NonNegInt = Field(0, description="only the first N images by id (0: all), "
                                                   "for trial runs and prompt comparisons")
    batch_size: Count | Literal["auto"] = runtime_field(
        "auto", "most requests per generate call; `auto`: as many as fit in memory (hf: sized "
                "by a memory estimate, halved after an out-of-memory; see below)")
    device: Device = runtime_field("auto", "auto (CUDA when present), cpu, cuda:N")
    # hf backend only (vLLM sizes its own batches and picks its own kernels)
    memory_gib: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = runtime_field(
        None, "hf: memory budget batches are sized for, GiB (null: free CUDA memory, or the "
              "host's available RAM on CPU)")
    sort_by_length: bool = runtime_field(
        True, "hf: batch requests of similar prompt length (less padding, the same answers)")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = runtime_field(
        "auto", "hf: attention kernels (auto: SDPA where the model supports it)")
    cache_implementation: Literal["dynamic", "static"] = runtime_field(
        "dynamic", "hf: KV cache (static: allocated once at its final size)")


class Multiview(Stage[MultiviewParams]):
    """Appearance / action / spatial expressions per instance from a VLM (or templates)."""

    name = "multiview"
    # 2: per-instance validation, budgets per request, reason words in failures; 3: template
    # views of two referents of one object are that object's (never its own neighbour); 4: a
    # placeholder appearance or spatial ("N/A", "(none - not visible)") and a view repeating
    # another of the instance (normalised) are invalid: repaired, else a failures row
    version = "4"
    inputs = ("ingest",)
    tables = ("views", "failures")
    libraries = ("pyarrow", "transformers", "torch", "pillow")

    def required_libraries(self, params: MultiviewParams) -> dict[str, str]:
        return {"vllm": "vllm"} if params.backend == "vllm" else {}

    def fingerprint(self, env: RunEnv, params: MultiviewParams) -> dict[str, Any]:
        p = params
        if p.backend == "template":
            return {}
        from stages.models.generation.engines import model_identity

        # the model's identity: a hub snapshot's revision, a local directory's file digest
        # (weights replaced in place, or a newer snapshot, are new views, not cached ones)
        return {"prompt_version": PROMPT_VERSION,
                "model": model_identity(p.backend, p.model, images=True,
                                        work_dir=env.work_dir)}

    def preflight(self, env: RunEnv, params: MultiviewParams) -> None:
        p = params
        check_splits("multiview.splits", p.splits, env.dataset)
        if p.backend != "template":
            check_model_backend(p)

    def run(self, ctx: StageContext[MultiviewParams]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        p = ctx.params
        manifest = load_data_manifest(ctx.env.dataset)
        _, images_dir = data_locations(ctx.env, manifest)
        refs = ctx.read_table("ingest", "refs")
        refs = refs.filter(pc.is_in(refs.column("split"), pa.array(p.splits)))
        single = [r for r in refs.to_pylist() if len(r["ann_ids"]) == 1]
        skipped = len(refs) - len(single)  # before the limit: limited-out refs are not these
        image_ids = sorted({r["image_id"] for r in single})
        if not image_ids:  # nothing to describe: an error, not an artifact without tables
            raise InputError(
                f"multiview.splits={list(p.splits)}: no single-target referent in these splits "
                "after ingest (their images may have been dropped as unreadable: see ingest's "
                "errors table); choose other splits")
        limited_out = 0
        if p.limit_images:
            image_ids = image_ids[:p.limit_images]
            kept = [r for r in single if r["image_id"] in set(image_ids)]
            limited_out, single = len(single) - len(kept), kept
        ingest_tables = {t: ctx.upstream_table("ingest", t)
                         for t in ("refs", "sentences", "objects", "images", "categories")}
        tasks = [ShardTask(n, {"image_ids": image_ids[s:s + p.images_per_shard],
                               "splits": p.splits, "ingest_tables": ingest_tables,
                               "images_dir": str(images_dir),
                               "cache": str(ctx.env.work_dir / ".cache" / "requests.sqlite"),
                               "model_key": ctx.resolved.fingerprint.get("model")})
                 for n, s in enumerate(range(0, len(image_ids), p.images_per_shard))]
        stats = ctx.run_shards(_multiview_shard, tasks, desc="views")
        seconds = sum(s.get("generation_seconds", 0.0) for s in stats)
        tokens = sum(s.get("generated_tokens", 0) for s in stats)
        model_requests = sum(s.get("model_requests", 0) for s in stats)
        reasons: dict[str, int] = {}
        batch_sizes: dict[int, int] = {}
        for s in stats:
            for word, n in (s.get("failure_reasons") or {}).items():
                reasons[word] = reasons.get(word, 0) + n
            for size, n in (s.get("batch_sizes") or {}).items():
                batch_sizes[int(size)] = batch_sizes.get(int(size), 0) + n
        ctx.record(instances=len(single), images=len(image_ids),
                   skipped_multi_or_no_target=skipped, skipped_by_limit_images=limited_out,
                   views=sum(s["views"] for s in stats),
                   failures=sum(s["failures"] for s in stats),
                   failed_instances=sum(reasons.values()),
                   failure_reasons=dict(sorted(reasons.items())),
                   truncated_answers=sum(s.get("truncated_answers", 0) for s in stats),
                   generated_requests=sum(s["generated"] for s in stats),
                   cached_requests=sum(s["cached"] for s in stats),
                   generation_seconds=round(seconds, 3), generated_tokens=tokens,
                   requests_per_s=round(model_requests / seconds, 3) if seconds else None,
                   tokens_per_s=round(tokens / seconds, 1) if seconds else None,
                   batch_size_max=max(batch_sizes, default=None),
                   batch_sizes={str(k): v for k, v in sorted(batch_sizes.items())},
                   oom_retries=sum(s.get("oom_retries", 0) for s in stats))
        ctx.extra.update(backend=p.backend, model=p.model if p.backend != "template" else None)
        if p.backend == "hf":
            ctx.extra.update(generation={"batch_size": p.batch_size, **generator_options(p)})


def check_model_backend(p: MultiviewParams) -> None:
    """Fail before any work when the model backend cannot run here."""
    check_backend(p.backend, p.model)


def check_backend(backend: str, model: str) -> None:
    """Fail before any work when `backend` cannot run `model` here; loads nothing heavy.

    vLLM missing, an unknown backend, a model that is neither a local directory nor in the
    local Hugging Face cache: all `InputError`s at preflight, not after hours of other stages.
    """
    from stages.models.generation.engines import ENGINES, check_engine

    if backend == "template":
        return
    if backend not in ENGINES:
        raise InputError(f"unknown multiview backend {backend!r}: use hf, vllm or template")
    check_engine(backend, model)


# -- instances ------------------------------------------------------------------------------
def instances_by_image(ingest_tables: dict[str, UpstreamTable],
                       splits: list[str]) -> dict[int, list[dict]]:
    """Per image: every single-target referent of `splits` with its annotation and sentences
    (read once per process and upstream)."""
    from pipeline.process_cache import process_cached

    return process_cached("multiview.instances", ingest_tables["refs"].ident + ",".join(splits),
                          lambda: _read_instances(ingest_tables, splits), max_entries=1)


def _read_instances(ingest_tables: dict[str, UpstreamTable],
                    splits: list[str]) -> dict[int, list[dict]]:
    refs = ingest_tables["refs"].read().to_pylist()
    sents = ingest_tables["sentences"].read().select(["ref_id", "sent"]).to_pylist()
    objects = {o["ann_id"]: o for o in ingest_tables["objects"].read().to_pylist()}
    cats = {c["category_id"]: c["name"] for c in ingest_tables["categories"].read().to_pylist()}
    images = {i["image_id"]: i for i in ingest_tables["images"].read().to_pylist()}
    texts: dict[int, list[str]] = {}
    for s in sents:
        texts.setdefault(s["ref_id"], []).append(s["sent"])
    out: dict[int, list[dict]] = {}
    for r in sorted(refs, key=lambda r: r["ref_id"]):
        if r["split"] not in splits or len(r["ann_ids"]) != 1:
            continue
        obj = objects[r["ann_ids"][0]]
        out.setdefault(r["image_id"], []).append({
            "ref_id": r["ref_id"], "image_id": r["image_id"], "ann_id": obj["ann_id"],
            "category": cats.get(obj["category_id"], "object"), "bbox": obj["bbox"],
            "rle": obj["rle"], "sentences": texts.get(r["ref_id"], []),
            "image": images[r["image_id"]],
        })
    return out


# -- template backend -----------------------------------------------------------------------
def dominant_color(pixels: Any, mask: Any) -> str:
    """The basic colour term nearest to the median colour of the masked pixels."""
    import numpy as np

    sel = pixels[mask.astype(bool)]
    if len(sel) == 0:
        return "gray"
    med = np.median(sel.reshape(-1, 3).astype(np.float64), axis=0)
    names = list(BASIC_COLORS)
    ref = np.array([BASIC_COLORS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((ref - med) ** 2).sum(axis=1)))]


def horizontal_side(bbox: list[float], width: int) -> str:
    cx = (bbox[0] + bbox[2] / 2) / width
    return "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "middle"


def vertical_side(bbox: list[float], height: int) -> str | None:
    cy = (bbox[1] + bbox[3] / 2) / height
    return "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else None


def template_views(inst: dict[str, Any], others: list[dict[str, Any]], color: str,
                   other_colors: dict[int, str]) -> dict[str, str | None]:
    """Deterministic views grounded in the annotation; no action is known, so the second
    appearance view stands in for it, as the method notes do for static objects."""
    img = inst["image"]
    cat = inst["category"]
    side = horizontal_side(inst["bbox"], img["width"])
    vert = vertical_side(inst["bbox"], img["height"])
    where = f"{vert} {side}" if vert and side != "middle" else (vert or side)
    place = "in the middle" if where == "middle" else f"on the {where}"
    spatial = f"the {cat} {place}"
    if others:
        cx = inst["bbox"][0] + inst["bbox"][2] / 2
        cy = inst["bbox"][1] + inst["bbox"][3] / 2

        def dist(o: dict[str, Any]) -> float:
            ox, oy = o["bbox"][0] + o["bbox"][2] / 2, o["bbox"][1] + o["bbox"][3] / 2
            return (ox - cx) ** 2 + (oy - cy) ** 2

        near = min(others, key=lambda o: (dist(o), o["ann_id"]))
        ox = near["bbox"][0] + near["bbox"][2] / 2
        rel = "left of" if cx < ox else "right of"
        spatial += f", {rel} the {other_colors[near['ann_id']]} {near['category']}"
    area = inst["bbox"][2] * inst["bbox"][3] / (img["width"] * img["height"])
    size = "large" if area > 0.15 else "small" if area < 0.03 else "medium-sized"
    return {"appearance": f"the {color} {cat}", "action": None, "spatial": spatial,
            "appearance_alt": f"the {size} {color} {cat}"}


def _template_image(insts: list[dict[str, Any]], images_dir: str) -> dict[int, dict]:
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    img = insts[0]["image"]
    with Image.open(Path(images_dir) / img["file_name"]) as im:
        pixels = np.asarray(im.convert("RGB"))
    # one instance per object: two referents of one annotation are one object, never its own
    # neighbour in the spatial view (as instances_from_refs groups them for the model backends)
    objects: dict[int, dict[str, Any]] = {}
    for inst in insts:
        objects.setdefault(inst["ann_id"], inst)
    colors = {}
    for ann_id, inst in objects.items():
        mask = mask_utils.decode({"size": inst["rle"]["size"], "counts": inst["rle"]["counts"]})
        colors[ann_id] = dominant_color(pixels, mask)
    return {ann_id: template_views(inst, [o for a, o in objects.items() if a != ann_id],
                                   colors[ann_id], colors)
            for ann_id, inst in objects.items()}


# -- shard ----------------------------------------------------------------------------------
def _multiview_shard(payload: dict[str, Any],
                     writer: ShardWriter[MultiviewParams]) -> dict[str, Any]:
    import pyarrow as pa

    p = writer.params
    by_image = instances_by_image(payload["ingest_tables"], payload["splits"])
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    counts = {"generated": 0, "cached": 0}
    if p.backend == "template":
        for image_id in payload["image_ids"]:
            insts = by_image[image_id]
            views = _template_image(insts, payload["images_dir"])
            for inst in insts:
                rows.extend(_view_rows(inst, views[inst["ann_id"]], "template", "", "", 1))
    else:
        rows, failures, counts = run_model_backend(p, by_image, payload)
    writer.write_table("views", pa.table({
        "ref_id": pa.array([r["ref_id"] for r in rows], pa.int64()),
        "image_id": pa.array([r["image_id"] for r in rows], pa.int64()),
        "ann_id": pa.array([r["ann_id"] for r in rows], pa.int64()),
        "view": pa.array([r["view"] for r in rows], pa.string()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
        "backend": pa.array([r["backend"] for r in rows], pa.string()),
        "model": pa.array([r["model"] for r in rows], pa.string()),
        "prompt_hash": pa.array([r["prompt_hash"] for r in rows], pa.string()),
        "attempts": pa.array([r["attempts"] for r in rows], pa.int32()),
    }))
    writer.write_table("failures", pa.table({
        "image_id": pa.array([f["image_id"] for f in failures], pa.int64()),
        "ann_ids": pa.array([f["ann_ids"] for f in failures], pa.list_(pa.int64())),
        "reason": pa.array([f["reason"] for f in failures], pa.string()),
        "attempts": pa.array([f["attempts"] for f in failures], pa.int32()),
        "prompt_hash": pa.array([f["prompt_hash"] for f in failures], pa.string()),
    }))
    return {"views": len(rows), "failures": len(failures), **counts}


def _view_rows(inst: dict[str, Any], views: dict[str, str | None], backend: str, model: str,
               prompt_hash: str, attempts: int) -> list[dict[str, Any]]:
    """One row per produced view; a view that does not apply (None) gets no row."""
    return [{"ref_id": inst["ref_id"], "image_id": inst["image_id"], "ann_id": inst["ann_id"],
             "view": v, "text": views[v], "backend": backend, "model": model,
             "prompt_hash": prompt_hash, "attempts": attempts}
            for v in VIEWS if views.get(v)]


# -- model backends (hf, vllm): cache-first, resumable per image -----------------------------
UNREADABLE_IMAGE = "unreadable_image"  # failure reason: the image file could not be read


def instances_from_refs(refs: Sequence[Mapping[str, Any]]) -> list[Any]:
    """One view-prompt `Instance` per annotation of an image, from the stage's referent rows.

    Referents are grouped by ``ann_id`` (the instance id in the prompt and the answer): if two
    referents point at the same object their sentences are merged, so the model is never asked
    about one object twice under two ids.
    """
    from stages.text.view_prompts import Instance

    by_ann: dict[str, dict[str, Any]] = {}
    for ref in refs:
        entry = by_ann.setdefault(str(ref["ann_id"]), {
            "instance_id": str(ref["ann_id"]), "category": ref.get("category") or "",
            "bbox": tuple(ref["bbox"]) if ref.get("bbox") is not None else None,
            "expressions": [],
        })
        for sent in ref.get("sentences") or []:
            if sent not in entry["expressions"]:
                entry["expressions"].append(sent)
    return [Instance(**entry) for entry in by_ann.values()]


def _open_image_job(images_dir: Path, meta: Mapping[str, Any], instances: list[Any]) -> Any:
    """The image's job for the request loop; an unreadable image is a `Skip` with its failure
    record (not cached: fixing the file and rerunning retries it)."""
    from PIL import Image

    from stages.models.generation.loop import Skip
    from stages.text.view_prompts import ViewJob

    path = images_dir / str(meta["file_name"])
    try:
        with Image.open(path) as im:
            return ViewJob(im.convert("RGB"), instances)
    except (OSError, ValueError) as exc:  # missing, unreadable, truncated
        error = str(InputError(f"cannot read image {path}: {exc}"))
        why = f"{UNREADABLE_IMAGE}: {error}"
        raise Skip({"views": {}, "attempts": 0, "errors": [error],
                    "failed": {i.instance_id: why for i in instances}}) from None


def run_model_backend(p: Any, by_image: Mapping[int, Sequence[Mapping[str, Any]]],
                      payload: Mapping[str, Any],
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The `hf` / `vllm` work for one shard: ``(rows, failures, counts)``.

    `p` carries backend, model, device, per_instance, max_attempts, max_new_tokens and
    batch_size (an int or ``auto``), and may carry the hf options (`generator_options`);
    `by_image` maps image id -> the image's referent rows (ref_id, image_id,
    ann_id, category, bbox, sentences, image metadata); `payload` has ``image_ids``,
    ``images_dir`` and the request cache path ``cache``.

    The images go through the shared request loop (`run_cached` with the `ViewTask`): every
    finished image -- success or final failure -- is put in the request cache, keyed by
    (`model_key`, hash of the prompt and generation params, image id), at once; a rerun (after
    a kill, or with more images) generates only what is not there, and loads no model at all
    when everything is cached. An unreadable image is a failure row but is not cached.
    """
    from pipeline.request_cache import prompt_hash
    from stages.models.generation import engines
    from stages.models.generation.answers import BUDGET_VERSION
    from stages.models.generation.loop import Outcome, Plan, run_cached
    from stages.text.view_prompts import ViewJob, ViewTask, build_prompt

    images_dir = Path(payload["images_dir"])
    cap = None if p.max_new_tokens is None else int(p.max_new_tokens)
    gen_params = {"backend": p.backend, "per_instance": bool(p.per_instance),
                  "max_attempts": int(p.max_attempts), "max_new_tokens": cap,
                  "budget": BUDGET_VERSION}
    plans = []
    hashes: dict[int, str] = {}
    for image_id in payload["image_ids"]:
        refs = by_image.get(image_id) or []
        if not refs:
            continue
        instances = instances_from_refs(refs)
        meta = refs[0]["image"]
        size = (int(meta["width"]), int(meta["height"]))
        hashes[image_id] = prompt_hash(build_prompt(instances, image_size=size), gen_params)
        plans.append(Plan(str(image_id), hashes[image_id],
                          functools.partial(_open_image_job, images_dir, meta, instances)))

    def to_record(job: ViewJob, outcome: Outcome) -> dict[str, Any]:
        return {"views": {k: v.model_dump() for k, v in outcome.values.items()},
                "attempts": outcome.attempts, "errors": outcome.errors,
                "failed": outcome.failed}

    records, counts, usage = run_cached(
        ViewTask(bool(p.per_instance)), plans, cache=payload["cache"],
        model_key=engines.cache_model_key(payload.get("model_key"),
                                          lambda: engines.model_key(p.backend, p.model)),
        load_generator=lambda: engines.get_generator(p.backend, p.model, p.device,
                                                     options=generator_options(p)),
        to_record=to_record, max_attempts=int(p.max_attempts),
        batch_size=None if p.batch_size == "auto" else int(p.batch_size), max_new_tokens=cap)
    rows, failures, reasons = _rows_and_failures(
        p, [(i, by_image[i], hashes[i]) for i in hashes], {i: records[str(i)] for i in hashes})
    return rows, failures, {**counts, **(usage or {}), "failure_reasons": reasons}


def generator_options(p: Any) -> dict[str, Any]:
    """The transformers generator's options from the stage's params (runtime fields: they
    change speed and memory, not what is written); a field `p` lacks has its default."""
    names = ("attn_implementation", "cache_implementation", "sort_by_length", "memory_gib")
    return {name: getattr(p, name, MultiviewParams.model_fields[name].default)
            for name in names}


def _rows_and_failures(p: Any, plans: Sequence[tuple[int, Sequence[Mapping[str, Any]], str]],
                       records: Mapping[int, Mapping[str, Any]],
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """View rows of every instance with views; one failure row per (image, reason message)
    with the instances that share it; failed instances counted per reason word."""
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    reasons: dict[str, int] = {}
    for image_id, refs, phash in plans:
        record = records[image_id]
        views_of = record.get("views") or {}
        failed = record.get("failed") or {}
        attempts = int(record["attempts"])
        by_reason: dict[str, set[int]] = {}
        for ref in refs:
            views = views_of.get(str(ref["ann_id"]))
            if views is None:
                why = failed.get(str(ref["ann_id"])) or "invalid: no answer"
                by_reason.setdefault(why, set()).add(int(ref["ann_id"]))
                continue
            rows.extend({"ref_id": ref["ref_id"], "image_id": image_id, "ann_id": ref["ann_id"],
                         "view": view, "text": views[view], "backend": p.backend,
                         "model": p.model, "prompt_hash": phash, "attempts": attempts}
                        for view in VIEWS if views.get(view))
        for why, ann_ids in by_reason.items():
            failures.append({"image_id": image_id, "ann_ids": sorted(ann_ids), "reason": why,
                             "attempts": attempts, "prompt_hash": phash})
            word = why.split(":", 1)[0]
            reasons[word] = reasons.get(word, 0) + len(ann_ids)
    return rows, failures, reasons
