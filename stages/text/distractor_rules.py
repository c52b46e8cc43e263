"""Rule-based text hard negatives ("distractors") for referring image segmentation.

Why: the contrastive loss of the hard-negative stage (see ``hard_negative_notes.txt``, "Text
Augmentation") needs captions that look almost exactly like the positive but are WRONG for its
target: "the man in red" -> "the man in blue". The notes suggest an LLM; this module does the
same offline, deterministically and cheaply with hand-written rules over REFER-cleaned sentences
(lowercase, no punctuation, whitespace-tokenised). No parser is assumed (spaCy models and NLTK data
are not available): word classes come from lemminflect (:mod:`stages.text.morphology`), the closed
word lists of :mod:`stages.text.lexicon` and the noun-phrase heuristics of
:mod:`stages.text.phrases` (``head_noun``).

Every distractor is ONE minimal edit confined to one slot: ``span`` is the half-open token span
``[start, end)`` of the source that was replaced, ``slot`` reads ``"<source words>-><new words>"``
(e.g. ``"red->blue"``, ``"holding->not holding"``, ``"not->"`` for a deletion), and
``text == " ".join(src[:start] + new_words + src[end:])``. A sentence without an editable slot
yields nothing of that kind, never a broken sentence. Input is lowercased and split on
whitespace. When an edited word follows "a"/"an" and its first sound changes, the article is
re-chosen and joins the span ("a red shirt" -> "an orange shirt", slot ``"a red->an orange"``).

Randomness: substitutes are drawn with ``random.Random`` seeded from sha256 of
(seed, sentence, kind), so draws are reproducible across processes and independent between
kinds; ``seed`` may be an int or a sequence of ints (e.g. ``(epoch, sample_id)``). Distractor k of
a kind edits slot ``k mod n_slots`` (round-robin over the slots in sentence order), drawing
without replacement; the list for ``per_kind=k`` is a prefix of the one for ``k+1``.

Guard: ``generate`` keeps only candidates that pass ``validate(source, d)`` without context, so a
rule slip on an odd sentence never reaches training data. The rules are tested without the guard
on every hand-written test sentence; the guard only fires on garbled input.

Kinds
=====

Negation scope (all three swaps): a word inside the scope of a negation is never swapped, since
the result stays true of the target ("man without red hat" -> "man without beige hat": he is
without a beige one too). ``stages.text.phrases.negated_positions`` gives the scope: the noun
phrase after no/non/without/nothing/... ("man with no shirt in blue shorts" edits "blue"), the
rest of the clause after not/isnt/doesnt/never/... ("the one not on the left", "shirt that isnt
blue") up to where the negated predicate surely ends ("man not wearing a hat | on the left",
"girl not smiling | in pink", "not sitting | and not wearing a hat"; a position after a posture
verb, "dog not sitting on the left", stays inside); a clause ends at a relative pronoun, "that"
before a verb, or "but". Negation words count with or without apostrophes ("isn't"), and "no"
before a number is "number" ("player no 5"). A swap whose new word the sentence denies elsewhere
is no caption ("the left man not the right man" -> "the right man not the right man"): it is
not made (``swap_contradicts``).

``swap_color`` (random draw)
    Colour lexicon ``COLORS``: red blue green yellow white black orange purple pink brown gray
    grey tan beige silver gold. Decisions:

    * "dark"/"light" are NOT colours here: they are shade modifiers ("dark blue") and common nouns
      ("traffic light"); "dark blue shirt" edits "blue" and keeps "dark".
    * "blond"/"blonde" are NOT in the lexicon: they are hair colours, and swapping them with shirt
      colours ("purple woman") gives absurd, not hard, negatives.
    * Words merely containing a colour are never edited ("bright", "reddish", "redhead").
    * "grey" is accepted in input but never produced ("gray" is the canonical spelling).
    * Near-synonym groups ``COLOR_GROUPS`` (gray/grey/silver, tan/beige/brown, gold/yellow): a
      substitute is never in the group of the original nor in the group of any colour already in
      the sentence, because "gray shirt" -> "silver shirt" is not reliably false.
    * "orange" is the fruit (not a slot) when it is the head noun ("orange on the left"), when
      it ends a noun phrase right after a determiner/number ("bowl with an orange"), or before a
      fruit-part noun ("orange slice", "orange juice"); "an orange shirt" is a colour. "orange"
      is not drawn as a substitute where it would become the head ("the red" -> "the orange").

    Several colours -> distractor k edits colour slot ``k mod n`` (round-robin), each draw without
    replacement from that slot's remaining substitutes.

``swap_spatial`` (deterministic: each spatial word maps to its opposite)
    left<->right, leftmost<->rightmost, lefthand<->righthand, top<->bottom,
    topmost<->bottommost, uppermost<->lowermost, upper<->lower, highest<->lowest, higher->lower,
    above<->below, under/underneath/beneath->above, front<->back, inside<->outside,
    foreground<->background, closest/nearest->farthest, farthest/furthest->closest. Phrases,
    matched before single words: "in front of"->"behind", "in front"->"behind", "behind"->"in
    front of" (before a noun phrase) or "in front" (at the end / before a preposition), "on top
    of"->"under", "close to"->"far from", "far from"->"close to", "closest to"/"nearest
    to"->"farthest from", "farthest from"/"furthest from"->"closest to", "near"->"far from"
    (preposition) or "far" (before side/end/corner/edge or at the end), "far"->"near" only
    before side/end/corner/edge ("far left" is an intensifier: only "left" is edited; "near"
    before an adjective is still a preposition: "dog near red car" -> "dog far from red car"),
    "on top" (not followed by "of") -> "on the bottom". "near" is an adjective after a
    determiner ("the near one" -> "the far one"); closest/nearest/farthest/furthest are
    prepositions between two nouns or before a determiner ("man nearest the camera" -> "man
    farthest from the camera"), else adjectives ("the closest elephant" -> "the farthest
    elephant"). Not edited: "top" after tank/crop/halter/tube/bikini or before hat(s)
    (clothing), "bottom" after bikini, "back" after a verb ("looking back"), "right" as an
    adverb ("right next to", "right behind": the test of ``stages.text.positional``; also "right
    in the middle"), "left" as the verb ("the only one left", "left over", "was left", and after
    "only"/"last" as ``positional.left_is_verb`` reads it: "last one left", but "only left guy"
    is a place), closest/nearest/farthest/furthest before a position or direction, where they
    only intensify it as "far" does ("furthest right", "farthest to the left", "furthest away"),
    anything inside a negation's scope, and a swap the sentence denies elsewhere ("the left man
    not the right man"). Decision: with several spatial words, ONE word is edited per distractor
    (one distractor per word, in sentence order, up to ``per_kind``): "top left" -> "bottom
    left" and "top right". "middle"/"center" have no opposite and are never edited.

``swap_count`` (random draw)
    Cardinals one..ten and 1..10, ordinals first..tenth and 1st..10th. A substitute keeps the form
    (word/digit, cardinal/ordinal), lies within +-2 of the original value (1..10; near values are
    the hard ones) and is not a value already present in the sentence (cardinal and ordinal values
    are counted separately). Not a slot: "one" without a following noun ("right one", "the one on
    left", "one of", "one holding bat"), a number after "number", before "o"/"oclock"/"clock", an
    ordinal after "a" ("a second"), or a number inside a negation's scope ("man not holding two
    cups" is not holding three either). Agreement: crossing 1 <-> 2+ re-inflects the head noun
    of the following noun phrase with lemminflect ("one person" -> "two people", "two little
    girls" -> "one little girl"); when that head is missing or cannot be inflected the crossing
    substitutes are simply not drawn, so no ungrammatical count is ever generated (``validate``
    reports hand-made ones as "number agreement").

``negation`` (deterministic; verbal edits first, then prepositional ones, each in sentence order)
    * "is/are/was/were X" -> "is not X" ("man who is sitting" -> "man who is not sitting");
    * "has/have/had" -> "does/do/did not have" ("car that has ..." -> "car that does not
      have ..."), or "has not" before a participle ("has been");
    * a verb-s after who/that/which -> "does not <lemma>" ("dog that chases" -> "dog that does
      not chase"), also a verb-s right after the head noun when it is verbal (see ``head_noun``);
    * a verb-ing or an -ed/-en participle after a noun phrase -> "not <verb>" ("man holding an
      umbrella" -> "man not holding an umbrella", "car parked on street" -> "car not parked on
      street"). Not for nouns in -ing (``ING_NOUNS``: building, painting, ceiling ...), prenominal
      compounds (``COMPOUND_VBG`` + noun: "dining table", "folding chair"), participles that can
      be nouns ("shed"), after a bare adjective ("white dining table"), nor for an adjective
      between a modifier and its noun (``phrases.is_np_end``: "purple potted plant", "red parked
      car", "two sleeping cats"; a verb-ing after a position or a worn colour still is a verb:
      "man on the left holding bat", "man in white holding bat");
    * an existing negation is removed (also wrong for the target): "does not have" -> "has",
      "doesnt have" (or "doesn't have") -> "has", "isnt"/"arent"/"wasnt"/"werent"/"hasnt"/...
      (with or without the apostrophe) -> "is"/"are"/...,
      "without" -> "with", "non" and "no" after with/wearing are dropped ("the non smiling man"
      -> "the smiling man", "man with no shirt" -> "man with shirt"), and "not" after an
      auxiliary or before a verb form / preposition ("is not sitting" -> "is sitting", "man not
      wearing hat" -> "man wearing hat");
    * every edit must flip its clause: it adds or removes exactly one negation word
      (``negation_flips``) and touches no other (``double_negation``: the edit inside another
      negation's scope, a negation of the edit whose scope holds another, two negations side by
      side, or a negated noun phrase earlier in the clause), so "man wearing no shirt" is never
      negated to "man not wearing no shirt", "man who isnt wearing a hat" to "... isnt not
      wearing ...", nor "a plate with no food on it" to "... no food not on it"; a coordinated
      predicate is negated on its own ("a man who is not sitting and not wearing a hat" -> "a
      man who is sitting and not wearing a hat", "guy in red not wearing hat" -> "guy not in
      red not wearing hat");
    * "with" -> "without" after a noun phrase ("woman with a hat" -> "woman without a hat");
    * a locative preposition after a noun phrase gets "not" ("dog on the couch" -> "dog not on
      the couch"): in on at near by behind under underneath beneath above below beside inside
      outside between among against along across atop over around into onto through toward(s),
      and "next" before "to"; after the adverb "right" the "not" goes before it ("guy not right
      next to the girl"). Never "of", "from", "to", "for" ("second from left").

``role_reversal`` (deterministic)
    Pattern ``NP1 [who|that|which [is|are]] VERB NP2 [rest]`` where NP1 starts the sentence and
    ends at its head noun, VERB is a transitive verb-ing (or verb-s followed by a determiner /
    after a relative pronoun), not in ``INTRANSITIVE`` (stand, sit, look ...), and NP2 follows
    the verb directly and ends at its head noun, or after the "of" phrase and the number that
    follow it ("woman holding cup of coffee" -> "cup of coffee holding woman", "man wearing
    number 5" -> "number 5 wearing man", "player wearing number 22" -> "number 22 wearing
    player"); skipped when a conjunction follows NP2 ("man holding bat and ball": how far it
    reaches is unknown) and when a negation comes before NP2's head ("man wearing no shirt").
    The two noun phrases (with their adjectives) swap: "big dog chasing small cat" -> "small cat
    chasing big dog". Determiners: when both are articles (or absent), no number word is
    involved and a/an never lands on a plural, the determiners stay in place and a/an is
    re-chosen ("man holding the child" -> "child holding the man", "a man holding an umbrella"
    -> "an umbrella holding a man"); otherwise the whole phrases swap ("two men holding a baby"
    -> "a baby holding two men"). Skipped when both heads are the same noun, or when verb-s /
    "is/are" would then disagree in number with the new subject. The rule does not judge
    plausibility ("shirt wearing a man" is produced; it is false for the target).

``head_noun`` (the heuristic head of the first noun phrase, no parser) is described in
:mod:`stages.text.phrases`.

Validation (``validate``; the reason strings, in the order checked)
====================================================================
"empty" (no tokens), "identical" (same tokens), "unknown kind", "edit outside slot" (the
source and the distractor must agree on every token before ``span[0]`` and after ``span[1]``,
so only the span changed, insertions at either span boundary - the +-1 allowance for an inserted
"not"/"without" - included; the ``slot`` string must also name exactly the replaced and the new
words), "head noun changed" (``head_noun`` lemmas differ; not for role_reversal), "head noun not
swapped" (role_reversal: the new head must be the head of the source's second noun phrase),
"under negation" (swap_color/swap_spatial/swap_count: a replaced word of the source or a new word
of the distractor inside a negation's scope, see above), "self-contradiction" (the same three:
a new word, position forms by their direction, also stands inside a negation's scope elsewhere
in the distractor: "the right man not the right man"), "double negation" (negation: the edit
touches a second negation, ``double_negation`` above), "synonym" (colour in the same
``COLOR_GROUPS`` group, or the same number value: "two"->"2"),
"number agreement" (swap_count: in the edited region a cardinal 1 now precedes a plural head
noun, or 2+ a singular one, while the source agreed there - "an eight year old" never did), and
"describes another instance" (swap_spatial with a ``SceneContext`` only, below).

Geometry rule ("describes another instance")
    The positional words of the whole distractor (``stages.text.positional.positional_words``:
    the same left / right / top / bottom words and clock positions that restrict a mosaic
    quadrant, "right" as an adverb excluded) form its description. Box centres are compared
    among the target and ``same_class_boxes``. A direction holds for an instance when it is the
    extreme instance in that direction (smallest centre x for left, largest for right, smallest
    centre y for top, largest for bottom), or when its centre lies in that outer third of the
    image (x < w/3 for left, x > 2w/3 for right, y < h/3 top, y > 2h/3 bottom); a negated
    word ("not on the left", ``positional.negated_words``) holds when its direction does not.
    The distractor is rejected when some OTHER same-class instance satisfies every direction
    of the description: then the new caption is true of an object in the image and is no
    negative for "the image". The target itself is not tested (its annotation says where it
    is); relational words (above, front, near, ...) are depth/relations that boxes cannot
    decide and are never rejected here.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from stages.text.distractor_edits import (
    SPATIAL_OPPOSITES,
    Edit,
    apply_edit,
    color_group,
    color_options,
    count_options,
    double_negation,
    negation_edits,
    role_edits,
    role_pattern,
    spatial_edits,
    swap_contradicts,
    swap_under_negation,
)
from stages.text.lexicon import (
    COLOR_GROUPS,
    COLOR_SET,
    COLORS,
    NUMBERS,
)
from stages.text.morphology import (
    article,
    lemmas,
    noun_lemma,
    noun_number,
)
from stages.text.phrases import (
    chunk_head_index,
    head_noun,
)
from stages.text.positional import OPPOSITE, negated_words, positional_words

__all__ = [
    "COLORS",
    "COLOR_GROUPS",
    "KINDS",
    "NUMBERS",
    "SPATIAL_OPPOSITES",
    "Distractor",
    "Rejection",
    "SceneContext",
    "generate",
    "generate_validated",
    "head_noun",
    "lemmas",
    "noun_lemma",
    "validate",
]
# COLORS, COLOR_GROUPS, NUMBERS (stages.text.lexicon), head_noun (stages.text.phrases), lemmas
# and noun_lemma (stages.text.morphology) are re-exported: the llm backend validates and
# describes its distractors with the very same words and lemmas as the rules.

KINDS = ("swap_color", "swap_spatial", "swap_count", "negation", "role_reversal")

# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distractor:
    """One minimal edit of a referring expression that makes it wrong for its target."""

    kind: str
    text: str
    slot: str  # "<replaced source words>-><new words>", e.g. "red->blue"
    span: tuple[int, int]  # half-open token span of the source that was replaced


@dataclass(frozen=True)
class Rejection:
    """A candidate distractor that ``validate`` refused, with the reason (kept for auditing)."""

    kind: str
    text: str
    reason: str


Box = tuple[float, float, float, float]


@dataclass
class SceneContext:
    """What the image says about the target's class, for the swap_spatial geometry check."""

    target_box: Box  # COCO xywh
    same_class_boxes: list[Box]  # the OTHER instances of the target's category in the image
    image_size: tuple[int, int]  # (w, h)


# --------------------------------------------------------------------------------------------
# Tokens (the candidate edits per kind are in stages.text.distractor_edits)
# --------------------------------------------------------------------------------------------


def _tokens(sentence: str) -> list[str]:
    return sentence.lower().split()


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _rng(seed: int | Sequence[int], sentence: str, kind: str) -> random.Random:
    """A stream that depends only on (seed, sentence, kind): stable across processes/runs."""
    seed_key = str(seed) if isinstance(seed, int) else ",".join(str(int(s)) for s in seed)
    digest = hashlib.sha256(f"{seed_key}\x1f{sentence}\x1f{kind}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _draw(options: list[list[Edit]], limit: int, rng: random.Random | None) -> list[Edit]:
    """Round-robin over slots, drawing without replacement (the first remaining edit when
    ``rng`` is None). The result for ``limit`` k is a prefix of the result for k + 1, which
    ``generate_validated`` relies on for spare candidates."""
    pools = [list(edits) for edits in options if edits]
    out: list[Edit] = []
    k = 0
    while len(out) < limit and any(pools):
        pool = pools[k % len(pools)]
        k += 1
        if pool:
            out.append(pool.pop(rng.randrange(len(pool)) if rng is not None else 0))
    return out


def _with_article(tokens: Sequence[str], edit: Edit) -> Edit:
    """Re-choose a preceding a/an when the edit changes the first sound ("a red" -> "an
    orange"); the article then becomes part of the edited span."""
    s, e, new = edit
    if s == 0 or not new or tokens[s - 1] not in ("a", "an"):
        return edit
    art = article(new[0])
    if art == tokens[s - 1]:
        return edit
    return (s - 1, e, (art, *new))


_RANDOM_KINDS = frozenset({"swap_color", "swap_count"})
_SWAP_KINDS = frozenset({"swap_color", "swap_spatial", "swap_count"})


def _options(tokens: list[str], kind: str) -> list[list[Edit]]:
    """The rules' raw candidate edits, grouped by slot (one edit per slot for the deterministic
    kinds), in sentence order, before any validation."""
    if kind == "swap_color":
        return [[_with_article(tokens, e) for e in edits] for _, edits in color_options(tokens)]
    if kind == "swap_count":
        return [[_with_article(tokens, e) for e in edits] for _, edits in count_options(tokens)]
    if kind == "swap_spatial":
        return [[_with_article(tokens, e)] for e in spatial_edits(tokens)]
    if kind == "negation":
        return [[e] for e in negation_edits(tokens)]
    if kind == "role_reversal":
        return [[e] for e in role_edits(tokens)]
    raise ValueError(f"unknown distractor kind {kind!r}; expected one of {KINDS}")


def _make(tokens: Sequence[str], kind: str, edit: Edit) -> Distractor:
    s, e, repl = edit
    slot = f"{' '.join(tokens[s:e])}->{' '.join(repl)}"
    return Distractor(kind=kind, text=" ".join(apply_edit(tokens, edit)), slot=slot, span=(s, e))


def generate(
    sentence: str,
    kinds: Sequence[str] = KINDS,
    per_kind: int = 2,
    seed: int | Sequence[int] = 0,
) -> list[Distractor]:
    """Up to ``per_kind`` distractors of each kind in ``kinds`` (in that order).

    Random substitutes (colour, count) come from a stream seeded by (seed, sentence, kind), so a
    fixed seed reproduces the same distractors in any process; spatial, negation and role
    reversal edits are deterministic. A sentence without a slot for a kind yields none of it.
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    tokens = _tokens(sentence)
    out: list[Distractor] = []
    if per_kind <= 0 or not tokens:
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown distractor kind {kind!r}; expected one of {KINDS}")
        return out
    sentence = " ".join(tokens)
    for kind in kinds:
        # Guard: keep only candidates that pass the context-free validation, so a rule slip on
        # an odd sentence never reaches the training data (the rules alone are tested too).
        options = [
            [e for e in slot if validate(sentence, _make(tokens, kind, e)) is None]
            for slot in _options(tokens, kind)
        ]
        rng = _rng(seed, sentence, kind) if kind in _RANDOM_KINDS else None
        out.extend(_make(tokens, kind, e) for e in _draw(options, per_kind, rng))
    return out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _centre(box: Box) -> tuple[float, float]:
    x, y, w, h = box
    return x + w / 2.0, y + h / 2.0


def _describes_other_instance(dst: Sequence[str], context: SceneContext) -> bool:
    # a negated word is tested as "not X" (positional_words gives its opposite, "not left" as
    # "right", which is exact on the 2x2 mosaic only: here "not left" is a larger region)
    negated = negated_words(dst)
    dirs = set(positional_words(dst)) - {OPPOSITE[w] for w in negated}
    if not (dirs or negated) or not context.same_class_boxes:
        return False
    width, height = context.image_size
    centres = [_centre(context.target_box)] + [_centre(b) for b in context.same_class_boxes]
    xs = [c[0] for c in centres]
    ys = [c[1] for c in centres]
    eps = 1e-6

    def holds(cx: float, cy: float, d: str) -> bool:
        if d == "left":
            return cx <= min(xs) + eps or (width > 0 and cx < width / 3.0)
        if d == "right":
            return cx >= max(xs) - eps or (width > 0 and cx > 2.0 * width / 3.0)
        if d == "top":
            return cy <= min(ys) + eps or (height > 0 and cy < height / 3.0)
        return cy >= max(ys) - eps or (height > 0 and cy > 2.0 * height / 3.0)

    return any(all(holds(cx, cy, d) for d in dirs) and not any(holds(cx, cy, d) for d in negated)
               for cx, cy in centres[1:])


def _slot_matches(d: Distractor, src: list[str], dst: list[str]) -> bool:
    s, e = d.span
    if not (0 <= s <= e <= len(src)):
        return False
    tail = len(src) - e
    if len(dst) < s + tail or dst[:s] != src[:s] or dst[len(dst) - tail:] != src[e:]:
        return False
    if "->" not in d.slot:
        return False
    before, after = d.slot.split("->", 1)
    return before.split() == src[s:e] and after.split() == dst[s:len(dst) - tail]


def _number_agreement_ok(dst: list[str], start: int, stop: int) -> bool:
    for j in range(start, min(stop, len(dst))):
        w = dst[j]
        if w not in NUMBERS or not NUMBERS[w][0].startswith("card"):
            continue
        h = chunk_head_index(dst, j + 1)
        if h is None or dst[h] in ("one", "ones") or dst[h] in NUMBERS:
            continue
        number = noun_number(dst[h])
        value = NUMBERS[w][1]
        if (value == 1 and number == "pl") or (value >= 2 and number == "sg"):
            return False
    return True


def validate(source: str, d: Distractor, context: SceneContext | None = None) -> str | None:
    """Why ``d`` is not a usable hard negative of ``source`` (a short reason), or None.

    A negative must stay about the same object (same head noun), differ only in its declared
    slot (so the loss learns that slot), and - for spatial swaps, when the scene is known - must
    not become true of another instance of the same class.
    """
    src = _tokens(source)
    dst = _tokens(d.text)
    if not dst:
        return "empty"
    if dst == src:
        return "identical"
    if d.kind not in KINDS:
        return "unknown kind"
    if not _slot_matches(d, src, dst):
        return "edit outside slot"
    if d.kind == "role_reversal":
        pat = role_pattern(src)
        new_head = noun_lemma(head_noun(dst))
        if pat is None or new_head != noun_lemma(src[pat[3]]):
            return "head noun not swapped"
    elif noun_lemma(head_noun(src)) != noun_lemma(head_noun(dst)):
        return "head noun changed"
    s, e = d.span
    new_words = dst[s:len(dst) - (len(src) - e)]
    old_words = src[s:e]
    if d.kind in _SWAP_KINDS and swap_under_negation(src, s, e, dst):
        return "under negation"
    if d.kind in _SWAP_KINDS and swap_contradicts(src, s, e, dst):
        return "self-contradiction"
    if d.kind == "negation" and double_negation(src, s, e, new_words):
        return "double negation"
    if d.kind == "swap_color":
        for old, new in zip(old_words, new_words, strict=False):
            if old != new and old in COLOR_SET and new in color_group(old):
                return "synonym"
    if d.kind == "swap_count":
        old_vals = [NUMBERS[w][1] for w in old_words if w in NUMBERS]
        new_vals = [NUMBERS[w][1] for w in new_words if w in NUMBERS]
        if old_vals and old_vals == new_vals:
            return "synonym"
        # only where the source itself agrees ("an eight year old" does not, and is fine)
        if not _number_agreement_ok(dst, s, s + len(new_words)) and _number_agreement_ok(
                src, s, e):
            return "number agreement"
    if d.kind == "swap_spatial" and context is not None and _describes_other_instance(dst, context):
        return "describes another instance"
    return None


def generate_validated(
    sentence: str,
    kinds: Sequence[str] = KINDS,
    per_kind: int = 2,
    seed: int | Sequence[int] = 0,
    context: SceneContext | None = None,
) -> tuple[list[Distractor], list[Rejection]]:
    """``generate`` + ``validate``: up to ``per_kind`` valid distractors per kind, and the
    rejected candidates with their reasons.

    A rejected candidate is replaced by the next one of the same kind when there is one
    (candidate lists are prefix-stable, so the kept ones match ``generate`` whenever nothing is
    rejected); at most ``2 * per_kind`` candidates are examined per kind. Since ``generate``
    already drops context-free failures, rejections here come from the scene (``context``).
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    kept: list[Distractor] = []
    rejected: list[Rejection] = []
    for kind in kinds:
        n_ok = 0
        for d in generate(sentence, (kind,), per_kind=2 * per_kind, seed=seed):
            if n_ok >= per_kind:
                break
            reason = validate(sentence, d, context)
            if reason is None:
                kept.append(d)
                n_ok += 1
            else:
                rejected.append(Rejection(kind=kind, text=d.text, reason=reason))
    return kept, rejected
