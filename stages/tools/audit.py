"""`nemo-pipe audit`: an independent check of the published training material.

The audit is an oracle, not a stage: it reads the tables the current config resolves to
(`mosaic_tables`' `mosaic`, `hard_negatives`' `hard_negatives`, the training split of `shards`)
and judges them against ingest's `refs` and `sentences` alone. It imports none of the stages'
selection code, so a bug there cannot hide itself here; the one rule it shares is
`stages.text.normalise.normalise_sentence`, the definition of "the same text".

Checks (a training row is a row of `hard_negatives`, of the shards' training split, or a row of
`mosaic` whose sentence is a training sentence):

- `eval_sentences_as_training_rows`: a training row whose sentence belongs to an evaluation
  split (or is unknown to ingest).
- `eval_sentences_as_negatives`: a hard negative whose source sentence (`neg_source_ids`; the
  shards' `hn_source_ids` since schema 4) belongs to an evaluation split; without a source id
  (shards before schema 4, a null, unknown or -1 id, a misaligned row), a retrieved negative
  (kinds `same_image`, `neighbour`, `neighbour_same_class`) whose normalised text is the text
  of evaluation sentences only. Augmented negatives are edits of the query's own sentence:
  only their source id is checked.
- `eval_images_as_mosaic_negatives`: a mosaic negative image that holds no training referent.
- `positives_as_negatives`: a negative text whose normalised form equals a sentence of the
  query's own referent or of a referent with the same target set (same image, same sorted
  ann_ids; a no-target referent only matches itself).
- `negatives_unlike_their_source`: a hard negative whose source id does not account for its
  text: a retrieved negative whose normalised text is not that of its source sentence, or an
  augmented edit whose source id is not the query's own sentence. Without this a negative could
  carry an evaluation sentence's text under a training sentence's id and pass the checks above.
- `misaligned_negatives`: a row whose kinds or source-id list (`neg_kinds` / `neg_source_ids`,
  `hn_kinds` / `hn_source_ids`) is not as long as its text list, so its negatives cannot be
  matched to their kinds or sources (the stages always write them aligned). Alignment is judged
  row by row: the other rows keep their source ids, and the misaligned row's negatives are
  judged by text as retrieved ones (no kind, no source), so one bad row never turns the checks
  above off for a whole part.
- `duplicate_negatives`: a normalised text or an image id repeated within one row's list
  (counted once per extra occurrence).
- `own_image_negatives`: the query's own image among its mosaic negatives. Same-image text
  negatives are allowed (texts of other referents).
- `k_shortfall`: a row whose `k_shortfall` disagrees with K - len(neg_image_ids), or that holds
  more than K images (K from the mosaic_tables manifest). Rows short of K are information only
  (the pool or tau leaves too few): recorded as `short_rows` / `share_short`, not a finding.

Each check has a status (`ok`, `finding`, `skipped` with why), a count of offending entries, the
number of distinct rows they sit in, per-table counts and a few examples. Everything is
vectorised with pyarrow and numpy and streamed per part file, so a RefCOCO-sized run (~120k
training rows x 800 image ids) needs seconds and one part in memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError, NemoError
from pipeline.io import output_file, table_files
from stages.text.normalise import normalise_sentence

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from pipeline.runner import Pipeline

MAX_EXAMPLES = 5
RETRIEVED_KINDS = frozenset({"same_image", "neighbour", "neighbour_same_class"})
AUDITED_STAGES = ("mosaic_tables", "hard_negatives", "shards")
CHECKS: dict[str, str] = {
    "eval_sentences_as_training_rows":
        "training rows whose sentence is not a training-split sentence",
    "eval_sentences_as_negatives": "hard negatives taken from evaluation-split sentences",
    "eval_images_as_mosaic_negatives":
        "mosaic negative images that hold no training referent",
    "positives_as_negatives":
        "negative texts equal (normalised) to a sentence of the query's own target",
    "negatives_unlike_their_source":
        "hard negatives whose text is not their source sentence's (retrieved) or whose source "
        "is not the query (edits)",
    "misaligned_negatives":
        "rows whose kinds or source-id list is not as long as their negative texts",
    "duplicate_negatives": "a text or image id repeated in one row's negatives",
    "own_image_negatives": "the query's own image among its mosaic negatives",
    "k_shortfall": "k_shortfall disagreeing with len(neg_image_ids), or more than K images",
}
_PAIR = 1 << 31  # (group, text) pairs packed into one int64
DENSE_IDS = 1 << 28  # image ids below this are looked up in a dense table


@dataclass
class Check:
    """One check's verdict; `count` offending entries in `rows` distinct training rows."""

    name: str
    description: str
    status: str = "skipped"  # ok | finding | skipped
    why: str = ""
    count: int = 0
    rows: int = 0
    by_table: dict[str, int] = field(default_factory=dict)
    audited: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuditResult:
    dataset: str
    work_dir: str
    artifacts: dict[str, dict[str, Any]]
    checks: list[Check]

    @property
    def findings(self) -> int:
        return sum(c.status == "finding" for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 1 if self.findings else 0

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "work_dir": self.work_dir,
                "artifacts": self.artifacts, "findings": self.findings,
                "checks": [asdict(c) for c in self.checks]}


# -- entry points -----------------------------------------------------------------------------
def audit_command(dataset: str, work_dir: Path | None = None, config: Path | None = None,
                  sets: Sequence[str] = (), data_root: Path | None = None,
                  images: Path | None = None, json_out: Path | None = None) -> AuditResult:
    """`nemo-pipe audit --dataset D [--json OUT]`: open the pipeline as the CLI does, audit,
    and write the JSON report (via a temp file and a rename) when asked."""
    from pipeline.api import open_pipeline
    from stages.refer.manifests import load_data_manifest

    pipe = open_pipeline(dataset, work_dir, config, sets, data_root, images, progress=False)
    result = run_audit(pipe, train_split=load_data_manifest(dataset).train_split)
    if json_out is not None:
        with output_file(Path(json_out), "audit JSON", "--json path") as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result


def run_audit(pipe: Pipeline, train_split: str | None = None,
              max_examples: int = MAX_EXAMPLES) -> AuditResult:
    """Audit what `pipe`'s current config resolves to. InputError (exit 2) when nothing of
    mosaic_tables, hard_negatives and shards is built, or ingest is missing."""
    dataset = pipe.env.dataset
    if train_split is None:
        train_split = _train_split(dataset)
    states = {row.name: row for row in pipe.status()}
    built = {s: pipe.artifact_dir(s) for s in ("ingest", *AUDITED_STAGES)
             if s in states and states[s].state == "done"}
    hint = f"nemo-pipe run --stage shards --dataset {dataset}"
    corrupt = [s for s in ("ingest", *AUDITED_STAGES)
               if s in states and states[s].state == "corrupt"]
    if corrupt:  # a damaged table is no evidence either way: never a clean or skipped check
        raise InputError(
            f"cannot audit {dataset}: {', '.join(corrupt)} under the current config is corrupt "
            f"({states[corrupt[0]].note}); rebuild it with `nemo-pipe run --stage {corrupt[-1]} "
            f"--dataset {dataset}` (a corrupt artifact is rebuilt), then audit again")
    if not any(s in built for s in AUDITED_STAGES):
        why = ", ".join(f"{s} {states[s].state}" for s in AUDITED_STAGES if s in states)
        notes = [states[s].note for s in AUDITED_STAGES
                 if s in states and states[s].state == "unresolved"]
        why += f": {notes[0]}" if notes else ""
        raise InputError(
            f"nothing to audit for {dataset} under {pipe.env.work_dir}: mosaic_tables, "
            f"hard_negatives and shards are not built under the current config ({why}); run "
            f"`{hint}` (with the same --config/--set options) first")
    if "ingest" not in built:
        raise InputError(
            f"cannot audit {dataset}: ingest (the ground truth: refs and sentences) is not "
            f"built under the current config; run `nemo-pipe run --stage ingest --dataset "
            f"{dataset}` first")
    artifacts = {s: {"key": states[s].key, "dir": str(d)} for s, d in built.items()}
    truth = _Truth(built["ingest"], train_split)
    audit = _Audit(truth, max_examples)
    audit.run(pipe, built, states, train_split, artifacts)
    return AuditResult(dataset, str(pipe.env.work_dir), artifacts, audit.finish())


def _train_split(dataset: str) -> str:
    try:
        from stages.refer.manifests import load_data_manifest

        return load_data_manifest(dataset).train_split
    except NemoError:
        return "train"


# -- the ground truth -------------------------------------------------------------------------
class _Truth:
    """Ingest's refs and sentences as sorted numpy lookups, plus a text vocabulary that maps
    any string to the id of its normalised form (the sentences' forms come first)."""

    def __init__(self, ingest_dir: Path, train_split: str) -> None:
        import numpy as np

        refs = _read(ingest_dir / "refs", ["ref_id", "image_id", "ann_ids", "split"])
        sents = _read(ingest_dir / "sentences", ["sent_id", "ref_id", "sent"])
        ref_ids = _ints(refs.column("ref_id"))
        ref_image = _ints(refs.column("image_id"))
        ref_split = refs.column("split").to_pylist()
        groups: dict[tuple[Any, ...], int] = {}
        ref_group = np.empty(len(ref_ids), np.int64)
        for i, (rid, img, anns) in enumerate(zip(ref_ids.tolist(), ref_image.tolist(),
                                                 refs.column("ann_ids").to_pylist(),
                                                 strict=True)):
            key = ("targets", img, *sorted(anns)) if anns else ("no target", rid)
            ref_group[i] = groups.setdefault(key, len(groups))
        ref_train = np.array([s == train_split for s in ref_split], bool)
        self.train_images = np.unique(ref_image[ref_train])
        self._train_table: np.ndarray | None = None
        self.image_splits: dict[int, set[str]] = {}
        for img, s in zip(ref_image.tolist(), ref_split, strict=True):
            self.image_splits.setdefault(img, set()).add(s)

        order = np.argsort(_ints(sents.column("sent_id")), kind="stable")
        sents = sents.take(order)
        self.sent_ids = _ints(sents.column("sent_id"))
        self.sent_text = sents.column("sent").to_pylist()
        ref_pos = _lookup(np.sort(ref_ids), _ints(sents.column("ref_id")))
        by_sorted = np.argsort(ref_ids, kind="stable")
        known = ref_pos >= 0
        rp = np.where(known, by_sorted[np.maximum(ref_pos, 0)], 0)
        self.sent_train = known & ref_train[rp]
        self.sent_image = np.where(known, ref_image[rp], -1)
        self.sent_group = np.where(known, ref_group[rp], len(groups) + np.arange(len(rp)))
        self.sent_split = [ref_split[r] if k else "?" for r, k in zip(rp.tolist(),
                                                                      known.tolist(), strict=True)]

        self._raw: dict[str, int] = {}
        self._norm: dict[str, int] = {}
        self.sent_norm = self.norm_ids(sents.column("sent").combine_chunks())
        n = len(self._norm)
        self.train_text = np.zeros(n, bool)
        self.eval_text = np.zeros(n, bool)
        has_text = self.sent_norm >= 0
        self.train_text[self.sent_norm[has_text & self.sent_train]] = True
        self.eval_text[self.sent_norm[has_text & ~self.sent_train]] = True
        self.positive_pairs = np.unique((self.sent_group * _PAIR + self.sent_norm)[has_text])

    def sentence_pos(self, sent_ids: np.ndarray) -> np.ndarray:
        """Row of each sentence id in the truth arrays, -1 when ingest does not know it."""
        return _lookup(self.sent_ids, sent_ids)

    def norm_ids(self, values: pa.Array) -> np.ndarray:
        """The normalised-text id of every string (-1 for null); each distinct string is
        normalised once, however often it occurs."""
        import numpy as np
        import pyarrow.compute as pc

        uniq = pc.unique(values).drop_null()
        ids = np.fromiter((self._norm_id(s) for s in uniq.to_pylist()), np.int64, len(uniq))
        pos = _ints(pc.index_in(values, value_set=uniq).fill_null(-1))
        return np.where(pos >= 0, ids[np.maximum(pos, 0)] if len(ids) else -1, -1)

    def _norm_id(self, raw: str) -> int:
        found = self._raw.get(raw)
        if found is None:
            norm = normalise_sentence(raw)
            found = self._raw[raw] = self._norm.setdefault(norm, len(self._norm))
        return found

    def text_is(self, mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """mask[ids] where the id is a sentence text's; False for other texts and nulls."""
        import numpy as np

        inside = (ids >= 0) & (ids < len(mask))
        return inside & mask[np.where(inside, ids, 0)]

    def is_train_image(self, image_ids: np.ndarray) -> np.ndarray:
        """Whether each image holds a training referent: a dense table over the ids when
        they are small (COCO's are), else a binary search."""
        import numpy as np

        top = int(self.train_images[-1]) if len(self.train_images) else -1
        if not 0 <= top < DENSE_IDS or int(self.train_images[0]) < 0:
            return _lookup(self.train_images, image_ids) >= 0
        if self._train_table is None:
            self._train_table = np.zeros(top + 1, bool)
            self._train_table[self.train_images] = True
        inside = (image_ids >= 0) & (image_ids <= top)
        return inside & self._train_table[np.where(inside, image_ids, 0)]


# -- the checks -------------------------------------------------------------------------------
class _Audit:
    def __init__(self, truth: _Truth, max_examples: int) -> None:
        self.t = truth
        self.max_examples = max_examples
        self.checks = {name: Check(name, desc) for name, desc in CHECKS.items()}
        self.rows: dict[str, set[tuple[str, int]]] = {name: set() for name in CHECKS}
        self.short = {"rows": 0, "of": 0}
        self.k: int | None = None
        self.text_negatives = 0

    def run(self, pipe: Pipeline, built: dict[str, Path], states: dict[str, Any],
            train_split: str, artifacts: dict[str, dict[str, Any]]) -> None:
        text_sources, image_sources = [], []
        if "mosaic_tables" in built:
            self.k = _manifest(built["mosaic_tables"]).get("params", {}).get("k")
            parts = table_files(built["mosaic_tables"] / "mosaic")
            rows = 0
            for part in parts:
                rows += self._mosaic_part(part)
            artifacts["mosaic_tables"]["training_rows"] = rows
            image_sources.append("mosaic")
        if "hard_negatives" in built:
            t = _read(built["hard_negatives"] / "hard_negatives",
                      ["sent_id", "neg_texts", "neg_kinds", "neg_source_ids"])
            sent_ids = _ints(t.column("sent_id"))
            self._training_rows("hard_negatives", sent_ids)
            self._texts("hard_negatives", sent_ids, t.column("neg_texts"),
                        t.column("neg_kinds"), t.column("neg_source_ids"))
            artifacts["hard_negatives"]["training_rows"] = len(sent_ids)
            text_sources.append("hard_negatives")
        if "shards" in built:
            manifest = _manifest(built["shards"])
            k = (manifest.get("upstream_artifacts", {}).get("mosaic_tables", {})
                 .get("params", {}).get("k", self.k))
            table = f"shards/{train_split}"
            rows = 0
            for part in table_files(built["shards"] / train_split):
                rows += self._shards_part(table, part, k)
            artifacts["shards"]["training_rows"] = rows
            text_sources.append(table)
            image_sources.append(table)
            self.k = self.k if self.k is not None else k
        self._skips(built, states, text_sources, image_sources)

    def finish(self) -> list[Check]:
        for name, c in self.checks.items():
            c.rows = len(self.rows[name])
            if c.status != "skipped":
                c.status = "finding" if c.count else "ok"
        k = self.checks["k_shortfall"]
        if k.status != "skipped":
            n = self.short["of"]
            k.info = {"k": self.k, "short_rows": self.short["rows"], "rows": n,
                      "share_short": round(self.short["rows"] / n, 4) if n else 0.0}
        return list(self.checks.values())

    def _skips(self, built: dict[str, Path], states: dict[str, Any], text_sources: list[str],
               image_sources: list[str]) -> None:
        def state(s: str) -> str:
            return f"{s} {states[s].state}" if s in states else f"no stage {s}"

        no_text = (f"no hard negatives to audit ({state('hard_negatives')}, "
                   f"{state('shards')} under the current config)")
        if text_sources and not self.text_negatives:
            no_text = (f"no hard-negative texts in {', '.join(text_sources)} (hard negatives "
                       "not included: shards.with_hard_negatives and "
                       "shards.same_image_negatives off, or no row has one)")
        no_image = (f"no mosaic negatives to audit ({state('mosaic_tables')}, "
                    f"{state('shards')} under the current config)")
        for name, c in self.checks.items():
            c.status = "ok"
            text_check = name in ("eval_sentences_as_negatives", "positives_as_negatives")
            if (text_check and not self.text_negatives) or (
                    name == "misaligned_negatives" and not text_sources):
                c.status, c.why = "skipped", no_text
            elif name in ("eval_images_as_mosaic_negatives", "own_image_negatives",
                          "k_shortfall") and not image_sources:
                c.status, c.why = "skipped", no_image
            elif name == "duplicate_negatives" and not image_sources and not self.text_negatives:
                c.status, c.why = "skipped", f"{no_text}; {no_image}"
            elif name == "eval_sentences_as_training_rows" and not (
                    {"hard_negatives", "shards"} & set(built)):
                c.status, c.why = "skipped", (
                    f"{state('hard_negatives')}, {state('shards')} under the current config "
                    "(mosaic's training rows are by definition its rows of training sentences)")

    # -- per table ------------------------------------------------------------------------
    def _mosaic_part(self, part: Path) -> int:
        """Only rows of training sentences are training material (shards take the training
        split's rows; `negatives.query_splits` may add others)."""
        import numpy as np
        import pyarrow as pa

        t = _read(part, ["sent_id", "image_id", "neg_image_ids", "k_shortfall"])
        sent_ids = _ints(t.column("sent_id"))
        pos = self.t.sentence_pos(sent_ids)
        train = (pos >= 0) & self.t.sent_train[np.maximum(pos, 0)]
        t = t.filter(pa.array(train))
        sent_ids = sent_ids[train]
        self._images("mosaic", sent_ids, _ints(t.column("image_id")), t.column("neg_image_ids"),
                     _ints(t.column("k_shortfall")), self.k)
        return len(sent_ids)

    def _shards_part(self, table: str, part: Path, k: int | None) -> int:
        import pyarrow.parquet as pq

        try:  # shards schema >= 4 name each negative's source sentence
            sources = [c for c in ("hn_source_ids",) if c in pq.read_schema(part).names]
        except Exception:  # noqa: BLE001 - unreadable: `_read` says so below
            sources = []
        t = _read(part, ["sent_id", "image_id", "neg_image_ids", "k_shortfall", "hn_texts",
                         "hn_kinds", *sources])
        sent_ids = _ints(t.column("sent_id"))
        self._training_rows(table, sent_ids)
        self._images(table, sent_ids, _ints(t.column("image_id")), t.column("neg_image_ids"),
                     _ints(t.column("k_shortfall")), k)
        self._texts(table, sent_ids, t.column("hn_texts"), t.column("hn_kinds"),
                    t.column(sources[0]) if sources else None)
        return len(sent_ids)

    def _training_rows(self, table: str, sent_ids: np.ndarray) -> None:
        import numpy as np

        pos = self.t.sentence_pos(sent_ids)
        bad = np.flatnonzero((pos < 0) | ~self.t.sent_train[np.maximum(pos, 0)])
        _tally(self.checks["eval_sentences_as_training_rows"], f"{table} rows", len(sent_ids))
        self._add("eval_sentences_as_training_rows", table, sent_ids[bad], lambda i: {
            "sent_id": int(sent_ids[bad[i]]), **self._sentence(pos[bad[i]])})

    def _texts(self, table: str, sent_ids: np.ndarray, texts: Any, kinds: Any,
               sources: Any | None) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        t = self.t
        lengths, flat_texts = _flat(texts)
        kind_lengths, flat_kinds = _flat(kinds)
        src_lengths, flat_src = _flat(sources) if sources is not None else (lengths, None)
        # Row by row: a row whose lists disagree in length is a finding of its own, and only
        # its negatives lose their kinds and sources (judged by text, as retrieved ones).
        bad_rows = np.flatnonzero((kind_lengths != lengths) | (src_lengths != lengths))
        _tally(self.checks["misaligned_negatives"], f"{table} rows", len(sent_ids))
        self._add("misaligned_negatives", table, sent_ids[bad_rows], lambda j: {
            "sent_id": int(sent_ids[bad_rows[j]]), "texts": int(lengths[bad_rows[j]]),
            "kinds": int(kind_lengths[bad_rows[j]]),
            **({"source_ids": int(src_lengths[bad_rows[j]])} if sources is not None else {})})
        n = int(lengths.sum())
        if not n:
            return
        self.text_negatives += n
        row = np.repeat(np.arange(len(sent_ids)), lengths)
        norm = t.norm_ids(flat_texts)
        at, aligned = _aligned_positions(lengths, kind_lengths)
        flat_kinds = (pc.if_else(pa.array(aligned), flat_kinds.take(pa.array(at)),
                                 pa.scalar(None, pa.string())) if aligned.any()
                      else pa.nulls(n, pa.string()))  # no kind: may be a retrieved one
        kind = flat_kinds.to_pylist()
        retrieved = np.asarray(pc.is_in(flat_kinds, value_set=pa.array(sorted(RETRIEVED_KINDS)))
                               .to_numpy(zero_copy_only=False), bool) | np.asarray(
            flat_kinds.is_null().to_numpy(zero_copy_only=False), bool)
        pos = t.sentence_pos(sent_ids)
        qpos = pos[row]
        known = qpos >= 0
        text_of = flat_texts.to_pylist()

        def example(i: int, **extra: Any) -> dict[str, Any]:
            return {"sent_id": int(sent_ids[row[i]]),
                    "sent": t.sent_text[qpos[i]] if known[i] else None,
                    "negative": text_of[i], "kind": kind[i], **extra}

        for name in ("eval_sentences_as_negatives", "positives_as_negatives",
                     "negatives_unlike_their_source", "duplicate_negatives"):
            _tally(self.checks[name], f"{table} texts", n)

        # Evaluation sentences: by source id where it names a known sentence, else by text.
        src_pos = np.full(n, -1, np.int64)
        if flat_src is not None:
            at, aligned = _aligned_positions(lengths, src_lengths)
            if aligned.any():
                src_ids = np.where(aligned, _ints(flat_src)[at], -1)
                src_pos = np.where(aligned, t.sentence_pos(src_ids), -1)
        by_source = src_pos >= 0
        leak_src = by_source & ~t.sent_train[np.maximum(src_pos, 0)]
        leak_text = (~by_source & retrieved & t.text_is(t.eval_text, norm)
                     & ~t.text_is(t.train_text, norm))
        bad = np.flatnonzero(leak_src | leak_text)
        self._add("eval_sentences_as_negatives", table, sent_ids[row[bad]], lambda j: example(
            bad[j], **({"source_id": int(t.sent_ids[src_pos[bad[j]]]),
                        "source_split": t.sent_split[src_pos[bad[j]]]} if by_source[bad[j]]
                       else {"equals_only": "evaluation sentences"})))

        # Sources: a retrieved text is its source sentence's; an edit's source is the query.
        src_norm = np.where(by_source, t.sent_norm[np.maximum(src_pos, 0)], -1)
        query_id = sent_ids[row]
        src_id = np.where(by_source, t.sent_ids[np.maximum(src_pos, 0)], -1)
        unlike = by_source & np.where(retrieved, src_norm != norm, src_id != query_id)
        bad = np.flatnonzero(unlike)
        self._add("negatives_unlike_their_source", table, sent_ids[row[bad]], lambda j: example(
            bad[j], source_id=int(src_id[bad[j]]),
            source_sent=t.sent_text[src_pos[bad[j]]]))

        # Positives: (target group of the query, normalised text) among the sentences' pairs.
        group = np.where(known, t.sent_group[np.maximum(qpos, 0)], -1)
        pairs = group * _PAIR + norm
        bad = np.flatnonzero(known & (norm >= 0) & np.isin(pairs, t.positive_pairs))
        self._add("positives_as_negatives", table, sent_ids[row[bad]],
                  lambda j: example(bad[j]))

        # Duplicates: the same normalised text twice in one row.
        dup = _repeats(row, norm, valid=norm >= 0)
        self._add("duplicate_negatives", table, sent_ids[row[dup]],
                  lambda j: example(dup[j], duplicate="text"))

    def _images(self, table: str, sent_ids: np.ndarray, row_image: np.ndarray, neg: Any,
                k_shortfall: np.ndarray, k: int | None) -> None:
        import numpy as np

        t = self.t
        lengths, flat = _flat(neg)
        images = _ints(flat)
        row = np.repeat(np.arange(len(sent_ids)), lengths)
        pos = t.sentence_pos(sent_ids)
        own = np.where(pos >= 0, t.sent_image[np.maximum(pos, 0)], row_image)
        n = len(images)
        for name in ("eval_images_as_mosaic_negatives", "duplicate_negatives",
                     "own_image_negatives"):
            _tally(self.checks[name], f"{table} images", n)

        def example(i: int, **extra: Any) -> dict[str, Any]:
            img = int(images[i])
            return {"sent_id": int(sent_ids[row[i]]), "image_id": int(own[row[i]]),
                    "negative_image_id": img, **extra}

        bad = np.flatnonzero(~t.is_train_image(images))
        self._add("eval_images_as_mosaic_negatives", table, sent_ids[row[bad]],
                  lambda j: example(bad[j], negative_image_splits=sorted(
                      t.image_splits.get(int(images[bad[j]]), {"unknown to ingest"}))))
        dup = _repeats(row, images, valid=np.ones(n, bool))
        self._add("duplicate_negatives", table, sent_ids[row[dup]],
                  lambda j: example(dup[j], duplicate="image"))
        bad = np.flatnonzero(images == own[row])
        self._add("own_image_negatives", table, sent_ids[row[bad]], lambda j: example(bad[j]))

        c = self.checks["k_shortfall"]
        _tally(c, f"{table} rows", len(sent_ids))
        if k is None or k == "all":  # k=all: K is the whole pool, nothing to check against
            return
        expected = np.maximum(0, int(k) - lengths)
        bad_rows = np.flatnonzero((k_shortfall != expected) | (lengths > int(k)))
        self._add("k_shortfall", table, sent_ids[bad_rows], lambda j: {
            "sent_id": int(sent_ids[bad_rows[j]]), "neg_image_ids": int(lengths[bad_rows[j]]),
            "k_shortfall": int(k_shortfall[bad_rows[j]]), "k": int(k)})
        self.short["rows"] += int((lengths < int(k)).sum())
        self.short["of"] += len(sent_ids)

    # -- bookkeeping ----------------------------------------------------------------------
    def _add(self, name: str, table: str, row_sent_ids: np.ndarray, example: Any) -> None:
        """Count the offending entries (one per element of `row_sent_ids`, the sentence id of
        the row each sits in) and keep the first examples."""
        import numpy as np

        n = len(row_sent_ids)
        if not n:
            return
        c = self.checks[name]
        c.count += n
        c.by_table[table] = c.by_table.get(table, 0) + n
        self.rows[name].update((table, s) for s in np.unique(row_sent_ids).tolist())
        for j in range(min(n, self.max_examples - len(c.examples))):
            c.examples.append({"table": table, **example(j)})

    def _sentence(self, pos: int) -> dict[str, Any]:
        if pos < 0:
            return {"split": "unknown to ingest"}
        return {"sent": self.t.sent_text[pos], "split": self.t.sent_split[pos]}


# -- helpers ----------------------------------------------------------------------------------
def _tally(c: Check, what: str, n: int) -> None:
    c.audited[what] = c.audited.get(what, 0) + n


def _read(path: Path, columns: list[str]) -> pa.Table:
    """A table dir or one part file, only `columns`; a missing or unreadable one is an
    InputError naming it (the audit never ends in a traceback on a bad artifact)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.is_dir():
            parts = table_files(path)
            if not parts:
                raise FileNotFoundError(f"no part-*.parquet files in {path}")
            return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])
        return pq.read_table(path, columns=columns)
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
        raise InputError(f"cannot audit {path}: {exc}; rebuild that stage (`nemo-pipe run "
                         "--force --stage ...`) or check it with `nemo-pipe verify`") from None


def _manifest(artifact_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((artifact_dir / "_manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {artifact_dir / '_manifest.json'}: {exc}; check it "
                         "with `nemo-pipe verify`") from None


def _ints(col: Any) -> np.ndarray:
    import numpy as np
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        col = col.fill_null(-1)
    return np.asarray(col.to_numpy(zero_copy_only=False), np.int64)


def _flat(col: Any) -> tuple[np.ndarray, pa.Array]:
    """Per-row list lengths (0 for a null list) and the flattened values."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lengths = np.asarray(pc.list_value_length(col).fill_null(0).to_numpy(
        zero_copy_only=False), np.int64)
    return lengths, pc.list_flatten(col)


def _aligned_positions(lengths: np.ndarray, other_lengths: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """For every flattened entry of a list column with per-row `lengths`: the position of the
    same row's same index in another list column with `other_lengths`, and whether that row's
    two lists are as long (where not, the position is 0 and must not be used)."""
    import numpy as np

    row = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(int(lengths.sum())) - (np.cumsum(lengths) - lengths)[row]
    aligned = (other_lengths == lengths)[row]
    return np.where(aligned, (np.cumsum(other_lengths) - other_lengths)[row] + within, 0), aligned


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each id in `sorted_ids`, -1 where absent."""
    import numpy as np

    if not len(sorted_ids):
        return np.full(len(ids), -1, np.int64)
    pos = np.searchsorted(sorted_ids, ids)
    pos = np.minimum(pos, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)


def _repeats(row: np.ndarray, value: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Flat positions of every repeat of a (row, value) pair after its first occurrence."""
    import numpy as np

    idx = np.flatnonzero(valid)
    if len(idx) < 2:
        return np.empty(0, np.int64)
    r, v = row[idx], value[idx]
    if v.min() >= 0 and v.max() < (1 << 32) and r.max() < (1 << 31):
        packed = np.sort((r.astype(np.int64) << 32) | v)  # one key: 3x faster than lexsort
        if not (packed[1:] == packed[:-1]).any():
            return np.empty(0, np.int64)
    order = idx[np.lexsort((v, r))]  # stable: first occurrence first
    same = (row[order][1:] == row[order][:-1]) & (value[order][1:] == value[order][:-1])
    return np.sort(order[1:][same])


# -- output -----------------------------------------------------------------------------------
def example_text(example: dict[str, Any]) -> str:
    """One example on one line: `table: key=value, ...`."""
    rest = ", ".join(f"{k}={v!r}" for k, v in example.items() if k != "table")
    return f"{example.get('table', '?')}: {rest}"


def check_detail(c: Check) -> str:
    """What a check looked at, or why it was skipped, plus its information fields."""
    if c.status == "skipped":
        return c.why
    audited = ", ".join(f"{n:,} {what}" for what, n in c.audited.items()) or "nothing"
    text = f"audited {audited}"
    if c.by_table:
        text += "; found in " + ", ".join(f"{t}: {n:,}" for t, n in c.by_table.items())
    if c.name == "k_shortfall" and c.info:
        text += (f"; K = {c.info['k']}: {c.info['short_rows']:,} of {c.info['rows']:,} rows "
                 f"short of K ({c.info['share_short']:.1%}, information)")
    return text


def format_audit(result: AuditResult) -> str:
    """A plain-text table, one line per check, then the examples of each finding."""
    lines = [f"audit of {result.dataset} ({result.work_dir}): "
             + ", ".join(f"{s} {a['key']}" for s, a in result.artifacts.items())]
    width = max(len(c.name) for c in result.checks)
    lines.append(f"{'check':<{width}}  {'status':<8} {'count':>9} {'rows':>8}  detail")
    for c in result.checks:
        lines.append(f"{c.name:<{width}}  {c.status:<8} {c.count:>9,} {c.rows:>8,}  "
                     f"{check_detail(c)}")
    for c in result.checks:
        if c.status == "finding":
            lines.append(f"\n{c.name}: {c.description} ({c.count:,} in {c.rows:,} rows), e.g.")
            lines.extend(f"  {example_text(e)}" for e in c.examples)
    lines.append(f"\n{result.findings} check(s) with findings" if result.findings
                 else "\nno findings")
    return "\n".join(lines)
