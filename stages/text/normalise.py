"""One normal form for comparing sentences: the rule that decides "the same text".

Used wherever a negative must not be a positive (hard_negatives, shards, `nemo-pipe audit`), so
the stages and the audit can never disagree on what counts as equal.
"""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")
# Articles carry no identity: "woman on left" and "a woman on the left" name the same object,
# so one must never be the other's negative.
ARTICLES = frozenset({"a", "an", "the"})


def normalise_sentence(text: str) -> str:
    """Case-folded, punctuation and invisible characters stripped, articles dropped,
    whitespace collapsed.

    Punctuation is every Unicode character of category P* (ASCII and typographic quotes,
    dashes, ...), removed in place, so "man's" and "mans" compare equal and "left." equals
    "left". Format characters (category Cf: zero-width space, soft hyphen, BOM) are removed
    too: "l\u00adeft" is "left" on screen and to a tokenizer. NFKC first, so full-width and
    composed forms of a letter compare equal; `casefold` so "STRASSE" equals "straße". The
    whole words a / an / the are dropped last. The rule errs towards "the same": a text it
    calls equal to a positive is never published as that positive's negative.

    >>> normalise_sentence("  The man's  LEFT arm, please! ")
    'mans left arm please'
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(ch for ch in text if not unicodedata.category(ch).startswith(("P", "Cf")))
    return " ".join(w for w in _SPACE.split(kept) if w and w not in ARTICLES)
