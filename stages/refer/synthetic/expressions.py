"""Referring expressions of the synthetic REFER data, derived from a scene's annotations.

Colour, category, position among same-category instances, counts and the nearest neighbour,
in the style of each release: short game-style RefCOCO, appearance-only RefCOCO+, full-sentence
RefCOCOg, gRefCOCO multi- and no-target expressions; `style` then adds the annotator's
capitals, punctuation and stray spaces.
"""

from __future__ import annotations

import numpy as np

from stages.refer.synthetic.scenes import (
    COLOR_NAMES,
    PERSON,
    PERSON_NOUNS,
    SPECS,
    Obj,
    Scene,
    clean_sentence,
    pick,
)

_PERSON_PLURAL = {"man": "men", "woman": "women", "child": "kids"}
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth"}
# RefCOCO+ annotators were not allowed absolute location words.
LOCATION_WORDS = frozenset({"left", "right", "top", "bottom", "middle", "center", "upper",
                            "lower", "leftmost", "rightmost", "first", "second", "third",
                            "fourth", "fifth", "sixth", "far", "front", "back", "behind"})


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _noun(rng: np.random.Generator, o: Obj) -> str:
    return pick(rng, PERSON_NOUNS[o.kind]) if o.spec is PERSON else pick(rng, o.spec.nouns)


def _color_phrase(rng: np.random.Generator, o: Obj, noun: str) -> str:
    c = o.color
    if o.spec is PERSON:
        return pick(rng, (f"{noun} in {c}", f"{c} shirt", f"{noun} wearing {c}", f"{c} {noun}"))
    return pick(rng, (f"{c} {noun}", f"the {c} {noun}", f"{c} {noun}"))


def _describe(rng: np.random.Generator, o: Obj) -> str:
    """'red car' / 'man in blue': how a neighbour is named."""
    n = _noun(rng, o)
    return f"{n} in {o.color}" if o.spec is PERSON else f"{o.color} {n}"


def _rank_word(scene: Scene, o: Obj) -> str | None:
    """Position of o among its category's instances, left to right."""
    same = scene.same(o)
    k, i = len(same), same.index(o)
    if k == 1:
        return None
    if k == 2:
        return ("left", "right")[i]
    if k == 3:
        return ("left", "middle", "right")[i]
    if i == 0:
        return "far left"
    if i == k - 1:
        return "far right"
    return f"{_ORDINALS[i + 1]} from left" if i < k - 1 - i else f"{_ORDINALS[k - i]} from right"


def _vertical_extreme(scene: Scene, o: Obj) -> str | None:
    """'top'/'bottom' when o is clearly the highest/lowest of its category."""
    others = [p for p in scene.same(o) if p is not o]
    if not others:
        return None
    gap = 0.15 * scene.height
    if all(o.cy < p.cy - gap for p in others):
        return "top"
    if all(o.cy > p.cy + gap for p in others):
        return "bottom"
    return None


def _size_word(scene: Scene, o: Obj) -> str | None:
    others = [p for p in scene.same(o) if p is not o]
    if not others:
        return None
    if all(o.area > 1.3 * p.area for p in others):
        return "big" if len(others) == 1 else "biggest"
    if all(o.area * 1.3 < p.area for p in others):
        return "small" if len(others) == 1 else "smallest"
    return None


def _relation(scene: Scene, o: Obj, m: Obj) -> str:
    """'under' / 'above' / 'next to' from the two boxes."""
    ox, oy, ow, oh = o.bbox
    mx, my, mw, mh = m.bbox
    overlap_x = min(ox + ow, mx + mw) - max(ox, mx) > 0.3 * min(ow, mw)
    if overlap_x and my + mh <= oy + 0.25 * oh:
        return "under"
    if overlap_x and oy + oh <= my + 0.25 * mh:
        return "above"
    return "next to"


def _pick_distinct(rng: np.random.Generator, first: str, pool: list[str], n: int) -> list[str]:
    out = [first]
    pool = list(dict.fromkeys(p for p in pool if p != first))
    while len(out) < n and pool:
        out.append(pool.pop(int(rng.integers(len(pool)))))
    return out


def refcoco_texts(rng: np.random.Generator, scene: Scene, o: Obj, n_sent: int) -> list[str]:
    """Short game-style expressions (RefCOCO): color, position, ordinals, neighbours."""
    same = scene.same(o)
    k, i = len(same), same.index(o)
    color_unique = sum(p.color == o.color for p in same) == 1
    rank = _rank_word(scene, o)
    first = _color_phrase(rng, o, _noun(rng, o))
    if rank is not None and (not color_unique or rng.random() < 0.3):
        if rank in ("left", "right", "middle") and o.spec is not PERSON and rng.random() < 0.5:
            first = f"{rank} {o.color} {_noun(rng, o)}"
        else:
            first = pick(rng, (f"{first} on {rank}", f"{first} {rank}", f"{first}, {rank}"))
    pool: list[str] = []
    n = _noun(rng, o)
    if rank is not None:
        where = "on the" if rank in ("left", "right") else "in the" if rank == "middle" else ""
        pool += [f"{rank} {n}", f"{n} {rank}", f"{rank} one"]
        if where:
            pool.append(f"{n} {where} {rank}")
        if k >= 3:
            pool += [f"{_ORDINALS[i + 1]} {n} from left", f"the {_ORDINALS[i + 1]} {n}"]
            if i > 0:
                pool.append(f"{_ORDINALS[k - i]} {n} from right")
        if rng.random() < 0.15:
            pool.append(rank)
    else:
        h, v = scene.habs(o), scene.vabs(o)
        pool += [n, f"the {n}"]
        if h != "middle" and v != "middle":
            pool.append(f"{v} {h} {n}")
        if h != "middle":
            pool += [f"{n} on {h}", f"{h} {n}"]
        else:
            pool.append(f"middle {n}")
        if v != "middle":
            pool.append(f"{v} {n}")
    vert = _vertical_extreme(scene, o)
    if vert is not None:
        pool += [f"{vert} {n}", f"{n} on {vert}" if vert == "top" else f"lower {n}"]
    m = scene.nearest(o)
    if m is not None:
        rel = _relation(scene, o, m)
        pool += [f"{n} {rel} {_describe(rng, m)}", f"{n} {rel} the {_noun(rng, m)}"]
    return _pick_distinct(rng, first, pool, n_sent)


def refcoco_plus_texts(rng: np.random.Generator, scene: Scene, o: Obj,
                        n_sent: int) -> list[str]:
    """Appearance-only expressions (RefCOCO+): no location words."""
    same = scene.same(o)
    color_unique = sum(p.color == o.color for p in same) == 1
    size = _size_word(scene, o)
    n = _noun(rng, o)
    first = _color_phrase(rng, o, n)
    if not color_unique and size is not None:
        first = f"{size} {o.color} {n}"
    pool = [f"{o.color} {n}", f"{o.color} one", _color_phrase(rng, o, _noun(rng, o))]
    if o.spec is PERSON:
        pool += [f"{n} wearing {o.color} shirt", f"{o.color} shirt"]
    if size is not None:
        pool += [f"{size} {n}", f"{size} {o.color} {_noun(rng, o)}"]
    if len(same) == 1:
        pool.append(n)
    m = scene.nearest(o)
    if m is not None:
        pool += [f"{n} next to {_describe(rng, m)}", f"{o.color} {n} near the {_noun(rng, m)}"]
    texts = _pick_distinct(rng, first, pool, n_sent)
    assert not any(set(clean_sentence(t)) & LOCATION_WORDS for t in texts), texts
    return texts


def refcocog_texts(rng: np.random.Generator, scene: Scene, o: Obj, n_sent: int) -> list[str]:
    """Longer full-sentence descriptions (RefCOCOg)."""
    n = _noun(rng, o)
    c = o.color
    subj = pick(rng, (f"a {n} in {c}", f"a {n} wearing a {c} shirt")) if o.spec is PERSON \
        else f"{_article(c)} {c} {n}"
    h = scene.habs(o)
    pos = pick(rng, (f"on the {h} side of the picture", f"on the {h}")) if h != "middle" \
        else pick(rng, ("in the middle of the picture", "in the center of the image"))
    m = scene.nearest(o)
    if m is None:
        rel = pick(rng, ("with nothing else around it", "all by itself"))
    else:
        d = _describe(rng, m)
        kind = _relation(scene, o, m)
        if kind == "above" and o.spec.name == "umbrella" and m.spec is PERSON:
            rel = f"held above {_article(d)} {d}"
        elif kind in ("above", "under"):
            rel = f"{'below' if kind == 'under' else 'above'} {_article(d)} {d}"
        else:
            side = "left" if o.cx < m.cx else "right"
            rel = pick(rng, (f"next to {_article(d)} {d}", f"to the {side} of {_article(d)} {d}"))
    act = pick(rng, o.spec.actions)
    pool = [f"{subj} {act} {rel} {pos}", f"the {c} {n} that is {act} {rel}",
            f"{subj} {pos}, {rel}", f"{subj} {act} {pos}"]
    same = scene.same(o)
    if len(same) >= 2:
        i = same.index(o)
        plural = o.spec.plural
        pool.append(f"the {_ORDINALS[i + 1]} {n} from the left, the {c} one {act}")
        if i in (0, len(same) - 1):
            side = "left" if i == 0 else "right"
            pool.append(f"the {side}most of the {_NUMBERS[len(same)]} {plural}, {rel}")
    first = pool.pop(int(rng.integers(2)))
    return _pick_distinct(rng, first, pool, n_sent)


def _plural_of(group: list[Obj]) -> str:
    spec = group[0].spec
    if spec is PERSON:
        kinds = {o.kind for o in group}
        return _PERSON_PLURAL[kinds.pop()] if len(kinds) == 1 else "people"
    return spec.plural


def multi_texts(rng: np.random.Generator, scene: Scene, group: list[Obj], whole: bool,
                 n_sent: int) -> list[str]:
    """gRefCOCO multi-target expressions that name all targets."""
    k = len(group)
    num = _NUMBERS[k]
    if all(o.spec is group[0].spec for o in group):
        p = _plural_of(group)
        if whole:
            pool = [f"{num} {p}", f"the {p}", f"all {p}"]
            pool.append(f"both {p}" if k == 2 else f"all {num} {p}")
        else:
            side = "left" if group[0] is scene.same(group[0])[0] else "right"
            pool = [f"{num} {p} on the {side}", f"the {side} {num} {p}", f"{p} on {side}"]
        colors = [o.color for o in sorted(group, key=lambda o: o.cx)]
        if len(set(colors)) == k:
            pool.append(f"the {' and '.join(colors)} {p}")
        first = pool.pop(0)
    else:
        names = [_describe(rng, o) for o in group]
        bare = [_noun(rng, o) for o in group]
        pool = [" and ".join(names), "the " + " and the ".join(bare), " and ".join(bare)]
        if k == 3:
            pool.append(f"{names[0]}, {names[1]} and {names[2]}")
        first = pool.pop(int(rng.integers(len(pool))))
    return _pick_distinct(rng, first, pool, n_sent)


def absent_texts(rng: np.random.Generator, scene: Scene, n_sent: int) -> list[str]:
    """gRefCOCO no-target expressions: a category/color combination the image lacks."""
    present = {(o.spec.name, o.color) for o in scene.objs + scene.crowds}
    while True:
        spec, color = pick(rng, SPECS), pick(rng, COLOR_NAMES)
        if (spec.name, color) not in present:
            break
    n = pick(rng, PERSON_NOUNS[pick(rng, tuple(PERSON_NOUNS))]) if spec is PERSON \
        else pick(rng, spec.nouns)
    side = pick(rng, ("left", "right"))
    base = f"{n} in {color}" if spec is PERSON else f"{color} {n}"
    pool = [f"the {base}", f"{base} on the {side}", f"{base} {side}", base]
    return _pick_distinct(rng, pool.pop(0 if rng.random() < 0.5 else 3), pool, n_sent)


def style(rng: np.random.Generator, text: str, long: bool) -> str:
    """The annotator's raw text: capitals, punctuation, a stray trailing space."""
    r = rng.random()
    if long:
        raw = text[0].upper() + text[1:] if r < 0.85 else text
        raw += "." if rng.random() < 0.75 else ""
    else:
        raw = text.upper() if r < 0.04 else text[0].upper() + text[1:] if r < 0.3 else text
        raw += "." if rng.random() < 0.1 else ""
    if rng.random() < 0.08:
        raw += " "
    return raw

