"""stages.text.lexicon is the one copy of the text rules' word lists.

Three kinds of evidence: the modules hold the very same objects (identity, not equal copies);
a word that only one of the former copies had is now handled the same way by every reader
(behaviour, against hand-written expectations); and no module under stages/text spells out a
list of its own that repeats one of the lexicon's (a guard against the next copy).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from stages.text import (
    class_extract,
    distractor_edits,
    distractor_rules,
    lexicon,
    morphology,
    phrases,
    positional,
)
from stages.text.class_extract import candidate_nouns, extract_class
from stages.text.distractor_rules import generate, head_noun
from stages.text.positional import positional_words


def test_readers_share_the_lexicon_objects() -> None:
    # positional words: the mosaic quadrants and the distractor geometry rule
    assert positional.WORD_FORMS is lexicon.POSITION_FORMS
    assert positional._HOURS.keys() >= set(lexicon.HOUR_WORDS)
    assert distractor_rules.positional_words is positional.positional_words
    # prepositions, -ing nouns: class extraction and the distractor rules
    assert class_extract.PREPOSITIONS is lexicon.PREPOSITIONS
    assert phrases.PREPOSITIONS is lexicon.PREPOSITIONS
    assert distractor_edits.PREPOSITIONS is lexicon.PREPOSITIONS
    assert class_extract.ING_NOUNS is lexicon.ING_NOUNS
    assert phrases.ING_NOUNS is lexicon.ING_NOUNS
    assert class_extract.ing_is_noun is phrases.ing_is_noun
    assert distractor_edits.ing_is_noun is phrases.ing_is_noun
    # colours, numbers, closed classes
    assert distractor_rules.COLORS is lexicon.COLORS
    assert distractor_rules.COLOR_GROUPS is lexicon.COLOR_GROUPS
    assert distractor_rules.NUMBERS is lexicon.NUMBERS
    assert class_extract.DETERMINERS is lexicon.DETERMINERS is distractor_edits.DETERMINERS
    assert class_extract.RELATIVES is lexicon.RELATIVES is phrases.RELATIVES
    assert class_extract.FREQUENT_VERBS is lexicon.FREQUENT_VERBS is phrases.FREQUENT_VERBS
    assert morphology.FUNCTION_WORDS is lexicon.FUNCTION_WORDS is phrases.FUNCTION_WORDS
    # the names the llm backend imports from the rules module are the lexicon's and morphology's
    assert distractor_rules.lemmas is morphology.lemmas
    assert distractor_rules.noun_lemma is morphology.noun_lemma


def test_lists_are_frozen() -> None:
    for name in ("PREPOSITIONS", "ING_NOUNS", "COLOR_SET", "DETERMINERS", "SPATIAL_WORDS"):
        assert isinstance(getattr(lexicon, name), frozenset), name
    with pytest.raises(TypeError):
        lexicon.NUMBERS["eleven"] = ("card_word", 11)  # type: ignore[index]
    with pytest.raises(TypeError):
        lexicon.POSITION_FORMS["up"] = "top"  # type: ignore[index]


# --- words that were in one copy only, now handled by every reader ---------------------------

def test_amongst_is_a_preposition_for_class_extraction_too() -> None:
    # "amongst" was only in the distractor rules' list: class extraction read it as a noun
    # and took the animal after it
    assert extract_class("dog amongst the sheep") == 18  # dog, not sheep (20)
    assert extract_class("bear amongst the trees") == 23
    assert candidate_nouns("cat amongst pigeons") == ["cat"]
    assert head_noun(["dog", "amongst", "the", "sheep"]) == "dog"


@pytest.mark.parametrize("word", ["opposite", "w", "amid", "until", "despite", "per"])
def test_class_extraction_prepositions_bound_the_distractor_head(word: str) -> None:
    # these were only in class extraction's list: the distractor rules read on past them
    assert head_noun(f"man {word} the dog".split()) == "man"
    assert head_noun(f"cat {word} two dogs".split()) == "cat"
    assert extract_class(f"man {word} the dog") == 1


def test_opposite_keeps_the_distractor_about_the_man() -> None:
    # two men -> one man is a count swap on the head; before, the head was "table"
    texts = {d.text for d in generate("two men opposite a table", ("swap_count",), per_kind=4)}
    assert "one man opposite a table" in texts


@pytest.mark.parametrize("word", sorted(lexicon.ING_NOUNS - lexicon.ING_NOUN_VERBS))
def test_ing_nouns_are_nouns_after_a_noun_for_both(word: str) -> None:
    # "stadium seating", "wood flooring", "cake toppings": the -ing word heads the phrase
    assert head_noun(["stadium", word]) == word
    assert len(candidate_nouns(f"stadium {word}")) == 2


@pytest.mark.parametrize("word", sorted(lexicon.ING_NOUN_VERBS))
def test_ing_verbs_end_the_phrase_for_both(word: str) -> None:
    # "man crossing street", "plane landing": the verb reading after a noun
    assert head_noun(["man", word, "street"]) == "man"
    assert extract_class(f"man {word} street") == 1


def test_ing_noun_before_a_noun_phrase_is_the_verb() -> None:
    # "building" is a noun ("brick building") but a verb before a noun phrase
    assert head_noun(["man", "building", "a", "sandcastle"]) == "man"
    assert extract_class("man building a sandcastle") == 1
    assert extract_class("dog building") is None  # the building, not a dog


@pytest.mark.parametrize("verb", sorted(set(lexicon.FREQUENT_VERBS.values())))
def test_frequent_verbs_end_the_phrase_for_both(verb: str) -> None:
    # class extraction had the -s forms, the distractor rules the base forms: now both have both
    assert extract_class(f"man {verb} umbrella") == 1
    assert head_noun(["man", verb, "the", "umbrella"]) == "man"


def test_extra_pronouns_are_never_heads() -> None:
    # "itself", "himself" were only in the distractor rules' pronouns
    assert extract_class("man himself") == 1
    assert extract_class("cat itself on the chair") == 17


def test_positional_words_of_both_former_tables() -> None:
    # "higher", "lowermost" were only geometry words of the distractor rules, "high", "low"
    # only positional words of the mosaic
    assert positional_words(["higher", "kite"]) == ["top"]
    assert positional_words(["lowermost", "shelf"]) == ["bottom"]
    assert positional_words(["high", "shelf"]) == ["top"]
    assert extract_class("uppermost bird") == 16
    assert extract_class("lowermost plate of pizza") == 59


def test_geometry_rule_reads_high_and_low() -> None:
    # the other plate is the highest one: "high plate" is true of it, so it is no negative
    ctx = distractor_rules.SceneContext(target_box=(10.0, 300.0, 50.0, 50.0),
                                        same_class_boxes=[(10.0, 10.0, 50.0, 50.0)],
                                        image_size=(400, 400))
    d = distractor_rules.Distractor("swap_spatial", "high plate", "low->high", (0, 1))
    assert distractor_rules.validate("low plate", d, ctx) == "describes another instance"
    assert distractor_rules.validate("low plate", d) is None


# --- no copies --------------------------------------------------------------------------------

def _lexicon_lists() -> dict[str, frozenset[str]]:
    out = {}
    for name, value in vars(lexicon).items():
        if not name.isupper():
            continue
        words = value.keys() if hasattr(value, "keys") else value
        if isinstance(value, (frozenset, tuple)) or hasattr(value, "keys"):
            words = frozenset(w for w in words if isinstance(w, str))
            if len(words) >= 4:
                out[name] = words
    return out


def _literal_word_lists(path: Path) -> list[tuple[int, frozenset[str]]]:
    """Every set/tuple/list display of plain words and every `_words("...")` / `_wordset(...)`
    argument in a module, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        words: list[str] = []
        if isinstance(node, (ast.Set, ast.Tuple, ast.List)) and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            words = [e.value for e in node.elts]  # type: ignore[attr-defined]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("_words", "_wordset") and node.args
              and isinstance(node.args[0], ast.Constant)):
            words = str(node.args[0].value).split()
        if len(set(words)) >= 4 and all(w.isalnum() for w in words):
            found.append((node.lineno, frozenset(words)))
    return sorted(found, key=lambda item: item[0])


def _copies(words: frozenset[str], lists: dict[str, frozenset[str]]) -> list[str]:
    """The lexicon lists that `words` repeats: most of one re-listed (a copy, maybe extended),
    or six or more words nearly all from one list (a partial copy). FUNCTION_WORDS is a union of
    the closed classes, so a rule's own few function words ("is are was were") are no copy."""
    out = []
    for name, lex in lists.items():
        shared = len(words & lex)
        if shared >= 0.8 * len(lex) or (
                len(words) >= 6 and shared >= 0.8 * len(words) and name != "FUNCTION_WORDS"):
            out.append(name)
    return out


def test_no_module_repeats_a_lexicon_list() -> None:
    lists = _lexicon_lists()
    text_dir = Path(lexicon.__file__).parent
    offenders = []
    for path in sorted(text_dir.glob("*.py")):
        if path.name == "lexicon.py":
            continue
        for line, words in _literal_word_lists(path):
            offenders += [f"{path.name}:{line} repeats lexicon.{name}"
                          for name in _copies(words, lists)]
    assert offenders == []


def test_the_guard_finds_a_copy(tmp_path: Path) -> None:
    copy = tmp_path / "copy.py"
    copy.write_text(
        'A = frozenset({"who", "that", "which", "whose", "whom", "where", "when", "plus"})\n'
        'B = _wordset("awning bedding building ceiling clothing pudding")\n'
        'C = ("is", "are", "was", "were")\n'
        'D = ("red", "potato", "cloud", "sing", "blue", "tree")\n')
    found = _literal_word_lists(copy)
    assert [line for line, _ in found] == [1, 2, 3, 4]
    lists = _lexicon_lists()
    assert "RELATIVES" in _copies(found[0][1], lists)  # re-listed, and extended
    assert _copies(found[1][1], lists) == ["ING_NOUNS"]  # six of its words
    assert _copies(found[2][1], lists) == []  # a rule's own few words
    assert _copies(found[3][1], lists) == []
