"""Word forms from lemminflect's lexicon: lemmas, noun number, plurals, articles.

No parser is available (spaCy models and NLTK data cannot be downloaded), so word classes come
from lemminflect (``getAllLemmas``, ``getAllInflections``) plus the closed lists of
:mod:`stages.text.lexicon`. The lookups are memoised: a corpus repeats its words a lot.
"""

from __future__ import annotations

from functools import lru_cache

from lemminflect import getAllInflections, getAllLemmas, getAllLemmasOOV, getInflection

from stages.text.lexicon import (
    FUNCTION_WORDS,
    INVARIANT_NOUNS,
    IRREGULAR_PLURAL,
    IRREGULAR_SINGULAR,
)

__all__ = [
    "article",
    "lemmas",
    "noun_lemma",
    "noun_number",
    "pluralize",
    "singularize",
    "verb_forms",
]


@lru_cache(maxsize=65536)
def lemmas(word: str) -> dict[str, tuple[str, ...]]:
    """Every lemma of ``word`` by universal POS tag ({} for a word lemminflect does not know)."""
    return dict(getAllLemmas(word))


@lru_cache(maxsize=65536)
def verb_forms(word: str, tags: tuple[str, ...]) -> tuple[str, ...]:
    """Verb lemmas of which ``word`` is one of the inflections ``tags`` (e.g. ("VBG",))."""
    out = []
    for lemma in lemmas(word).get("VERB", ()):
        infl = getAllInflections(lemma, upos="VERB")
        if any(word in infl.get(tag, ()) for tag in tags):
            out.append(lemma)
    return tuple(out)


def noun_lemma(word: str | None) -> str | None:
    """Singular form, so that "person" and "people" count as the same head."""
    if word is None:
        return None
    if word in IRREGULAR_SINGULAR:
        return IRREGULAR_SINGULAR[word]
    lem = lemmas(word).get("NOUN")
    if not lem:
        lem = getAllLemmasOOV(word, "NOUN").get("NOUN", (word,))
    return lem[0]


def noun_number(word: str) -> str:
    """"sg", "pl" or "both" (invariant / unknown)."""
    if word in IRREGULAR_SINGULAR:
        return "pl"
    if word in IRREGULAR_PLURAL:
        return "sg"
    if word in INVARIANT_NOUNS:
        return "both"
    lem = lemmas(word).get("NOUN")
    if not lem:
        if word in FUNCTION_WORDS or not word.isalpha():
            return "both"
        lem = getAllLemmasOOV(word, "NOUN").get("NOUN", (word,))
    is_sg = word in lem
    is_pl = any(lemma != word for lemma in lem)
    if is_sg and is_pl:
        return "both"
    return "pl" if is_pl else "sg"


def pluralize(word: str) -> str | None:
    """The plural of a singular noun, or None when lemminflect knows the word but no plural."""
    if word in IRREGULAR_PLURAL:
        return IRREGULAR_PLURAL[word]
    if word in INVARIANT_NOUNS:
        return word
    forms = getAllInflections(word, upos="NOUN").get("NNS")
    if not forms:
        if lemmas(word):
            return None
        forms = getInflection(word, tag="NNS", inflect_oov=True)
    for f in forms or ():
        if f != word:
            return f
    return None


def singularize(word: str) -> str | None:
    """The singular of a plural noun, or None."""
    if word in IRREGULAR_SINGULAR:
        return IRREGULAR_SINGULAR[word]
    if word in INVARIANT_NOUNS:
        return word
    lem = lemmas(word).get("NOUN") or getAllLemmasOOV(word, "NOUN").get("NOUN", ())
    for lemma in lem:
        if lemma != word:
            return lemma
    return None


def article(next_word: str) -> str:
    """"a" or "an" before ``next_word`` (spelling heuristic with the usual exceptions)."""
    w = next_word
    if w.startswith(("one", "uni", "use", "usu", "eu", "uk")):
        return "a"
    if w.startswith(("hour", "honest", "honor", "heir")) or w in ("8", "11", "18", "8th", "11th"):
        return "an"
    return "an" if w[:1] in "aeiou" else "a"
