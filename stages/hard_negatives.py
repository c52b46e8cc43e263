"""hard_negatives: N ranked text hard negatives per training sentence, each with provenance.

Sources, in order (a short source's places go to the next one):
1. `same_image`: sentences of the image's other referents whose targets do not overlap;
2. `neighbour`: sentences of other images nearest to the target's cluster centre mu (FAISS text
   index) that fall outside the cluster: cos(e, mu) < `clusters.threshold`;
3. `neighbour_same_class`: the same restricted to the query's class. With `class_source`
   `annotation` (default) a sentence's class is its ref's COCO category (exact and free); with
   `extracted` it is the head-noun class of the expression itself (`stages.text.class_extract`, the
   Ref-NMS-style mapping, synonym table only), on both sides: what generated expressions have,
   and what the expression says even where the annotation disagrees. An expression without a
   head-noun class ("right one") gets no same-class neighbours and is nobody's;
4. `augmented`: the validated distractors of this sentence from `augment`, labelled by their
   edit kind (`swap_color`, `negation`, ...).
Within a source, negatives are ranked by cosine to mu, hardest (highest) first, ties by
ascending source sent_id. An instance without a cluster (its views failed) uses the mean of its
own sentences' embeddings as mu.

Every candidate passes the rules of `stages.text.negative_rules`, shared with shards: a sentence
of a split outside `source_splits` (default: the training split) is never a negative, whatever
image it is on; a text equal (normalised) to a sentence of the query's referent (its ref or any
ref with the same target set) is never a negative; a text is never repeated (normalised). The
neighbour searches count only texts that pass towards their depth, so the rules never leave a
source short when the index holds enough. Candidates a rule skipped ahead of a published negative
of the same source are counted per source and reason in the manifest
(`nemo-pipe status --stage hard_negatives`).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.stage import (
    Count,
    NonNegInt,
    ParamDomainError,
    Params,
    RunEnv,
    Splits,
    Stage,
    StageContext,
)
from stages.embed import TEXT_ENCODER_FIELDS
from stages.refer.files import other_referent_sentences
from stages.refer.manifests import check_splits, load_data_manifest
from stages.text.negative_rules import DROP_REASONS, TextRules, drop_reason
from stages.text.normalise import normalise_sentence

SOURCES = ("same_image", "neighbour", "neighbour_same_class", "augmented")
SENTENCE_SOURCES = SOURCES[:3]  # negatives that are dataset sentences (augmented: edits)
ANY_CLASS = -1  # the class slot of the plain `neighbour` search (classes are COCO ids >= 0)


class HardNegativesParams(Params):
    n: Count = Field(8, description="hard negatives per training sentence")
    mix: dict[str, NonNegInt] = Field(
        {"same_image": 2, "neighbour": 2, "neighbour_same_class": 2, "augmented": 2},
        description="per-source quotas, in source order")
    same_class: bool = Field(True, description="use the neighbour_same_class source")
    class_source: Literal["annotation", "extracted"] = Field(
        "annotation", description="class compared by neighbour_same_class: the ref's COCO "
                                  "category (annotation) or the head-noun class of both "
                                  "expressions (extracted)")
    search_k: Count = Field(64, description="first FAISS search depth (grows as needed)")
    max_search_k: Count = Field(
        8192, description="deepest FAISS search (>= search_k): neighbours are exact among this "
                          "many nearest texts (when most are inside the cluster, deeper "
                          "searches would scan the whole index per query)")
    source_splits: Splits = Field(
        ["train"],
        description="splits whose sentences may be negatives (checked against the dataset)")

    @field_validator("source_splits")
    @classmethod
    def _distinct_splits(cls, splits: list[str]) -> list[str]:
        return list(dict.fromkeys(splits))  # a repeated name changes nothing: one key

    @field_validator("mix")
    @classmethod
    def _known_sources(cls, mix: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(mix) - set(SOURCES))
        if unknown:
            raise ValueError(f"unknown sources {unknown}; known: {list(SOURCES)}")
        if not any(mix.values()):
            raise ValueError("at least one source needs a quota > 0 (all are 0: no negatives)")
        return {s: int(mix.get(s, 0)) for s in SOURCES}

    @model_validator(mode="after")
    def _search_depths(self) -> HardNegativesParams:
        if self.max_search_k < self.search_k:
            raise ParamDomainError("max_search_k", f"an integer >= hard_negatives.search_k "
                                                   f"({self.search_k})", self.max_search_k)
        return self


def take_quotas(available: dict[str, list[tuple[float, int, str, str]]], mix: dict[str, int],
                n: int, exclude: Container[str] = frozenset(),
                allowed: Container[int] | None = None,
                drops: dict[str, dict[str, int]] | None = None,
                normalise: Callable[[str], str] = normalise_sentence
                ) -> list[tuple[float, int, str, str]]:
    """Fill N places source by source, each item (score, source_sent_id, text, kind) best
    first; a source's unused places carry to the next source.

    A candidate is skipped by the first rule of `stages.text.negative_rules` that applies: a
    dataset sentence not in `allowed` (None: any), a text whose normalised form is in `exclude`
    (the referent's positives), a text already taken. Skips ranked ahead of a candidate their
    source then took (it took their place) are counted in `drops[source][reason]`.
    """
    out: list[tuple[float, int, str, str]] = []
    taken: set[str] = set()
    carry = 0
    for source in SOURCES:
        want = min(mix.get(source, 0) + carry, n - len(out))
        got = 0
        skipped: dict[str, int] = {}
        for item in available.get(source, []):
            if got >= want:
                break
            norm = normalise(item[2])
            in_splits = allowed is None or source not in SENTENCE_SOURCES or item[1] in allowed
            reason = drop_reason(in_splits, norm, exclude, taken)
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            taken.add(norm)
            out.append(item)
            got += 1
            if drops is not None and skipped:
                counts = drops.setdefault(source, {})
                for r, c in skipped.items():
                    counts[r] = counts.get(r, 0) + c
                skipped.clear()
        carry = mix.get(source, 0) + carry - got
    return out


class HardNegatives(Stage[HardNegativesParams]):
    """Ranked hard-negative texts per training sentence from four labelled sources."""

    name = "hard_negatives"
    # 2: split rule, positives and normalised duplicates dropped; 3: the normal form drops
    # invisible (Cf) characters and articles and case-folds; 4: class_source=extracted reads
    # "orange and white cat" as a cat (not the fruit), "pitcher of water" as no person and
    # "sweater on dog" as the dog (stages.text.class_extract)
    version = "4"
    inputs = ("ingest", "embed_texts", "index", "clusters", "augment")
    tables = ("hard_negatives",)
    libraries = ("pyarrow", "faiss-gpu", "faiss-cpu", "numpy", "torch")
    uses_sections = ("clusters", "embed")
    key_fields = {"embed": TEXT_ENCODER_FIELDS}  # the shared text encoder only

    def preflight(self, env: RunEnv, params: HardNegativesParams) -> None:
        p = params
        check_splits("hard_negatives.source_splits", p.source_splits, env.dataset)

    def run(self, ctx: StageContext[HardNegativesParams]) -> None:
        import faiss
        import numpy as np
        import pyarrow as pa

        from stages.embed import embeddings_matrix, encode_sentences

        p = ctx.params
        threshold = ctx.shared["clusters"].threshold  # type: ignore[attr-defined]
        train_split = load_data_manifest(ctx.env.dataset).train_split
        refs = {r["ref_id"]: r for r in ctx.read_table("ingest", "refs").to_pylist()}
        sents = ctx.read_table("ingest", "sentences").select(["sent_id", "ref_id", "sent"])
        sent_ref = dict(zip(sents.column("sent_id").to_pylist(),
                            sents.column("ref_id").to_pylist(), strict=True))
        sent_text = dict(zip(sents.column("sent_id").to_pylist(),
                             sents.column("sent").to_pylist(), strict=True))
        rules = TextRules(refs, sent_ref, sent_text, p.source_splits)
        texts = ctx.read_table("embed_texts", "embeddings")
        index = faiss.deserialize_index(np.frombuffer(  # verified bytes, parsed in memory
            ctx.upstream_file("index", "texts.faiss").read_bytes(), dtype=np.uint8))
        row_sent = ctx.read_table("index", "text_ids").column("sent_id").to_numpy()
        text_ids: dict[str, int] = {}  # normalised text -> id: "Left." and "left" are one text
        sent_class = sentence_classes(p.class_source, refs, sent_ref, sent_text)
        rows_info = {
            "sent_id": row_sent,
            "image_id": np.array([refs[sent_ref[int(x)]]["image_id"] for x in row_sent]),
            "category_id": np.array([sent_class[int(x)] for x in row_sent], dtype=np.int64),
            "text_id": np.array([text_ids.setdefault(rules.norm[int(x)], len(text_ids))
                                 for x in row_sent]),
            "allowed": np.array([int(x) in rules.allowed for x in row_sent], dtype=bool),
        }
        emb = embeddings_matrix(texts.column("embedding"))
        emb_row = {s: i for i, s in enumerate(texts.column("sent_id").to_pylist())}
        clusters = ctx.read_table("clusters", "clusters")
        mu_of = dict(zip(clusters.column("ann_id").to_pylist(),
                         embeddings_matrix(clusters.column("mu")), strict=True))
        distractors: dict[int, list[dict[str, Any]]] = {}
        for d in ctx.read_table("augment", "distractors").to_pylist():
            distractors.setdefault(d["sent_id"], []).append(d)
        dist_texts = sorted({d["text"] for ds in distractors.values() for d in ds})
        dist_emb = dict(zip(dist_texts, encode_sentences(ctx.shared["embed"], dist_texts)
                            if dist_texts else [], strict=True))

        sents_of_ref: dict[int, list[int]] = {}
        for sid, rid in sorted(sent_ref.items()):
            sents_of_ref.setdefault(rid, []).append(sid)
        refs_of_image: dict[int, list[int]] = {}
        for r in refs.values():
            refs_of_image.setdefault(r["image_id"], []).append(r["ref_id"])

        train = [s for s, r in sorted(sent_ref.items()) if refs[r]["split"] == train_split]
        out: dict[str, list[Any]] = {k: [] for k in ("sent_id", "texts", "kinds", "scores",
                                                     "sources")}
        # mu per referent: its cluster centre, else the mean of its own sentences
        mus: dict[int, Any] = {}
        fallback_mu = 0
        for rid in sorted({sent_ref[s] for s in train}):
            ref = refs[rid]
            mu = mu_of.get(ref["ann_ids"][0]) if len(ref["ann_ids"]) == 1 else None
            if mu is None:
                own = emb[[emb_row[s] for s in sents_of_ref[rid]]]
                mu = own.mean(axis=0)
                mu = mu / (np.linalg.norm(mu) or 1.0)
                fallback_mu += 1
            mus[rid] = np.asarray(mu, dtype=np.float32)
        # the positives' text ids: the searches skip them like the walk does
        positive_ids = {rid: np.array(sorted(text_ids[t] for t in rules.positives(rid)
                                             if t in text_ids), dtype=np.int64) for rid in mus}
        classes: dict[int, set[int]] = {rid: set() for rid in mus}
        if p.same_class:  # the classes each referent's queries ask for
            for sid in train:
                if sent_class[sid] >= 0:
                    classes[sent_ref[sid]].add(sent_class[sid])
        mined = self._mine_neighbours(p, threshold, refs, mus, index, rows_info, positive_ids,
                                      classes)
        drops: dict[str, dict[str, int]] = {}
        for sid in train:
            ref = refs[sent_ref[sid]]
            available = self._sources(
                p, threshold, ref, mus[ref["ref_id"]], refs, refs_of_image, sents_of_ref,
                sent_ref, emb, emb_row, distractors.get(sid, []), dist_emb, mined,
                sent_class[sid])
            for source in SENTENCE_SOURCES:
                available[source] = [(sc, s, sent_text[s], source) for sc, s in available[source]]
            chosen = take_quotas(available, p.mix, p.n, exclude=rules.positives(ref["ref_id"]),
                                 allowed=rules.allowed, drops=drops, normalise=rules.normalise)
            out["sent_id"].append(sid)
            out["texts"].append([c[2] for c in chosen])
            out["kinds"].append([c[3] for c in chosen])
            out["scores"].append([c[0] for c in chosen])
            out["sources"].append([c[1] for c in chosen])
        ctx.write_table("hard_negatives", pa.table({
            "sent_id": pa.array(out["sent_id"], pa.int64()),
            "neg_texts": pa.array(out["texts"], pa.list_(pa.string())),
            "neg_kinds": pa.array(out["kinds"], pa.list_(pa.string())),
            "neg_scores": pa.array(out["scores"], pa.list_(pa.float32())),
            "neg_source_ids": pa.array(out["sources"], pa.list_(pa.int64())),
        }))
        counts: dict[str, int] = {}
        for kinds in out["kinds"]:
            for k in kinds:
                counts[k] = counts.get(k, 0) + 1
        per_source = {s: {r: drops.get(s, {}).get(r, 0) for r in DROP_REASONS} for s in SOURCES}
        if p.class_source == "extracted":
            ctx.record(training_sentences_without_class=sum(sent_class[s] < 0 for s in train))
        ctx.record(sentences=len(train), negatives_per_kind=counts,
                   mean_negatives=round(sum(map(len, out["texts"])) / max(1, len(train)), 3),
                   mu_from_own_sentences=fallback_mu, threshold=threshold,
                   source_sentences=len(rules.allowed),
                   **{r: sum(d[r] for d in per_source.values()) for r in DROP_REASONS},
                   dropped_per_source=per_source)

    def _mine_neighbours(self, p: HardNegativesParams, threshold: float, refs: dict[int, Any],
                         mus: dict[int, Any], index: Any, rows_info: dict[str, Any],
                         positive_ids: dict[int, Any], classes: dict[int, set[int]]
                         ) -> dict[int, tuple[list, dict[int, list]]]:
        """Per referent (its sentences share mu): the neighbour list and a same-class list per
        class in `classes[rid]` (what its queries ask for), from batched searches of growing
        depth; only what no batch covered is searched alone."""
        want = p.n + 1  # usable distinct texts: n, and one spare for a text taken earlier
        todo = {(rid, c) for rid in mus for c in (ANY_CLASS, *classes[rid])}
        found: dict[tuple[int, int], list] = {}
        depth = min(FIRST_PAGE, p.max_search_k)
        while todo:
            last = depth >= min(p.max_search_k, index.ntotal)
            pending = sorted(todo)
            rids = sorted({rid for rid, _ in pending})
            for start in range(0, len(rids), SEARCH_BLOCK):  # pages of one block in memory
                block = set(rids[start:start + SEARCH_BLOCK])
                pages = first_search_pages(index, {rid: mus[rid] for rid in block}, depth)
                for rid, c in pending:
                    if rid not in block:
                        continue
                    got = nearest_outside(
                        index, rows_info, mus[rid], threshold, want, p.search_k,
                        p.max_search_k, refs[rid]["image_id"], None if c == ANY_CLASS else c,
                        pages[rid], search=last, exclude=positive_ids[rid])
                    if got is not None:
                        found[(rid, c)] = got
            todo = {t for t in todo if t not in found}
            depth = min(depth * 4, p.max_search_k, index.ntotal)
        return {rid: (found[(rid, ANY_CLASS)], {c: found[(rid, c)] for c in classes[rid]})
                for rid in mus}

    def _sources(self, p: HardNegativesParams, threshold: float, ref: dict[str, Any],
                 mu: Any, refs: dict[int, Any], refs_of_image: dict[int, list[int]],
                 sents_of_ref: dict[int, list[int]], sent_ref: dict[int, int], emb: Any,
                 emb_row: dict[int, int],
                 dists: list[dict[str, Any]], dist_emb: dict[str, Any],
                 mined: dict[int, tuple[list, dict[int, list]]],
                 query_class: int) -> dict[str, list]:
        """Candidates per source as (score, source_sent_id, text?, kind?), best first."""
        same_image = [(float(emb[emb_row[s]] @ mu), s) for s in
                      other_referent_sentences(ref, refs, refs_of_image, sents_of_ref)]
        same_image.sort(key=lambda x: (-x[0], x[1]))
        neighbours, by_class = mined[ref["ref_id"]]
        same_class = by_class.get(query_class, [])
        augmented = sorted(((float(dist_emb[d["text"]] @ mu), d["sent_id"], d["text"],
                             d["kind"]) for d in dists), key=lambda x: (-x[0], x[2]))
        return {"same_image": same_image, "neighbour": neighbours,
                "neighbour_same_class": same_class, "augmented": augmented}


FIRST_PAGE = 512
SEARCH_BLOCK = 1024


def sentence_classes(class_source: str, refs: dict[int, Any], sent_ref: dict[int, int],
                     sent_text: dict[int, str]) -> dict[int, int]:
    """The class `neighbour_same_class` compares, per sentence id; -1 for none.

    `annotation`: the sentence's ref category (-1 for a no-target ref). `extracted`: the COCO
    category of the expression's head noun (`stages.text.class_extract.extract_class`, table
    only: an
    embedding fallback would need the CLIP model here and map almost any noun somewhere), -1
    when it names none. Each distinct text is extracted once.
    """
    if class_source == "annotation":
        return {s: int(refs[r]["category_id"]) for s, r in sent_ref.items()}
    from stages.text.class_extract import extract_class

    memo: dict[str, int] = {}
    out: dict[int, int] = {}
    for s, text in sent_text.items():
        if text not in memo:
            cid = extract_class(text)
            memo[text] = -1 if cid is None else int(cid)
        out[s] = memo[text]
    return out


def first_search_pages(index: Any, mus: dict[int, Any], depth: int) -> dict[int, tuple[Any, Any]]:
    """The `depth` nearest texts of every mu, in batched searches (one query at a time leaves
    BLAS idle): most referents need nothing deeper."""
    import numpy as np

    depth = min(depth, index.ntotal)
    keys = list(mus)
    out: dict[int, tuple[Any, Any]] = {}
    for start in range(0, len(keys), SEARCH_BLOCK):
        block = keys[start:start + SEARCH_BLOCK]
        scores, rows = index.search(np.stack([mus[k] for k in block]), depth)
        out.update({k: (scores[i], rows[i]) for i, k in enumerate(block)})
    return out


def nearest_outside(index: Any, rows_info: dict[str, Any], mu: Any, threshold: float,
                    want: int, k0: int, k_max: int, image_id: int, category: int | None = None,
                    first: tuple[Any, Any] | None = None, search: bool = True,
                    exclude: Any = None) -> list[tuple[float, int]] | None:
    """Sentences of images other than `image_id` (and of `category` when given) nearest to mu
    with cos < threshold, best first (ties by ascending sent_id), until `want` distinct usable
    texts.

    A row is usable when `rows_info["allowed"]` (if given) is true for it and its text id is not
    in `exclude` (the referent's positives); unusable rows stay in the list, where the caller
    counts them as dropped, but do not count towards `want`, so a search never comes back short
    because of them.

    Searches with a growing depth: a candidate scoring strictly above the deepest returned score
    cannot be beaten by an unseen one, so only those count until the index is exhausted or
    `k_max` deep (then the result is exact among the k_max nearest texts of every split). `first`
    (scores, rows) is a precomputed page of nearest texts, used instead of searching while deep
    enough. `rows_info` holds per index row: sent_id, image_id, category_id, a (normalised) text
    id and optionally `allowed` (numpy). With `search=False` nothing beyond `first` is searched:
    None means it was not deep enough.
    """
    import numpy as np

    row_sent, row_image = rows_info["sent_id"], rows_info["image_id"]
    row_cat, row_text = rows_info["category_id"], rows_info["text_id"]
    row_allowed = rows_info.get("allowed")
    k = min(k0, k_max, index.ntotal)
    query = np.ascontiguousarray(mu, dtype=np.float32).reshape(1, -1)
    while True:
        if first is not None and k <= len(first[0]):
            scores, rows = first[0][:k], first[1][:k]
        elif not search:
            return None
        else:
            found = index.search(query, k)
            scores, rows = found[0][0], found[1][0]
        exhausted = k >= min(index.ntotal, k_max)
        safe = np.where(rows >= 0, rows, 0)
        mask = (rows >= 0) & (scores < threshold) & (row_image[safe] != image_id)
        if category is not None:
            mask &= row_cat[safe] == category
        if not exhausted:
            mask &= scores > scores[-1]
        cand_scores, cand_rows = scores[mask], rows[mask]
        order = np.lexsort((row_sent[cand_rows], -cand_scores))
        cand_scores, cand_rows = cand_scores[order], cand_rows[order]
        usable = np.ones(len(cand_rows), dtype=bool)
        if row_allowed is not None:
            usable &= row_allowed[cand_rows]
        if exclude is not None and len(exclude):
            usable &= ~np.isin(row_text[cand_rows], exclude)
        at = np.flatnonzero(usable)
        _, firsts = np.unique(row_text[cand_rows[at]], return_index=True)
        firsts = np.sort(at[firsts])
        if len(firsts) > want or exhausted:
            cut = firsts[want] if len(firsts) > want else len(cand_rows)
            return [(float(sc), int(row_sent[r]))
                    for sc, r in zip(cand_scores[:cut], cand_rows[:cut], strict=True)]
        k = min(index.ntotal, k_max, k * 2)
