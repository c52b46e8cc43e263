"""The COCO category of an arbitrary referring expression, from its head noun.

Hard-negative mining restricted to "the same object class" needs the class of every expression.
The dataset's own sentences have their ref's ``category_id``; generated expressions (multi-view
rewrites, VLM outputs) do not, so their head noun is mapped to one of COCO's 80 categories: a
hand-written synonym table first, then (optionally) an embedding similarity fallback, as Ref-NMS
does with GloVe (spaCy nouns -> cosine to the COCO category names -> threshold gamma). The
pipeline injects the CLIP text encoder as that embedding (:func:`embedding_fallback`), so this
module needs no model and no parser: numpy, lemminflect and the word lists of stages.text.lexicon.

Pipeline of :func:`extract_class`
---------------------------------

1. Tokenise: lowercase, apostrophes dropped ("man's" -> "mans", as REFER cleaning does), every
   other non-alphanumeric character splits. A token list is normalised the same way.
2. Lemmatise each token (lemminflect, noun reading; a possessive "mans" -> "man").
3. Merge multi-word names into one unit, longest match first, on the lemmas: "hot dog",
   "teddy bear", "stop sign", "glass of wine", "baseball cap", ... A merged unit is never split
   again, so "hot dog" can never yield dog nor "teddy bear" bear.
4. :func:`candidate_nouns` - the head-noun heuristic (no parser):

   * The *head chunk* is everything before the first preposition ("in", "on", "with", "next",
     "from", ...; always a boundary, even as the first word, so "on the left" has no head), or,
     once a noun has been seen, before the first relative pronoun ("that", "who", ...),
     conjunction ("and", "or"), -ing verb form ("holding", "wearing") or common finite verb
     ("is", "holds"). Before any noun those are modifiers: "standing man", "black and white
     cat", "that dog". An "and"/"or" between two colour words joins colours, never noun phrases
     (:func:`stages.text.phrases.joins_colours`, the rule ``head_noun`` uses), and a colour so
     joined is no noun: "orange and white cat" -> cat, "white and orange" -> no head.
   * English noun phrases are head-final, so the chunk's nouns come rightmost first:
     "white laptop computer" -> computer, laptop.
   * "of" is transparent: "plate of pizza", "one of the kids", "side of the bus", "leftmost of
     the two umbrellas" continue with the complement's nouns (after the chunk's own), except
     after "left"/"right" ("left of the man" is beside the man) and picture words ("picture of
     a dog" is a picture).
   * "on" after a garment is transparent the same way, so the wearer it names can claim the
     garment (step 5): "sweater on dog" -> dog, "shirt on the left" -> person as before, "hat on
     the table" -> person as before (a table wears nothing).
   * A word right before the pro-form "one(s)" is a modifier: "orange one" has no head.
   * Never candidates: positional, ordinal, numeric and generic words ("left", "one", "second",
     "thing", "side", "front"), colours, common adjectives, determiners and pronouns - so
     "right one" and "second one from left" have no head at all.
   * A noun is a token that lemminflect can read as a noun, a table word, or an out-of-vocabulary
     alphabetic token (REFER is full of typos and brand names; the fallback may know them).

5. Walk the candidates through :data:`SYNONYMS`, stopping at the first hit. A candidate that is
   not a class is skipped only when it is *transparent* - a part, container or quantity
   ("giraffe head", "pizza box", "plate of pizza", "bunch of bananas") - or *weak*, a word with a
   default class that yields to a class named next to it: garments mean the person wearing
   them ("red shirt" -> person, "man blue shirt" -> person, "dog sweater" -> dog, "baseball cap"
   -> person: only animate classes own a garment), "screen" is a tv unless it is a phone's or a
   laptop's, "seat" a chair unless it is a bike's, toilet's, ... Any other non-class noun stops
   the walk: "baseball field", "train tracks", "bike rack" must not become a ball, a train or a
   bicycle.
6. Nothing found: ``fallback(head)`` where head is the first non-transparent candidate (else the
   first candidate); no candidate at all ("right one") -> None without calling the fallback.

Table decisions (RefCOCO usage; COCO labels what annotators clicked, not the word's dictionary
sense)
---------------------------------------------------------------------------------------------

* "glass", "mug", "tumbler" -> 47 cup: COCO's cup covers drinking glasses; only stemware is 46
  wine glass: "wine glass", "wineglass", "glass of wine"/"champagne", "wine", "champagne".
* "plate of pizza" -> 59 pizza: plate is not a COCO class, so the clicked object is the food (or
  the table); containers are transparent. "cup of coffee" / "bowl of soup" stay cup / bowl.
* "table", "desk" -> 67 dining table (COCO's only table); "bag", "purse" -> 31 handbag;
  "computer", "notebook" -> 73 laptop; "monitor", "screen", "television" -> 72 tv, but
  "computer screen" / "computer monitor" -> 72 tv (a desktop monitor).
* "van", "suv", "jeep", "taxi" -> 3 car; "pickup", "lorry", "semi" -> 8 truck; "bike" -> 2
  bicycle, "dirt bike", "motorbike", "moped", "scooter" -> 4 motorcycle.
* "orange" is the fruit (55) when it is the head ("orange on left"); as a modifier it is not the
  rightmost noun ("orange cat" -> cat) or it precedes a pro-form ("orange one" -> None).
  "blonde", "brunette", "redhead" are people.
* "calf" -> 21 cow; "pitcher" -> person (baseball images), but "pitcher of ..." is a jug, a
  container (transparent; "pitcher of water" -> no class), unless a team noun follows within
  four words ("pitcher of the baseball team" -> person); "glove", "mitt" -> 40 baseball glove;
  "ball", "baseball", "football", ... -> 37 sports ball; "burger" -> 54 sandwich; "cupcake" ->
  61 cake; "plant" -> 64 potted plant; "stove" -> 79 oven; "fridge" -> 82 refrigerator.
* Deliberately unmapped (ambiguous across classes or not COCO): vehicle, animal, food, board,
  sign, light, pot, goat, donkey, flower, beer. "coffee" alone is a cup ("coffee table" is not:
  the rightmost noun wins).
* gRefCOCO multi-target expressions take the first conjunct ("man and dog" -> person).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

import lemminflect
import numpy as np

from stages.text.lexicon import (
    AUXILIARIES,
    COLOR_SET,
    CONJUNCTIONS,
    DETERMINERS,
    FREQUENT_VERBS,
    ING_NOUNS,
    NUMBERS,
    OTHER_COLOR_WORDS,
    PREPOSITIONS,
    PRO_FORMS,
    PRONOUNS,
    RELATIVES,
    SPATIAL_WORDS,
)
from stages.text.phrases import ing_is_noun, joins_colours

__all__ = [
    "COCO_CATEGORIES",
    "SYNONYMS",
    "candidate_nouns",
    "embedding_fallback",
    "extract_class",
    "tokenize",
]

COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}

# Written per category so each line reads as "these words name this class". Keys are lemmas
# (singular) or exact surface forms lemminflect cannot reduce (OOV plurals, common REFER typos).
_WORDS: dict[int, str] = {
    1: "person people human man gentleman gent guy dude bloke fellow fella lad woman lady gal "
       "lass girl boy kid child kiddo baby infant toddler youngster teen teenager adult mom "
       "mother mum mommy dad father daddy son daughter brother sister grandma grandpa "
       "grandmother grandfather granny husband wife bride groom boyfriend girlfriend friend "
       "player athlete skier surfer skateboarder snowboarder boarder kiteboarder batter hitter "
       "catcher pitcher umpire ump fielder outfielder infielder goalie referee jockey cowboy "
       "rider biker cyclist bicyclist motorcyclist driver passenger pedestrian tourist "
       "student teacher worker chef cook waiter waitress cop policeman policewoman officer "
       "soldier doctor nurse vendor customer spectator fan crowd audience someone somebody "
       "individual blonde blond brunette redhead",
    2: "bicycle bike bmx",
    3: "car automobile taxi cab suv van minivan jeep sedan",
    4: "motorcycle motorbike moped scooter dirtbike",
    5: "airplane aeroplane plane jet aircraft airliner jetliner biplane",
    6: "bus busses minibus schoolbus doubledecker",
    7: "train locomotive tram streetcar railcar caboose boxcar subway",
    8: "truck pickup lorry semi firetruck",
    9: "boat ship canoe kayak sailboat yacht ferry raft dinghy gondola vessel tugboat "
       "speedboat rowboat",
    10: "stoplight",
    11: "hydrant firehydrant",
    13: "stopsign",
    14: "meter",
    15: "bench pew",
    16: "bird pigeon seagull gull duck goose swan parrot chicken hen rooster crow owl eagle "
        "hawk sparrow pelican penguin flamingo dove heron finch robin ostrich turkey peacock",
    17: "cat kitty kitten kittie feline tabby",
    18: "dog puppy pup doggy doggie pooch hound mutt canine terrier poodle labrador retriever "
        "collie beagle bulldog dalmatian chihuahua pug corgi",
    19: "horse pony foal mare stallion colt bronco steed",
    20: "sheep lamb ram ewe",
    21: "cow calf bull cattle ox oxen steer heifer",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe giraff girafe",
    27: "backpack knapsack rucksack",
    28: "umbrella umbrela parasol",
    31: "handbag purse bag tote",
    32: "tie necktie bowtie",
    33: "suitcase luggage baggage",
    34: "frisbee frisbe frizbee disc",
    35: "ski skis",
    36: "snowboard",
    37: "ball baseball football basketball volleyball softball",
    38: "kite",
    39: "bat",
    40: "glove mitt",
    41: "skateboard",
    42: "surfboard",
    43: "racket racquet",
    44: "bottle",
    46: "wineglass wine champagne",
    47: "cup mug glass tumbler teacup coffee",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich sandwhich burger hamburger cheeseburger panini hoagie",
    55: "orange tangerine clementine",
    56: "broccoli brocolli brocoli",
    57: "carrot",
    58: "hotdog",
    59: "pizza",
    60: "donut doughnut",
    61: "cake cupcake cheesecake",
    62: "chair stool armchair highchair",
    63: "couch sofa loveseat settee futon",
    64: "plant houseplant flowerpot planter",
    65: "bed mattress",
    67: "table desk",
    70: "toilet urinal commode",
    72: "tv television monitor telly",
    73: "laptop computer notebook macbook netbook",
    74: "mouse",
    75: "remote controller wiimote wii joystick",
    76: "keyboard",
    77: "phone cellphone smartphone iphone telephone",
    78: "microwave",
    79: "oven stove",
    80: "toaster",
    81: "sink",
    82: "refrigerator fridge freezer refridgerator",
    84: "book textbook",
    85: "clock",
    86: "vase",
    87: "scissors scissor",
    88: "teddy teddybear plush plushie",
    89: "hairdryer hairdrier blowdryer",
    90: "toothbrush",
}

# Multi-word names, matched as one unit before any head-noun logic (longest match first).
_PHRASES: dict[int, tuple[str, ...]] = {
    4: ("dirt bike", "motor bike"),
    5: ("air plane", "jumbo jet"),
    6: ("double decker",),
    7: ("train car", "rail car"),
    8: ("fire engine",),
    9: ("motor boat",),
    10: ("traffic light", "stop light", "traffic signal"),
    11: ("fire hydrant",),
    13: ("stop sign",),
    14: ("parking meter",),
    27: ("back pack",),
    32: ("bow tie",),
    34: ("flying disc",),
    36: ("snow board",),
    37: ("sports ball", "tennis ball", "soccer ball"),
    39: ("baseball bat",),
    40: ("baseball glove", "baseball mitt"),
    41: ("skate board",),
    42: ("surf board", "boogie board"),
    43: ("tennis racket", "tennis racquet"),
    46: ("wine glass", "champagne glass", "glass of wine", "glass of champagne"),
    58: ("hot dog", "chili dog", "corn dog"),
    63: ("love seat",),
    64: ("potted plant", "flower pot"),
    67: ("dining table",),
    72: ("computer screen", "computer monitor"),
    75: ("remote control",),
    77: ("cell phone", "mobile phone"),
    85: ("clock tower",),
    88: ("teddy bear", "stuffed animal", "stuffed bear", "stuffed toy"),
    89: ("hair drier", "hair dryer", "blow dryer", "blow drier"),
    90: ("tooth brush",),
}


def _build_synonyms() -> dict[str, int]:
    table: dict[str, int] = {}
    for cid, words in _WORDS.items():
        for word in words.split():
            table[word] = cid
    for cid, phrases in _PHRASES.items():
        for phrase in phrases:
            table[phrase] = cid
    for cid, name in COCO_CATEGORIES.items():
        table[name] = cid
    return table


SYNONYMS: dict[str, int] = _build_synonyms()
"""Lemma (or multi-word phrase, space-separated lemmas) -> COCO category id."""


def _wordset(text: str) -> frozenset[str]:
    """Space-separated word lists keep the tables below readable (and greppable)."""
    return frozenset(text.split())


_ANIMATE = frozenset({1, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25})
_GARMENTS = _wordset(
    "shirt tshirt tee jacket coat sweater hoodie sweatshirt vest dress skirt pants pant jeans "
    "shorts trousers hat cap helmet beanie scarf uniform jersey suit blouse outfit clothes "
    "clothing sunglasses eyeglasses shades shoe shoes sneaker boot boots sock socks apron robe "
    "costume wetsuit bikini swimsuit sleeve collar"
)
# Weak heads: a default class that yields to a class noun next to them, if that class may own
# them (None = any). A garment names its wearer; an inanimate "baseball cap" is still worn.
_WEAK: dict[str, tuple[int, frozenset[int] | None]] = {
    **{g: (1, _ANIMATE) for g in _GARMENTS},
    "baseball cap": (1, _ANIMATE),
    "baseball hat": (1, _ANIMATE),
    "tank top": (1, _ANIMATE),
    "screen": (72, None),
    "seat": (62, None),
}

# Parts, containers and quantities: not a class themselves, they point at the class they
# modify or contain ("giraffe head", "pizza box", "plate of pizza", "bunch of bananas").
_TRANSPARENT = _wordset(
    "head face nose ear eye mouth neck butt bum rump tail leg foot hoof paw body trunk tusk horn "
    "mane fur wing beak arm hand shoulder hair knee hood door window wheel tire tyre windshield "
    "bumper headlight roof handle crust topping icing frosting lid cover cord string sail mast "
    "plate tray box basket carton crate pan platter dish bucket jar container package packet "
    "bunch group pile stack row line herd flock pack set bundle couple pair slice bite chunk "
    "serving kind type sort"
) | {"pitcher of"}  # a jug: "pitcher of water" (a unit, so "of" is consumed with it)

# Never a head: positions, ordinals, numbers, generic nouns, colours, common adjectives and
# adverbs, determiners and pronouns. Many of these read as nouns to lemminflect ("left",
# "white", "one", "that", "her"). The shared lists come from stages.text.lexicon; "orange" is
# left out of the colours, as it may be the fruit (COCO 55).
_NON_HEAD = (
    SPATIAL_WORDS | frozenset(NUMBERS) | PRO_FORMS | (COLOR_SET - {"orange"}) | OTHER_COLOR_WORDS
    | DETERMINERS | PRONOUNS | _wordset(
        "mid rear side corner edge end tip part portion piece bit half whole rest area spot "
        "place section space distance way direction last latter former dozen lone single only "
        "thing things stuff object item something anything everything nothing anyone everyone "
        "picture pic pics photo photograph image frame shot scene view camera "
        "big bigger biggest small smaller smallest large larger largest little tiny huge giant "
        "tall taller tallest short shorter shortest long longer longest fat thin skinny old "
        "older oldest young younger youngest new empty full partial partially main entire same "
        "different others visible hidden blurry blurred cut dirty clean wooden metal plastic "
        "none much more very just also not"
    )
)

# "left of the man" is beside the man; "picture of a dog" is a picture: no "of" transparency.
# ("leftmost of the two umbrellas" is partitive, like "one of": it continues.)
_NO_OF_CONTINUE = _wordset("left right picture pic pics photo photograph image frame")

# Boundaries only once a noun has been seen; before it they are modifiers or determiners
# ("that dog", "black and white cat"). Prepositions are boundaries always.
_LATE_BOUNDARIES = RELATIVES | CONJUNCTIONS | AUXILIARIES | frozenset(FREQUENT_VERBS.values())

_TABLE_WORDS = frozenset(SYNONYMS) | frozenset(_WEAK) | _TRANSPARENT
# Weak heads worn by their owner: "on" after one continues to the wearer ("sweater on dog").
_WORN = frozenset(k for k, (_, owners) in _WEAK.items() if owners == _ANIMATE)


def _phrase_index() -> dict[int, frozenset[tuple[str, ...]]]:
    by_len: dict[int, set[tuple[str, ...]]] = {}
    for key in _TABLE_WORDS:
        if " " in key:
            words = tuple(key.split())
            by_len.setdefault(len(words), set()).add(words)
    return {n: frozenset(v) for n, v in by_len.items()}


_PHRASE_KEYS = _phrase_index()  # word count -> multi-word table keys
_PHRASE_LENGTHS = sorted(_PHRASE_KEYS, reverse=True)


def tokenize(text: str) -> list[str]:
    """REFER-style tokens: lowercase, apostrophes dropped ("man's" -> "mans"), other punctuation
    splits, so raw and already-cleaned sentences give the same tokens."""
    return re.findall(r"[a-z0-9]+", re.sub(r"['\u2019`]", "", text.lower()))


def _normalise(tokens: str | Sequence[str]) -> list[str]:
    if isinstance(tokens, str):
        return tokenize(tokens)
    return tokenize(" ".join(tokens))


@lru_cache(maxsize=65536)
def _lemma(token: str) -> str:
    """The table key of a token: the token itself if a table knows it (OOV plurals, typos,
    "shorts" vs the adjective "short"), else its noun lemma, else a possessive-stripped form
    ("mans" -> "man" after REFER dropped the apostrophe)."""
    if token in _TABLE_WORDS or token in _NON_HEAD:
        return token
    lemma = lemminflect.getLemma(token, upos="NOUN", lemmatize_oov=True)
    key = lemma[0] if lemma else token
    if key not in _TABLE_WORDS and token.endswith("s") and token[:-1] in _TABLE_WORDS:
        return token[:-1]
    return key


def _is_verb_ing(token: str, next_token: str | None) -> bool:
    """A participle like "holding"/"wearing" (lemminflect gives a different verb lemma); an
    -ing noun only when a noun phrase follows ("man crossing the street", not "crossing
    sign": :func:`stages.text.phrases.ing_is_noun`)."""
    if not token.endswith("ing") or token in _TABLE_WORDS or ing_is_noun(token, next_token):
        return False
    return _has_verb_lemma(token)


@lru_cache(maxsize=65536)
def _has_verb_lemma(token: str) -> bool:
    verb = lemminflect.getAllLemmas(token, upos="VERB").get("VERB", ())
    return any(v != token for v in verb)


@lru_cache(maxsize=65536)
def _is_noun(token: str, key: str) -> bool:
    if key in _TABLE_WORDS or token in ING_NOUNS:  # lemminflect knows "flooring" as a verb only
        return True
    if token in _NON_HEAD or key in _NON_HEAD or not token.isalpha():
        return False
    lemmas = lemminflect.getAllLemmas(token)
    if not lemmas:  # out of vocabulary: typos, brands ("umbrela", "wiimote") - let them through
        return len(token) >= 3
    return "NOUN" in lemmas or "PROPN" in lemmas


def _phrase_at(words: list[str], keys: list[str], i: int) -> tuple[int, str] | None:
    """Longest multi-word table key starting at ``i``, on lemmas or surface words."""
    for n in _PHRASE_LENGTHS:
        if i + n <= len(words):
            for cand in (tuple(keys[i:i + n]), tuple(words[i:i + n])):
                if cand in _PHRASE_KEYS[n]:
                    return n, " ".join(cand)
    return None


# After "pitcher of", these make the pitcher a player, not a jug ("pitcher of the red team").
_TEAM_NOUNS = _wordset("team teams game match club league squad yankees")
_TEAM_REACH = 4


def _team_follows(words: list[str], i: int) -> bool:
    """Is a team noun among the few words from ``i`` on, before any preposition?"""
    for w in words[i:i + _TEAM_REACH]:
        if w in _TEAM_NOUNS:
            return True
        if w in PREPOSITIONS:
            return False
    return False


def _units(words: list[str]) -> list[tuple[str, str, bool]]:
    """(surface, key, is_phrase) per unit, multi-word names merged (longest match first)."""
    keys = [_lemma(w) for w in words]
    out: list[tuple[str, str, bool]] = []
    i = 0
    while i < len(words):
        match = _phrase_at(words, keys, i)
        if match is not None and match[1] == "pitcher of" and _team_follows(words, i + 2):
            match = None  # "pitcher of the baseball team": the player
        if match is None:
            out.append((words[i], keys[i], False))
            i += 1
        else:
            out.append((match[1], match[1], True))
            i += match[0]
    return out


def candidate_nouns(tokens: str | Sequence[str]) -> list[str]:
    """Lemmatised head-noun candidates, most likely head first (see the module docstring).

    The head chunk's nouns rightmost first, then - through "of" - the complement's nouns.
    Multi-word names come as one space-separated candidate ("hot dog"). A ``str`` is tokenised
    first. Returns ``[]`` when the expression names no object ("right one", "on the left").
    """
    out: list[str] = []
    chunk: list[str] = []
    seen_noun = False
    last_content: str | None = None
    units = _units(_normalise(tokens))
    surfaces = [u[0] for u in units]
    for i, (surface, key, is_phrase) in enumerate(units):
        if not is_phrase:
            if surface in PREPOSITIONS:
                head = chunk[-1] if chunk else None
                out.extend(reversed(chunk))
                chunk = []
                if (surface == "of" and last_content not in _NO_OF_CONTINUE) or (
                        surface == "on" and head in _WORN):
                    seen_noun, last_content = False, None
                    continue
                return _dedupe(out)
            if joins_colours(surfaces, i):
                continue  # "orange and white cat": one noun phrase, coloured twice
            next_surface = units[i + 1][0] if i + 1 < len(units) else None
            if surface in _LATE_BOUNDARIES or _is_verb_ing(surface, next_surface):
                if seen_noun:
                    break
                continue
        pro_form_next = i + 1 < len(units) and units[i + 1][0] in PRO_FORMS
        colour_joined = (i > 0 and joins_colours(surfaces, i - 1)) or (
            i + 1 < len(units) and joins_colours(surfaces, i + 1))
        if _is_noun(surface, key) and not pro_form_next and not colour_joined:
            chunk.append(key)
            seen_noun = True
        last_content = surface
    out.extend(reversed(chunk))
    return _dedupe(out)


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def extract_class(text: str | Sequence[str],
                  fallback: Callable[[str], int | None] | None = None) -> int | None:
    """COCO category id of a referring expression's head noun, or None.

    Table first (phrases, then candidates in head order, skipping transparent and weak words),
    then ``fallback(head_noun)`` - called only when the table gives nothing and there is a head
    noun at all. A fallback answer must be a COCO id (or None): a bad id would silently put
    negatives in a non-existent class.
    """
    candidates = candidate_nouns(text)
    weak: tuple[int, frozenset[int] | None] | None = None
    head: str | None = None
    for key in candidates:
        cid = SYNONYMS.get(key)
        if cid is not None:
            if weak is not None and weak[1] is not None and cid not in weak[1]:
                return weak[0]
            return cid
        if key in _WEAK:
            weak = weak or _WEAK[key]
            continue
        if key in _TRANSPARENT:
            continue
        head = key
        break
    if weak is not None:
        return weak[0]
    if fallback is None or not candidates:
        return None
    result = fallback(head if head is not None else candidates[0])
    if result is None:
        return None
    if int(result) not in COCO_CATEGORIES:
        raise ValueError(f"class fallback returned {result!r}, not a COCO category id")
    return int(result)


def _unit_rows(vectors: np.ndarray, n: int, what: str) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"encode returned shape {arr.shape} for {n} {what}; expected ({n}, d)")
    if not np.isfinite(arr).all():
        raise ValueError(f"encode returned non-finite values for {what}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.where(norms > 0, norms, 1.0)


def embedding_fallback(encode: Callable[[list[str]], np.ndarray],
                       min_cosine: float = 0.5) -> Callable[[str], int | None]:
    """A fallback for :func:`extract_class`: the COCO category whose name is nearest the noun.

    Ref-NMS maps expression nouns to COCO categories by the cosine of their word embeddings and
    a threshold; here ``encode`` (the CLIP text encoder in the pipeline: list of strings ->
    (n, d) L2-normalised rows) plays GloVe. The 80 names are embedded once, here; rows are
    re-normalised defensively. Answers are memoised per noun, since the same few unknown nouns
    recur across a dataset. Below ``min_cosine`` the noun is not a COCO object -> None.
    """
    if not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine}")
    ids = list(COCO_CATEGORIES)
    names = [COCO_CATEGORIES[i] for i in ids]
    table = _unit_rows(encode(names), len(names), "category names")
    memo: dict[str, int | None] = {}

    def fallback(noun: str) -> int | None:
        key = " ".join(tokenize(noun))
        if not key:
            return None
        if key not in memo:
            vec = _unit_rows(encode([key]), 1, "noun")[0]
            sims = table @ vec
            best = int(np.argmax(sims))
            memo[key] = ids[best] if sims[best] >= min_cosine else None
        return memo[key]

    return fallback
