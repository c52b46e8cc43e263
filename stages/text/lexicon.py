"""The closed word lists of the text rules: ONE copy, imported by every module that reads words.

Who reads what: :mod:`stages.text.positional` (positional words, clock hours),
:mod:`stages.text.distractor_rules` and :mod:`stages.text.phrases` (everything but the extra
colour words), :mod:`stages.text.class_extract` (boundaries and never-a-head words). Two copies
of a list drift apart (they had: "amongst" was a preposition for one module and a noun for the
other, "parking" a noun for one and a verb for the other), so a word belongs here once, and a
module that needs a variant derives it from these sets in code, where the difference is visible.

All words are lowercase REFER tokens (apostrophes dropped, so "man's" is "mans"). The sets are
frozen: importing modules share the very same objects.
"""

from __future__ import annotations

from types import MappingProxyType


def _words(text: str) -> frozenset[str]:
    """Space-separated lists keep the tables readable and greppable."""
    return frozenset(text.split())


# --------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------

# The basic colour names: what swap_color edits and draws from. "orange" is also the fruit
# (COCO 55): each rule decides from context which one it is.
COLORS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "white", "black", "orange", "purple", "pink", "brown",
    "gray", "grey", "tan", "beige", "silver", "gold",
)
COLOR_SET = frozenset(COLORS)
# Near-synonyms: a substitute from the original's group is not reliably false.
COLOR_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"gray", "grey", "silver"}),
    frozenset({"tan", "beige", "brown"}),
    frozenset({"gold", "yellow"}),
)
# Shades, patterns and rarer colour names: never a head noun, but not swapped either ("dark"
# and "light" are also nouns: "traffic light"; "dark blue shirt" edits "blue" only).
OTHER_COLOR_WORDS = _words(
    "dark light bright colored coloured colorful striped plaid checkered spotted maroon navy "
    "teal turquoise cream khaki violet magenta crimson burgundy ivory multicolored golden"
)

# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

CARDINALS: tuple[str, ...] = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)
ORDINALS: tuple[str, ...] = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
    "tenth",
)
ORDINAL_NUMERALS: tuple[str, ...] = (
    "1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th", "10th",
)
# Clock hours go to twelve ("two o'clock"); the counts above stop at ten.
HOUR_WORDS: tuple[str, ...] = (*CARDINALS, "eleven", "twelve")
# token -> (family, value), values 1..10; a family is one surface form of a number: cardinal or
# ordinal, word or digits ("card_word", "card_digit", "ord_word", "ord_num").
NUMBERS: MappingProxyType[str, tuple[str, int]] = MappingProxyType({
    **{w: ("card_word", v) for v, w in enumerate(CARDINALS, start=1)},
    **{str(v): ("card_digit", v) for v in range(1, 11)},
    **{w: ("ord_word", v) for v, w in enumerate(ORDINALS, start=1)},
    **{w: ("ord_num", v) for v, w in enumerate(ORDINAL_NUMERALS, start=1)},
})
# Pro-forms standing for a head noun ("the right one"): the word before them is a modifier.
PRO_FORMS = _words("one ones")

# --------------------------------------------------------------------------------------------
# Positions and spatial words
# --------------------------------------------------------------------------------------------

# Positional word forms -> the direction they name in the image (left, right, top, bottom).
# Whole tokens only: "bright", "highway" or "topping" never match.
POSITION_FORMS: MappingProxyType[str, str] = MappingProxyType({
    "left": "left", "leftmost": "left", "lefthand": "left",
    "right": "right", "rightmost": "right", "righthand": "right",
    "top": "top", "upper": "top", "topmost": "top", "uppermost": "top", "high": "top",
    "higher": "top", "highest": "top",
    "bottom": "bottom", "lower": "bottom", "low": "bottom", "lowest": "bottom",
    "bottommost": "bottom", "lowermost": "bottom",
})
# Every word that says where something is: the position forms, relations and distances.
SPATIAL_WORDS = frozenset(POSITION_FORMS) | _words(
    "middle center centre central front back foreground background inside outside above below "
    "under underneath beneath far near close closer closest nearest farther farthest further "
    "furthest"
)
# Positions that head a noun phrase of their own ("on the left", "in the middle", "in the back").
POSITION_HEADS = frozenset(POSITION_FORMS.values()) | _words(
    "middle center centre front back foreground background")
# Superlatives of distance: adjectives ("the closest elephant") or prepositions after a noun ("man
# nearest the camera").
DISTANCE_SUPERLATIVES = _words("closest nearest farthest furthest")
# Relations between objects that SPATIAL_WORDS leaves out because they also head other phrases
# ("the side of the bus", "next one"); an edit that swaps one of these still edits a position.
SPATIAL_RELATION_WORDS = _words("behind beside between next side nearer")

# --------------------------------------------------------------------------------------------
# Function words
# --------------------------------------------------------------------------------------------

PREPOSITIONS = _words(
    "about above across after against along alongside amid among amongst around as at atop "
    "before behind below beneath beside besides between beyond by despite down during except "
    "for from in inside into like near next of off on onto opposite out outside over past per "
    "than through throughout to toward towards under underneath unlike until up upon via while "
    "with within without w"
)  # "w": REFER's shorthand for "with"
DETERMINERS = _words(
    "the a an this that these those some any each every all both another other its his her "
    "their my your our no either neither several many few most"
)
# Where something is: a noun phrase followed by one of these may be negated ("dog not on the
# couch"); "of", "from", "to", "for" are not locative ("second from left").
LOCATIVE_PREPOSITIONS = _words(
    "in on at near by behind under underneath beneath above below beside inside outside between "
    "among against along across atop over around into onto through toward towards next"
)
ARTICLES = _words("the a an")
PRONOUNS = _words(
    "he she it they them him i you we me us itself himself herself themselves there here what"
)
RELATIVES = _words("who that which whose whom where when while")
AUXILIARIES = _words(
    "is are was were be being been am has have had does do did can could will would should may "
    "might must"
)
# The auxiliaries after which a verb stands in its base form ("does not have", "can not see").
BASE_FORM_AUXILIARIES = _words("does do did can could will would should may might must")
CONJUNCTIONS = _words("and or but nor plus")
NEGATION_WORDS = _words(
    "not no non without never none nothing nobody neither nor isnt arent doesnt dont didnt "
    "wasnt werent hasnt havent hadnt cannot cant wont wouldnt couldnt shouldnt aint"
)
"""Words that make a sentence negative (an edit touching one is a negation edit)."""
_APOSTROPHES = "'\u2019\u2018`"


def negation_word(word: str) -> str | None:
    """The ``NEGATION_WORDS`` entry that ``word`` spells, with or without apostrophes ("isn't",
    "isn\u2019t" and "isnt" are "isnt"; a split "n't" is "not"), or None. Every negation lookup
    (the distractor rules' and the positional reader's) goes through here, so a model's
    "doesn't" is the rules' "doesnt"."""
    if word in NEGATION_WORDS:
        return word
    bare = word.translate({ord(c): None for c in _APOSTROPHES})
    if bare == "nt":
        return "not"
    return bare if bare != word and bare in NEGATION_WORDS else None


# The negations followed by a verb in its base form ("doesnt have", "cant see").
BASE_FORM_NEGATIONS = _words("doesnt dont didnt cannot cant wont wouldnt couldnt shouldnt")
# The negation words whose scope is the noun phrase right after them ("no black jacket", "without
# red hat", "non smiling man"); the others ("not", "isnt", ...) negate the rest of their clause
# (stages.text.phrases.negated_positions).
NP_NEGATION_WORDS = _words("no non without none nothing nobody neither")
FUNCTION_WORDS = (PREPOSITIONS | DETERMINERS | PRONOUNS | RELATIVES | AUXILIARIES | CONJUNCTIONS
                  | _words("not non very so"))

# --------------------------------------------------------------------------------------------
# Nouns and verbs
# --------------------------------------------------------------------------------------------

# Nouns ending in -ing that lemminflect may read as verb-ing forms.
ING_NOUNS = _words(
    "awning bedding building buildings carving ceiling clothing crossing drawing drawings "
    "dressing dumpling earring evening fencing filling flooring frosting housing icing landing "
    "lettering lighting morning netting opening packaging painting paintings paneling parking "
    "pudding railing railings seating setting shopping siding stocking stockings stuffing "
    "topping toppings trimming trimmings wedding wrapping writing"
)
# The -ing nouns that are, right after a noun, far more often the verb: "man crossing street",
# "plane landing", "woman shopping", "donut filling" is the exception that still names a donut.
# stages.text.phrases.ing_is_noun reads them so.
ING_NOUN_VERBS = _words(
    "carving crossing drawing dressing fencing filling landing lighting opening painting "
    "parking setting shopping trimming wrapping writing"
)
# Verb-ing forms that are prenominal modifiers when a noun follows ("dining table").
COMPOUND_VBG = _words(
    "dining living sliding ironing rolling baking folding frying mixing batting swimming "
    "sleeping waiting running"
)
INTRANSITIVE = _words(
    "stand sit walk run look lie lay smile lean jump fly swim sleep wait squat kneel crouch bend "
    "stay rest go come talk laugh pose graze park skate ski surf stare glance sing cry hang "
    "float perch dive fall turn move play"
)
# The verbs of REFER expressions ("man holding ...", "dog that chases ..."): base form -> third
# person singular, so a rule can recognise "men hold umbrellas" and "man holds umbrella".
FREQUENT_VERBS: MappingProxyType[str, str] = MappingProxyType({
    "appear": "appears", "carry": "carries", "catch": "catches", "chase": "chases",
    "drink": "drinks", "eat": "eats", "face": "faces", "feed": "feeds", "fly": "flies",
    "get": "gets", "go": "goes", "grab": "grabs", "have": "has", "hit": "hits", "hold": "holds",
    "hug": "hugs", "kiss": "kisses", "kneel": "kneels", "lay": "lays", "lean": "leans",
    "lie": "lies", "look": "looks", "play": "plays", "point": "points", "pull": "pulls",
    "push": "pushes", "reach": "reaches", "read": "reads", "ride": "rides", "run": "runs",
    "seem": "seems", "show": "shows", "sit": "sits", "sleep": "sleeps", "smile": "smiles",
    "stand": "stands", "stare": "stares", "swing": "swings", "take": "takes", "talk": "talks",
    "throw": "throws", "touch": "touches", "use": "uses", "wait": "waits", "walk": "walks",
    "watch": "watches", "wear": "wears",
})
IRREGULAR_PLURAL: MappingProxyType[str, str] = MappingProxyType({"person": "people"})
IRREGULAR_SINGULAR: MappingProxyType[str, str] = MappingProxyType(
    {p: s for s, p in IRREGULAR_PLURAL.items()})
# Nouns whose singular and plural are the same word.
INVARIANT_NOUNS = _words(
    "sheep deer fish moose bison salmon aircraft broccoli series species cattle people"
)
