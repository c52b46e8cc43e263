"""augment: semantic distractors of each training sentence (minimal edits that make it wrong).

Kinds: swap_color, swap_spatial, swap_count, negation, role_reversal. The `rules` backend
(stages.text.distractor_rules) edits one slot with lexicons and lemminflect, deterministically for a
seed; every distractor is validated (differs from the source, head noun kept, edit confined to
the slot) and a spatial swap is rejected when its new words would describe another instance of
the same category in the image (checked with the boxes): it must be false for the target, not
true for a neighbour. Rejected ones are kept with their reason.

The `llm` backend asks any Hugging Face causal LM (local dir, cached id, or `tiny` in tests)
with a few-shot prompt per kind for JSON (stages.text.distractor_prompts), through the request
loop multiview uses too (stages.models.generation.loop): batched, bad answers repaired, every
finished request put in the shared request cache (resume per request), and the answers held to
the same validity checks as the rules (stages.text.distractor_answers). Each request's token
budget follows its sentence (`distractor_budget`); an answer cut off at it is rejected as
`truncated`, one still unusable otherwise as `unparseable`.

The report per kind (count, share valid, mean CLIP cosine to the source, examples) goes to the
manifest (`nemo-pipe status --stage augment` shows it). CLIP text embeddings barely move under
small edits, so a kind's label comes from its edit, never from the cosine.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.errors import InputError
from pipeline.io import read_table_dir
from pipeline.stage import (
    Count,
    Device,
    Name,
    Params,
    RunEnv,
    Seed,
    ShardTask,
    ShardWriter,
    Splits,
    Stage,
    StageContext,
    runtime_field,
)
from pipeline.upstream import UpstreamTable
from stages.embed import TEXT_ENCODER_FIELDS
from stages.refer.manifests import check_splits

KINDS = ("swap_color", "swap_spatial", "swap_count", "negation", "role_reversal")
REPORT_SAMPLE = 2000
EXAMPLES = 3


class AugmentParams(Params):
    backend: Literal["rules", "llm"] = Field("rules", description="rules (CPU) or llm")
    model: Name = Field("tiny", description="llm backend: HF causal LM id/dir or `tiny`")
    kinds: list[Literal["swap_color", "swap_spatial", "swap_count", "negation",
                        "role_reversal"]] = Field(list(KINDS), min_length=1,
                                                  description="kinds to produce")
    per_kind: Count = Field(2, description="distractors per kind per sentence")
    splits: Splits = Field(["train"], description="splits whose sentences are augmented")
    seed: Seed = Field(0, description="seed of the substitute draws")
    max_attempts: Count = Field(2, description="llm: generation + repair attempts")
    llm_engine: Literal["hf", "vllm"] = Field(
        "hf", description="llm: transformers generate, or vLLM (the vllm extra, GPU)")
    sentences_per_shard: Count = Field(20000, description="sentences per resumable shard")
    batch_size: Count = runtime_field(8, "llm: prompts per generate call")
    device: Device = runtime_field("auto", "llm: auto (CUDA when present), cpu, cuda:N")

    @field_validator("kinds")
    @classmethod
    def _distinct_kinds(cls, kinds: list[str]) -> list[str]:
        repeated = sorted({k for k in kinds if kinds.count(k) > 1})
        if repeated:
            raise ValueError(f"kinds must not repeat ({', '.join(repeated)} given twice)")
        return kinds


class Augment(Stage[AugmentParams]):
    """Validated distractors (attribute swap, negation, role reversal) of each sentence."""

    name = "augment"
    version = "5"  # 3: one lexicon (issue 14); 4: llm swap_spatial checks every position word
    # 2: llm backend budgets per request, "truncated: ..." rejections
    # 5: no swap inside a negation's scope ("under negation"), no negation of a clause holding
    # one ("double negation"; isnt/doesnt/non/no removed instead), no "not" inside a noun phrase,
    # no swap of adverb "right", verb "left" or intensifying "furthest"; role reversal keeps "X of
    # Y" and "number 5"; the llm judge wants a changed direction / negation parity
    inputs = ("ingest",)
    tables = ("distractors", "rejected")
    libraries = ("pyarrow", "lemminflect")
    uses_sections = ("embed",)  # the report's cosine uses the shared CLIP text encoder
    key_fields = {"embed": TEXT_ENCODER_FIELDS}  # the shared text encoder only

    def required_libraries(self, params: AugmentParams) -> dict[str, str]:
        return {"vllm": "vllm"} if params.backend == "llm" and params.llm_engine == "vllm" else {}

    def fingerprint(self, env: RunEnv, params: AugmentParams) -> dict[str, Any]:
        p = params
        if p.backend != "llm":
            return {}
        from stages.models.generation.engines import model_identity

        # a newer hub snapshot or weights replaced in a local dir: new edits, not cached ones
        return {"model": model_identity(p.llm_engine, p.model, images=False,
                                        work_dir=env.work_dir)}

    def preflight(self, env: RunEnv, params: AugmentParams) -> None:
        p = params
        check_splits("augment.splits", p.splits, env.dataset)
        if p.backend == "llm":
            from stages.models.generation.engines import check_engine

            check_engine(p.llm_engine, p.model)  # vLLM or the model missing: an error now

    def run(self, ctx: StageContext[AugmentParams]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        p = ctx.params
        refs = ctx.read_table("ingest", "refs")
        refs = refs.filter(pc.is_in(refs.column("split"), pa.array(p.splits)))
        keep = set(refs.column("ref_id").to_pylist())
        sents = ctx.read_table("ingest", "sentences").select(["sent_id", "ref_id"])
        ids = sorted(s for s, r in zip(sents.column("sent_id").to_pylist(),
                                       sents.column("ref_id").to_pylist(), strict=True)
                     if r in keep)
        if not ids:  # nothing to edit: an error, not an artifact without tables
            raise InputError(
                f"augment.splits={list(p.splits)}: no sentence in these splits after ingest "
                "(their images may have been dropped as unreadable: see ingest's errors "
                "table); choose other splits")
        ingest_tables = {t: ctx.upstream_table("ingest", t)
                         for t in ("refs", "sentences", "objects", "images")}
        cache = str(ctx.env.work_dir / ".cache" / "requests.sqlite")
        tasks = [ShardTask(n, {"sent_ids": ids[s:s + p.sentences_per_shard],
                               "ingest_tables": ingest_tables, "cache": cache,
                               "model_key": ctx.resolved.fingerprint.get("model")})
                 for n, s in enumerate(range(0, len(ids), p.sentences_per_shard))]
        stats = ctx.run_shards(_augment_shard, tasks, desc="augment")
        ctx.record(sentences=len(ids), report=self._report(ctx, p),
                   generated_requests=sum(s.get("generated", 0) for s in stats),
                   cached_requests=sum(s.get("cached", 0) for s in stats))

    def _report(self, ctx: StageContext, p: AugmentParams) -> dict[str, Any]:
        """Per kind: count, share valid, mean cosine to the source (on a sample), examples."""
        import numpy as np

        from stages.embed import encode_sentences

        dist = read_table_dir(ctx.tmp_dir / "distractors").to_pylist()
        rej = read_table_dir(ctx.tmp_dir / "rejected").to_pylist()
        sents = ctx.read_table("ingest", "sentences").select(["sent_id", "sent"])
        text = dict(zip(sents.column("sent_id").to_pylist(), sents.column("sent").to_pylist(),
                        strict=True))
        report: dict[str, Any] = {}
        for kind in p.kinds:
            ok = [d for d in dist if d["kind"] == kind]
            bad = [d for d in rej if d["kind"] == kind]
            total = len(ok) + len(bad)
            sample = ok[:REPORT_SAMPLE]
            cosine = None
            if sample:
                a = encode_sentences(ctx.shared["embed"], [text[d["sent_id"]] for d in sample])
                b = encode_sentences(ctx.shared["embed"], [d["text"] for d in sample])
                cosine = round(float(np.mean((a * b).sum(axis=1))), 4)
            reasons: dict[str, int] = {}
            for d in bad:
                reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
            report[kind] = {
                "count": len(ok), "rejected": len(bad),
                "share_valid": round(len(ok) / total, 4) if total else None,
                "mean_cosine_to_source": cosine, "rejected_reasons": reasons,
                "examples": [f"{text[d['sent_id']]} -> {d['text']}" for d in ok[:EXAMPLES]],
            }
        return report


def _scene(ingest_tables: dict[str, UpstreamTable]) -> dict[str, Any]:
    """Per-process lookups: sentence text, the target box and same-class boxes per ref."""
    from pipeline.process_cache import process_cached

    return process_cached("augment.scene", ingest_tables["refs"].ident,
                          lambda: _read_scene(ingest_tables), max_entries=1)


def _read_scene(ingest_tables: dict[str, UpstreamTable]) -> dict[str, Any]:
    refs = {r["ref_id"]: r for r in ingest_tables["refs"].read().to_pylist()}
    sents = ingest_tables["sentences"].read().select(["sent_id", "ref_id", "sent"])
    objects = ingest_tables["objects"].read().select(
        ["ann_id", "image_id", "category_id", "bbox", "iscrowd"]).to_pylist()
    images = {i["image_id"]: (i["width"], i["height"])
              for i in ingest_tables["images"].read().to_pylist()}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for o in objects:
        by_image.setdefault(o["image_id"], []).append(o)
    return {
        "refs": refs, "images": images, "objects": by_image,
        "sent": dict(zip(sents.column("sent_id").to_pylist(),
                         zip(sents.column("ref_id").to_pylist(), sents.column("sent").to_pylist(),
                             strict=True), strict=True)),
    }


def scene_context(scene: dict[str, Any], ref: dict[str, Any]) -> Any:
    """The boxes a spatial swap is checked against (single-target refs only)."""
    from stages.text.distractor_rules import SceneContext

    if len(ref["ann_ids"]) != 1:
        return None
    objs = scene["objects"].get(ref["image_id"], [])
    target = next((o for o in objs if o["ann_id"] == ref["ann_ids"][0]), None)
    if target is None:
        return None
    same = [tuple(o["bbox"]) for o in objs if o["category_id"] == target["category_id"]
            and o["ann_id"] != target["ann_id"] and not o["iscrowd"]]
    return SceneContext(target_box=tuple(target["bbox"]), same_class_boxes=same,
                        image_size=scene["images"][ref["image_id"]])


def _augment_shard(payload: dict[str, Any], writer: ShardWriter[AugmentParams]) -> dict[str, Any]:
    import pyarrow as pa

    from stages.text.distractor_rules import generate_validated

    p = writer.params
    scene = _scene(payload["ingest_tables"])
    ok: list[tuple[int, str, str]] = []
    bad: list[tuple[int, str, str, str]] = []
    counts: dict[str, int] = {}
    if p.backend == "llm":
        items = []
        for sid in payload["sent_ids"]:
            rid, text = scene["sent"][sid]
            items.append((sid, text, scene_context(scene, scene["refs"][rid])))
        ok, bad, counts = run_llm_backend(items, list(p.kinds), p.per_kind, p.model, p.device,
                                          Path(payload["cache"]), max_attempts=p.max_attempts,
                                          batch_size=p.batch_size, engine=p.llm_engine,
                                          model_key=payload.get("model_key"))
    else:
        for sid in payload["sent_ids"]:
            rid, text = scene["sent"][sid]
            context = scene_context(scene, scene["refs"][rid])
            dists, rejections = generate_validated(text, kinds=p.kinds, per_kind=p.per_kind,
                                                   seed=[p.seed, sid], context=context)
            ok.extend((sid, d.kind, d.text) for d in dists)
            bad.extend((sid, r.kind, r.text, r.reason) for r in rejections)
    writer.write_table("distractors", pa.table({
        "sent_id": pa.array([o[0] for o in ok], pa.int64()),
        "kind": pa.array([o[1] for o in ok], pa.string()),
        "text": pa.array([o[2] for o in ok], pa.string()),
        "backend": pa.array([p.backend] * len(ok), pa.string()),
    }))
    writer.write_table("rejected", pa.table({
        "sent_id": pa.array([b[0] for b in bad], pa.int64()),
        "kind": pa.array([b[1] for b in bad], pa.string()),
        "text": pa.array([b[2] for b in bad], pa.string()),
        "backend": pa.array([p.backend] * len(bad), pa.string()),
        "reason": pa.array([b[3] for b in bad], pa.string()),
    }))
    return {"distractors": len(ok), "rejected": len(bad), **counts}


# -- llm backend ----------------------------------------------------------------------------
def run_llm_backend(
    sentences: Sequence[tuple[int, str, Any]],
    kinds: Sequence[str],
    per_kind: int,
    model: str,
    device: str,
    cache_path: str | os.PathLike[str],
    max_attempts: int = 2,
    batch_size: int = 8,
    *,
    engine: str = "hf",
    generator: Any = None,
    max_new_tokens: int | None = None,
    model_key: str | None = None,
) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str, str]], dict[str, int]]:
    """Distractors of `sentences` (``(sent_id, text, SceneContext or None)``) by a causal LM.

    Returns ``(accepted, rejected, counts)``: accepted ``(sent_id, kind, text)``, rejected
    ``(sent_id, kind, text, reason)`` (`stages.text.distractor_answers` says how answers are
    judged), counts ``{"generated": requests answered by the model in this call, "cached":
    requests read from the cache}``. Rows come in input order (sentence, then kind, then model
    order).

    One request per (sentence, kind), through the shared request loop (`run_cached`): sent
    `batch_size` at a time (requests being repaired first), finished when the answer parses or
    after `max_attempts` answers (each retry with the repair prompt), and put in the request
    cache at `cache_path` at once, keyed by (model, hash of the prompt, `max_attempts`,
    `max_new_tokens` and the budget rule, ``"<sent_id>:<kind>"``). The cached value is the
    parsed list (or None for a failure) with attempts, errors and whether the last answer was
    cut off, so a rerun never regenerates a finished request, re-judges cached answers with
    the current validation, and loads no model when everything is cached. An answer still
    unparseable after the last attempt is rejected as ``"truncated: ..."`` when it was cut off
    at its token limit, else ``"unparseable: ..."``.

    `engine`: ``hf`` or ``vllm`` (`get_generator`). `generator`: any object with
    ``generate(prompts, max_new_tokens=, batch_size=)`` instead (tests inject a scripted one);
    its ``cache_key`` attribute, if any, is the cache's model key, else ``f"custom:{model}"``.
    `model_key`: the cache's model key when the caller has it (the stage's, from the work
    dir's file hashes), else `engines.model_key`.
    """
    from pipeline.request_cache import prompt_hash
    from stages.models.generation.answers import BUDGET_VERSION
    from stages.models.generation.engines import cache_model_key, get_generator
    from stages.models.generation.engines import model_key as engine_model_key
    from stages.models.generation.loop import Outcome, Plan, run_cached
    from stages.text.distractor_answers import judge_answer
    from stages.text.distractor_prompts import (
        PROMPT_VERSION,
        TARGET,
        DistractorJob,
        DistractorTask,
        build_kind_prompt,
        check_kind,
    )

    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        check_kind(kind)
    if generator is not None:
        key = str(getattr(generator, "cache_key", None) or f"custom:{model}")
    else:
        key = cache_model_key(model_key, lambda: engine_model_key(engine, model, images=False))
    cap = None if max_new_tokens is None else int(max_new_tokens)
    gen_params = {"prompt_version": PROMPT_VERSION, "max_attempts": int(max_attempts),
                  "max_new_tokens": cap, "budget": BUDGET_VERSION}
    plans = []
    rows = []
    for sent_id, sentence, context in sentences:
        for kind in kinds:
            item = f"{int(sent_id)}:{kind}"
            phash = prompt_hash(build_kind_prompt(kind, sentence, per_kind), gen_params)
            plans.append(Plan(item, phash, functools.partial(DistractorJob, sentence, kind)))
            rows.append((int(sent_id), sentence, kind, context, item))

    def to_record(job: DistractorJob, outcome: Outcome) -> dict[str, Any]:
        failed = outcome.failed.get(TARGET)
        return {"distractors": outcome.values.get(TARGET), "attempts": outcome.attempts,
                "errors": outcome.errors,
                "truncated": failed is not None and failed.startswith("truncated:")}

    records, counts, _ = run_cached(
        DistractorTask(per_kind), plans, cache=cache_path, model_key=key,
        load_generator=lambda: (generator if generator is not None else
                                get_generator(engine, model, device, images=False)),
        to_record=to_record, max_attempts=max_attempts, batch_size=batch_size,
        max_new_tokens=cap)
    accepted: list[tuple[int, str, str]] = []
    rejected: list[tuple[int, str, str, str]] = []
    for sent_id, sentence, kind, context, item in rows:
        record = records[item]
        if record["distractors"] is None:
            errors = record.get("errors") or ["no answer"]
            last = str(errors[-1]).split(": ", 1)[-1]
            word = "truncated" if record.get("truncated") else "unparseable"
            rejected.append((sent_id, kind, "", f"{word}: {last}"))
            continue
        ok, bad = judge_answer(sentence, kind, record["distractors"], per_kind, context)
        accepted.extend((sent_id, kind, t) for t in ok)
        rejected.extend((sent_id, kind, t, r) for t, r in bad)
    return accepted, rejected, counts
