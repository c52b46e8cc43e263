"""Which texts may be a query's hard negative: the one rule hard_negatives and shards share.

A candidate negative text for a training query is dropped for the first of these reasons that
applies (the reason names are the manifest's counters):

- ``dropped_eval_split``: it is a sentence of a ref whose split is not among the allowed source
  splits (by default the training split only). An image that holds train and val referents stays
  usable; only its evaluation sentences are barred. One evaluation sentence in a training batch
  invalidates a reported test number.
- ``dropped_positive_text``: its normalised form (:func:`normalise_sentence`) equals that of a
  sentence of the query's own referent: the query's ref, or any ref with the same non-empty target
  set (gRefCOCO has several refs per target set). A positive shown as a negative teaches the model
  the opposite of the truth.
- ``dropped_duplicate_text``: its normalised form equals a text already taken for this query.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any

from stages.text.normalise import normalise_sentence

EVAL_SPLIT = "dropped_eval_split"
POSITIVE_TEXT = "dropped_positive_text"
DUPLICATE_TEXT = "dropped_duplicate_text"
DROP_REASONS = (EVAL_SPLIT, POSITIVE_TEXT, DUPLICATE_TEXT)


def drop_reason(in_source_splits: bool, norm: str, positives: Container[str],
                taken: Container[str]) -> str | None:
    """Why a candidate (normalised text `norm`) may not be taken, or None: the reason order
    every stage uses, so their counts agree."""
    if not in_source_splits:
        return EVAL_SPLIT
    if norm in positives:
        return POSITIVE_TEXT
    if norm in taken:
        return DUPLICATE_TEXT
    return None


class TextRules:
    """Per-dataset lookups for :func:`drop_reason`: normalised sentences, the sentences of the
    allowed splits, and each referent's positive texts.

    refs: ref_id -> ref row (``split``, ``ann_ids``); sent_ref: sent_id -> ref_id;
    sent_text: sent_id -> text; source_splits: the splits negatives may come from.
    """

    def __init__(self, refs: dict[int, dict[str, Any]], sent_ref: dict[int, int],
                 sent_text: dict[int, str], source_splits: Iterable[str]) -> None:
        splits = set(source_splits)
        self._norm_cache: dict[str, str] = {}
        self.norm = {sid: self.normalise(t) for sid, t in sent_text.items()}
        self.allowed = frozenset(s for s, r in sent_ref.items() if refs[r]["split"] in splits)
        self._sents_of_ref: dict[int, list[int]] = {}
        for sid, rid in sent_ref.items():
            self._sents_of_ref.setdefault(rid, []).append(sid)
        self._refs = refs
        self._same_targets: dict[tuple[int, ...], list[int]] = {}
        for rid, ref in refs.items():
            if ref["ann_ids"]:
                self._same_targets.setdefault(tuple(sorted(ref["ann_ids"])), []).append(rid)
        self._positives: dict[int, frozenset[str]] = {}

    def normalise(self, text: str) -> str:
        """:func:`normalise_sentence`, memoised (a corpus repeats its short texts a lot)."""
        out = self._norm_cache.get(text)
        if out is None:
            out = self._norm_cache[text] = normalise_sentence(text)
        return out

    def same_referent(self, ref_id: int) -> list[int]:
        """The ref itself and every ref with the same non-empty target set (a no-target ref is
        only itself)."""
        ann_ids = self._refs[ref_id]["ann_ids"]
        return self._same_targets[tuple(sorted(ann_ids))] if ann_ids else [ref_id]

    def positives(self, ref_id: int) -> frozenset[str]:
        """Normalised sentences of the referent (every split: a positive is one wherever it is)."""
        if ref_id not in self._positives:
            self._positives[ref_id] = frozenset(
                self.norm[s] for r in self.same_referent(ref_id)
                for s in self._sents_of_ref.get(r, []))
        return self._positives[ref_id]

    def keep_sentences(self, sent_ids: Iterable[int], positives: Container[str],
                       drops: dict[str, int] | None = None) -> list[int]:
        """`sent_ids` in order minus every one a rule drops; each drop counted in `drops`."""
        kept: list[int] = []
        taken: set[str] = set()
        for s in sent_ids:
            reason = drop_reason(s in self.allowed, self.norm[s], positives, taken)
            if reason is not None:
                if drops is not None:
                    drops[reason] = drops.get(reason, 0) + 1
                continue
            taken.add(self.norm[s])
            kept.append(s)
        return kept
