"""Multi-view expressions as training expressions: which views are valid, and their REFER form.

The `multiview` stage writes one `views` row per produced view of an instance (ref_id, image_id,
ann_id, view, text, ...) and one `failures` row per failed request (image_id, ann_ids, reason).
Two consumers turn them into training expressions: the `shards` stage (`shards.with_views`, for
`NemoDataset(expressions=...)`) and `nemo-pipe export-refer` (extra REFER sentences). Both take
the views through :func:`valid_views`, so they agree on what a valid view is, and the export
writes sentences with :func:`refer_sentence`, the record REFER stores (leaving out a view with no
REFER token at all, only symbols, which would be an empty REFER sentence).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from stages.text.normalise import normalise_sentence


def valid_views(views: Iterable[Mapping[str, Any]], failures: Iterable[Mapping[str, Any]],
                view_order: Iterable[str]) -> dict[int, list[tuple[str, str]]]:
    """`(view name, text)` per ref_id, in `view_order` (then by text), of the valid views only.

    Valid: a row of `views` whose instance (image_id, ann_id) has no `failures` row (the stage
    never writes views of a failed instance; a table that says both is not trusted), whose text
    is not blank, and whose text is not (normalised) a repeat of an earlier view of the same
    ref, so one generated text never counts twice in a draw. Texts are stripped of surrounding
    whitespace.
    """
    failed = {(int(f["image_id"]), int(a)) for f in failures for a in (f["ann_ids"] or [])}
    rank = {v: i for i, v in enumerate(view_order)}
    by_ref: dict[int, list[tuple[int, str, str]]] = {}
    for row in views:
        text = (row["text"] or "").strip()
        if not text or (int(row["image_id"]), int(row["ann_id"])) in failed:
            continue
        view = str(row["view"])
        by_ref.setdefault(int(row["ref_id"]), []).append((rank.get(view, len(rank)), view, text))
    out: dict[int, list[tuple[str, str]]] = {}
    for ref_id, items in sorted(by_ref.items()):
        seen: set[str] = set()
        kept = []
        for _, view, text in sorted(items):
            norm = normalise_sentence(text)
            if norm and norm not in seen:
                seen.add(norm)
                kept.append((view, text))
        if kept:
            out[ref_id] = kept
    return out


def refer_tokens(raw: str) -> list[str]:
    """The tokens REFER stores for a raw expression: lowercase, punctuation removed.

    After NFKC (full-width and composed forms of a letter become one) and `lower`, a token is a
    run of letters, digits and combining marks (Unicode categories L*, N*, M*) in any script;
    every other character (punctuation, symbols, whitespace) is a word break, and format
    characters (Cf: soft hyphen, zero-width space) are dropped in place. On ASCII this is
    REFER's rule, every character other than a-z and 0-9 a break ("Man's shirt." -> ["man",
    "s", "shirt"]); beyond it no letter is lost ("the café" -> ["the", "café"], "左边的猫" ->
    ["左边的猫"]). The record's `sent` is the tokens joined with single spaces. The synthetic
    demo data writes its sentences with this same function."""
    chars = []
    for ch in unicodedata.normalize("NFKC", raw).lower():
        cat = unicodedata.category(ch)
        if cat[0] in "LNM":
            chars.append(ch)
        elif cat != "Cf":
            chars.append(" ")
    return "".join(chars).split()


def refer_sentence(raw: str, sent_id: int) -> dict[str, Any]:
    """A sentence record as REFER's refs pickle holds it: tokens, raw, sent_id, sent."""
    tokens = refer_tokens(raw)
    return {"tokens": tokens, "raw": raw, "sent_id": int(sent_id), "sent": " ".join(tokens)}
