"""One normal form for comparing sentences: the rule that decides "the same text".

Used wherever a negative must not be a positive (hard_negatives, shards, `nemo-pipe audit`), so
the stages and the audit can never disagree on what counts as equal.
"""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")


def normalise_sentence(text: str) -> str:
    """Lowercase, punctuation stripped, whitespace collapsed.

    Punctuation is every Unicode character of category P* (ASCII and typographic quotes,
    dashes, ...), removed in place, so "man's" and "mans" compare equal and "left." equals
    "left". NFKC first, so full-width and composed forms of a letter compare equal too.

    >>> normalise_sentence("  The man's  LEFT arm, please! ")
    'the mans left arm please'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    kept = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return _SPACE.sub(" ", kept).strip()
