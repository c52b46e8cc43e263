"""A small synthetic dataset in the exact on-disk formats of the REFER releases.

The real RefCOCO / RefCOCO+ / RefCOCOg / gRefCOCO files cannot be downloaded in CI, yet the
pipeline must be exercised on their real formats (pickled refs, COCO instances with polygon,
compressed-RLE and crowd uncompressed-RLE masks, real JPEGs, every split name, multi- and
no-target gRefCOCO refs) and on deliberately broken inputs. `write_demo_data` draws such a
dataset deterministically: same `(n_images, seed)`, same bytes.

Every object is a filled shape whose pixels are exactly its annotation's mask (before JPEG
compression and occlusion by objects drawn later), and every expression is derived from the
annotations (color, category, position, counts, nearest neighbour), so tests can check images,
masks and text against each other. As in the releases, only polygon objects are referred to
(REFER's `getMask` cannot read other targets); compressed-RLE and crowd objects are context.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

__all__ = ["COCO_CATEGORIES", "COLORS", "DemoSummary", "write_demo_data"]

T = TypeVar("T")

MIN_IMAGES = 12  # 4 UNC splits x 2 images, plus images only in one of the two image sets
JPEG_QUALITY = 90
PICKLE_PROTOCOL = 2  # the REFER pickles were written by Python 2
JSON_SEPARATORS = (",", ":")
UNC_SPLITS = ("train", "val", "testA", "testB")
UMD_SPLITS = ("train", "val", "test")
GOOGLE_SPLITS = ("train", "val")
BROKEN_CASES = {
    "missing_refs": "refcoco/refs(unc).p is absent",
    "missing_instances": "refcoco/instances.json is absent",
    "bad_pickle": "refcoco/refs(unc).p is a truncated pickle (garbage to a loader)",
    "bad_json": "refcoco/instances.json is cut off mid-way",
    "dangling_ann": "one ref's ann_id is not among the annotations of instances.json",
    "dangling_image": "one ref's image_id is not among the images of instances.json",
    "unknown_split": "one ref has split 'training', not a UNC split name",
    "images_missing_and_corrupt": "valid refcoco files whose own images/train2014 folder lacks "
                                  "one image and holds one truncated JPEG",
    "bad_geometry": "valid refcoco files except four annotations that refs point at (an "
                    "odd-length polygon, an empty polygon, a 3-value bbox, a negative bbox "
                    "width) and one no ref points at (a 4-coordinate polygon): ingest records "
                    "them in errors and drops the refs of the first four",
}
BROKEN_IMAGES_USED = 8  # images in each broken root: small, so error tests stay fast
_ABSENT_ANN_ID = 9_999_999  # never allocated (ids stay far below), used by dangling_ann
_ABSENT_IMAGE_ID = 999_999  # image ids are drawn below this one, used by dangling_image

# Named colors and the RGB they are drawn with: well apart, so a JPEG'd mask stays nearest
# to its own color.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35),
    "orange": (240, 130, 20),
    "yellow": (240, 210, 40),
    "green": (40, 150, 60),
    "blue": (35, 75, 200),
    "purple": (125, 45, 160),
    "pink": (240, 145, 185),
    "brown": (120, 72, 35),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
}
_COLOR_NAMES = tuple(COLORS)


@dataclass(frozen=True)
class _CatSpec:
    """How a category looks (shape, size) and how annotators name it."""

    id: int
    name: str
    supercategory: str
    nouns: tuple[str, ...]
    plural: str
    aspect: tuple[float, float]  # box width / height
    height: tuple[float, float]  # box height as a fraction of the image height
    actions: tuple[str, ...]  # RefCOCOg verb phrases
    weight: float = 1.0  # how often it is drawn


_SPECS: tuple[_CatSpec, ...] = (
    _CatSpec(1, "person", "person", ("person",), "people", (0.36, 0.48), (0.42, 0.75),
             ("standing", "walking", "waiting", "looking at the camera"), 3.0),
    _CatSpec(3, "car", "vehicle", ("car", "vehicle"), "cars", (1.7, 2.2), (0.16, 0.28),
             ("parked", "driving by", "waiting at the curb")),
    _CatSpec(13, "stop sign", "outdoor", ("stop sign", "sign"), "stop signs", (0.45, 0.55),
             (0.3, 0.45), ("mounted on a pole", "standing by the road")),
    _CatSpec(17, "cat", "animal", ("cat", "kitty"), "cats", (1.2, 1.5), (0.18, 0.3),
             ("sitting", "lying down", "looking at the camera")),
    _CatSpec(18, "dog", "animal", ("dog", "puppy"), "dogs", (1.2, 1.45), (0.22, 0.36),
             ("sitting", "standing", "wagging its tail")),
    _CatSpec(19, "horse", "animal", ("horse",), "horses", (1.1, 1.35), (0.35, 0.55),
             ("standing", "grazing quietly")),
    _CatSpec(28, "umbrella", "accessory", ("umbrella",), "umbrellas", (1.1, 1.4), (0.25, 0.4),
             ("held up", "that is open")),
    _CatSpec(44, "bottle", "kitchen", ("bottle",), "bottles", (0.3, 0.38), (0.2, 0.36),
             ("standing upright", "that is full")),
    _CatSpec(47, "cup", "kitchen", ("cup", "mug"), "cups", (1.0, 1.2), (0.14, 0.22),
             ("sitting on the table", "filled with coffee")),
    _CatSpec(51, "bowl", "kitchen", ("bowl",), "bowls", (1.6, 2.1), (0.12, 0.18),
             ("sitting on the table", "that is empty")),
    _CatSpec(62, "chair", "furniture", ("chair", "seat"), "chairs", (0.6, 0.78), (0.3, 0.45),
             ("that is empty", "standing on the floor")),
    _CatSpec(64, "potted plant", "furniture", ("plant", "potted plant"), "plants", (0.6, 0.8),
             (0.28, 0.42), ("growing in a pot", "placed on the floor")),
)
_SPEC_BY_NAME = {s.name: s for s in _SPECS}
_PERSON = _SPEC_BY_NAME["person"]
_NON_PERSON = tuple(s for s in _SPECS if s is not _PERSON)

COCO_CATEGORIES: list[dict[str, Any]] = [
    {"supercategory": s.supercategory, "id": s.id, "name": s.name}
    for s in sorted(_SPECS, key=lambda s: s.id)
]

_PERSON_NOUNS = {"man": ("man", "guy", "person"), "woman": ("woman", "lady", "person"),
                 "child": ("kid", "child", "little kid")}
_PERSON_PLURAL = {"man": "men", "woman": "women", "child": "kids"}
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth"}
# RefCOCO+ annotators were not allowed absolute location words.
LOCATION_WORDS = frozenset({"left", "right", "top", "bottom", "middle", "center", "upper",
                            "lower", "leftmost", "rightmost", "first", "second", "third",
                            "fourth", "fifth", "sixth", "far", "front", "back", "behind"})


@dataclass(frozen=True)
class DemoSummary:
    """Where the demo data went and how much of it there is (per dataset manifest name)."""

    out_dir: Path
    images_dir: Path
    refer_root: Path
    n_images: int
    seed: int
    datasets: dict[str, dict[str, int]] = field(default_factory=dict)
    broken_dir: Path | None = None


# --------------------------------------------------------------------------------------------
# small helpers


def _pick(rng: np.random.Generator, seq: Sequence[T]) -> T:
    """A uniformly chosen element, as the element itself (never a numpy scalar)."""
    return seq[int(rng.integers(len(seq)))]


def _draw_count(rng: np.random.Generator, probs: dict[int, float]) -> int:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def image_file_name(image_id: int) -> str:
    """COCO train2014 file name of an image id."""
    return f"COCO_train2014_{image_id:012d}.jpg"


def clean_sentence(raw: str) -> list[str]:
    """The tokens REFER stores for a raw expression: lowercase, punctuation removed."""
    return re.sub(r"[^a-z0-9 ]+", " ", raw.lower()).split()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=JSON_SEPARATORS)


# --------------------------------------------------------------------------------------------
# shapes: normalized polygons in the unit box, (u, v) with v pointing down


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 20, a0: float = 0.0,
             a1: float = 2 * np.pi, endpoint: bool = False) -> np.ndarray:
    t = np.linspace(a0, a1, n, endpoint=endpoint)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _poly(*pts: tuple[float, float]) -> np.ndarray:
    return np.array(pts, dtype=float)


def _shape_polygons(name: str, aspect: float) -> list[np.ndarray]:
    """The polygons of a category's silhouette; `aspect` (w/h) keeps round parts round."""
    def rx(ry: float) -> float:  # horizontal radius (in u) of a circle of radius ry (in v)
        return ry / aspect

    if name == "person":
        body = _poly((0.12, 0.26), (0.88, 0.26), (0.97, 0.62), (0.80, 0.63), (0.74, 0.42),
                     (0.72, 1.0), (0.54, 1.0), (0.5, 0.68), (0.46, 1.0), (0.28, 1.0),
                     (0.26, 0.42), (0.20, 0.63), (0.03, 0.62))
        return [body, _ellipse(0.5, 0.125, min(0.45, rx(0.11)), 0.11, 16)]
    if name == "car":
        body = _poly((0.0, 0.5), (0.18, 0.44), (0.3, 0.12), (0.7, 0.12), (0.82, 0.44),
                     (1.0, 0.5), (1.0, 0.82), (0.0, 0.82))
        r = 0.18
        return [body, _ellipse(0.22, 0.82, rx(r), r, 14), _ellipse(0.78, 0.82, rx(r), r, 14)]
    if name == "stop sign":
        ru = min(0.5, rx(0.25))
        octagon = _ellipse(0.5, 0.26, ru, ru * aspect, 8, np.pi / 8, np.pi / 8 + 2 * np.pi)
        return [octagon, _poly((0.44, 0.45), (0.56, 0.45), (0.56, 1.0), (0.44, 1.0))]
    if name == "cat":
        head = _ellipse(0.2, 0.4, rx(0.2), 0.2, 20)
        t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        ears = (np.abs(t - 3.77) < 0.1) | (np.abs(t - 5.65) < 0.1)
        head[ears, 1] = 0.4 + (head[ears, 1] - 0.4) * 1.7
        head[ears, 0] = 0.2 + (head[ears, 0] - 0.2) * 1.2
        return [_ellipse(0.6, 0.68, 0.38, 0.3, 24), head]
    if name == "dog":
        return [_poly((0.02, 0.30), (0.10, 0.12), (0.22, 0.10), (0.28, 0.22), (0.30, 0.38),
                      (0.80, 0.38), (0.92, 0.22), (0.96, 0.26), (0.88, 0.42), (0.88, 1.0),
                      (0.78, 1.0), (0.76, 0.66), (0.40, 0.66), (0.38, 1.0), (0.28, 1.0),
                      (0.26, 0.56), (0.22, 0.44), (0.06, 0.42))]
    if name == "horse":
        return [_poly((0.0, 0.22), (0.08, 0.02), (0.16, 0.0), (0.20, 0.08), (0.30, 0.30),
                      (0.82, 0.30), (0.96, 0.36), (0.98, 0.60), (0.92, 0.50), (0.90, 1.0),
                      (0.82, 1.0), (0.80, 0.58), (0.34, 0.58), (0.32, 1.0), (0.24, 1.0),
                      (0.22, 0.52), (0.14, 0.30), (0.04, 0.30))]
    if name == "umbrella":
        canopy = _ellipse(0.5, 0.45, 0.5, 0.45, 21, np.pi, 2 * np.pi, endpoint=True)
        handle = _poly((0.47, 0.44), (0.53, 0.44), (0.53, 0.92), (0.60, 0.92), (0.60, 0.82),
                       (0.66, 0.82), (0.66, 1.0), (0.47, 1.0))
        return [canopy, handle]
    if name == "bottle":
        return [_poly((0.36, 0.0), (0.64, 0.0), (0.64, 0.22), (0.92, 0.38), (0.92, 1.0),
                      (0.08, 1.0), (0.08, 0.38), (0.36, 0.22))]
    if name == "cup":  # body + a C-shaped handle (the space it encloses is not the cup)
        outer = _ellipse(0.7, 0.5, rx(0.3), 0.3, 11, -np.pi / 2, np.pi / 2, endpoint=True)
        inner = _ellipse(0.7, 0.5, rx(0.17), 0.17, 11, np.pi / 2, -np.pi / 2, endpoint=True)
        body = _poly((0.0, 0.05), (0.74, 0.05), (0.68, 1.0), (0.06, 1.0))
        return [body, np.concatenate([outer, inner])]
    if name == "bowl":
        bowl = _ellipse(0.5, 0.12, 0.5, 0.76, 21, 0.0, np.pi, endpoint=True)
        return [bowl, _poly((0.34, 0.84), (0.66, 0.84), (0.70, 1.0), (0.30, 1.0))]
    if name == "chair":
        return [_poly((0.10, 0.0), (0.28, 0.0), (0.28, 0.55), (0.95, 0.55), (0.95, 0.66),
                      (0.88, 0.66), (0.88, 1.0), (0.78, 1.0), (0.78, 0.66), (0.24, 0.66),
                      (0.24, 1.0), (0.10, 1.0))]
    if name == "potted plant":
        pot = _poly((0.22, 0.58), (0.78, 0.58), (0.70, 1.0), (0.30, 1.0))
        return [_ellipse(0.5, 0.32, 0.5, 0.32, 22), pot]
    raise ValueError(f"no shape for category {name!r}")


def _to_pixels(polys: list[np.ndarray], box: tuple[float, float, float, float],
               flip: bool) -> list[list[float]]:
    """Flat COCO polygons [x1, y1, ...] (2 decimals, like COCO) of unit polygons in `box`."""
    x0, y0, w, h = box
    out = []
    for p in polys:
        u = 1.0 - p[:, 0] if flip else p[:, 0]
        xy = np.stack([x0 + np.clip(u, 0, 1) * w, y0 + np.clip(p[:, 1], 0, 1) * h], axis=1)
        out.append([float(v) for v in np.round(xy, 2).ravel()])
    return out


def _decode(rle: dict[str, Any]) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools 2.0.8 + numpy 2 warn on every decode
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def _poly_mask(polys: list[list[float]], h: int, w: int) -> np.ndarray:
    """The mask pycocotools' annToMask gives for these polygons."""
    return _decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))


def uncompressed_rle(m: np.ndarray) -> dict[str, Any]:
    """COCO crowd RLE: column-major run lengths, starting with a run of zeros."""
    flat = np.asarray(m, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(r) for r in runs]}


def compressed_rle(m: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(m, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# --------------------------------------------------------------------------------------------
# scenes


@dataclass(eq=False)  # identity: objects are looked up in lists of their scene
class _Obj:
    """One annotation of a scene, with what expressions need to know about it."""

    ann_id: int
    spec: _CatSpec
    color: str
    kind: str  # man / woman / child for persons
    crowd: bool
    segmentation: Any
    mask: np.ndarray | None
    bbox: list[float]
    area: float

    @property
    def cx(self) -> float:
        return self.bbox[0] + self.bbox[2] / 2

    @property
    def cy(self) -> float:
        return self.bbox[1] + self.bbox[3] / 2

    def ann_record(self, image_id: int) -> dict[str, Any]:
        return {"segmentation": self.segmentation, "area": self.area,
                "iscrowd": int(self.crowd), "image_id": image_id, "bbox": self.bbox,
                "category_id": self.spec.id, "id": self.ann_id}


@dataclass
class _Scene:
    image_id: int
    width: int
    height: int
    objs: list[_Obj]  # non-crowd, referable
    crowds: list[_Obj]

    def same(self, o: _Obj) -> list[_Obj]:
        """The instances of o's category, left to right."""
        return sorted((p for p in self.objs if p.spec is o.spec), key=lambda p: (p.cx, p.ann_id))

    def habs(self, o: _Obj) -> str:
        return "left" if o.cx < self.width / 3 else "right" if o.cx > 2 * self.width / 3 \
            else "middle"

    def vabs(self, o: _Obj) -> str:
        return "top" if o.cy < self.height / 3 else "bottom" if o.cy > 2 * self.height / 3 \
            else "middle"

    def nearest(self, o: _Obj) -> _Obj | None:
        others = [p for p in self.objs if p is not o]
        if not others:
            return None
        return min(others, key=lambda p: ((p.cx - o.cx) ** 2 + (p.cy - o.cy) ** 2, p.ann_id))


def _box_overlap(a: tuple[float, float, float, float],
                 b: tuple[float, float, float, float]) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min(a[2] * a[3], b[2] * b[3])


def _place(rng: np.random.Generator, bw: float, bh: float, width: int, height: int,
           taken: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    """A box position that overlaps the boxes already placed as little as possible."""
    best, best_score = None, np.inf
    for _ in range(30):
        x = float(rng.uniform(1, max(1.5, width - bw - 1)))
        y = float(rng.uniform(1, max(1.5, height - bh - 1)))
        box = (x, y, bw, bh)
        score = max((_box_overlap(box, t) for t in taken), default=0.0)
        if score < best_score:
            best, best_score = box, score
        if score == 0.0:
            break
    assert best is not None
    return best


def _box_size(rng: np.random.Generator, spec: _CatSpec, width: int,
              height: int) -> tuple[float, float]:
    bh = float(rng.uniform(*spec.height)) * height
    bw = float(rng.uniform(*spec.aspect)) * bh
    scale = min(1.0, 0.8 * width / bw, 0.9 * height / bh)
    bw, bh = bw * scale, bh * scale
    grow = max(1.0, 16 / bw, 28 / bh)
    return bw * grow, bh * grow


def _choose_categories(rng: np.random.Generator, n_obj: int,
                       unc_split: str | None) -> list[_CatSpec]:
    """Object categories of an image: often 2-3 instances of one category (as in RefCOCO)."""
    weights = np.array([s.weight for s in _SPECS])
    if unc_split == "testA":  # RefCOCO testA: images with several people, refs on people
        main = _PERSON
    elif unc_split == "testB":  # testB: refs on other objects
        main = _pick(rng, _NON_PERSON)
    else:
        main = _SPECS[int(rng.choice(len(_SPECS), p=weights / weights.sum()))]
    repeated = unc_split in ("testA", "testB") or rng.random() < 0.65
    n_main = min(n_obj, int(rng.integers(2, 4))) if repeated else 1
    cats = [main] * n_main
    while len(cats) < n_obj:
        cats.append(_SPECS[int(rng.choice(len(_SPECS), p=weights / weights.sum()))])
    return cats


def _choose_colors(rng: np.random.Generator, cats: list[_CatSpec]) -> list[str]:
    """Colors; same-category instances mostly differ, sometimes not (then position decides)."""
    colors: list[str] = []
    for i, c in enumerate(cats):
        used = {colors[j] for j in range(i) if cats[j] is c}
        options = [n for n in _COLOR_NAMES if n not in used] if rng.random() < 0.75 \
            else list(_COLOR_NAMES)
        colors.append(_pick(rng, options or list(_COLOR_NAMES)))
    return colors


def _make_scene(rng: np.random.Generator, image_id: int, unc_split: str | None,
                force_special: bool, next_ann_id: int) -> tuple[_Scene, int]:
    """Draw an image's layout and annotations (no pixels yet)."""
    if rng.random() < 0.35:  # portrait
        width = int(rng.integers(256, 361))
        height = int(rng.integers(min(448, int(width * 1.15)), 449))
    else:
        width = int(rng.integers(384, 513))
        height = int(rng.integers(192, min(448, int(width * 0.85)) + 1))
    n_obj = int(rng.integers(3 if force_special else 2, 7))
    cats = _choose_categories(rng, n_obj, unc_split)
    colors = _choose_colors(rng, cats)
    with_crowd = force_special or rng.random() < 0.12

    taken: list[tuple[float, float, float, float]] = []
    crowds: list[_Obj] = []
    ann_id = next_ann_id
    if with_crowd:
        ann_id += int(rng.integers(1, 40))
        crowds.append(_make_crowd(rng, ann_id, width, height, taken))
    objs: list[_Obj] = []
    for i, (spec, color) in enumerate(zip(cats, colors, strict=True)):
        ann_id += int(rng.integers(1, 40))
        bw, bh = _box_size(rng, spec, width, height)
        box = _place(rng, bw, bh, width, height, taken)
        taken.append(box)
        flip = bool(rng.random() < 0.5)
        polys = _to_pixels(_shape_polygons(spec.name, bw / bh), box, flip)
        mask = _poly_mask(polys, height, width)
        # A few objects are stored as compressed RLE; never the first two, so every image keeps
        # referable (polygon) objects, including two of its repeated category.
        as_rle = i >= 2 and ((force_special and i == n_obj - 1) or rng.random() < 0.06)
        segmentation: Any = compressed_rle(mask) if as_rle else polys
        kind = _pick(rng, tuple(_PERSON_NOUNS)) if spec is _PERSON else ""
        objs.append(_finish_obj(ann_id, spec, color, kind, False, segmentation, mask))
    return _Scene(image_id, width, height, objs, crowds), ann_id


def _make_crowd(rng: np.random.Generator, ann_id: int, width: int, height: int,
                taken: list[tuple[float, float, float, float]]) -> _Obj:
    """A COCO-style crowd: a group of small people or bottles under one uncompressed RLE."""
    spec = _PERSON if rng.random() < 0.7 else _SPEC_BY_NAME["bottle"]
    gw, gh = width * float(rng.uniform(0.3, 0.45)), height * float(rng.uniform(0.14, 0.22))
    box = _place(rng, gw, gh, width, height, taken)
    taken.append(box)
    n = int(rng.integers(4, 8))
    member_w = gw / n * 1.3
    polys: list[list[float]] = []
    for j in range(n):
        mh = gh * float(rng.uniform(0.75, 1.0))
        mx = box[0] + j * (gw - member_w) / max(1, n - 1)
        member = (mx, box[1] + gh - mh, min(member_w, mh * spec.aspect[1]), mh)
        polys += _to_pixels(_shape_polygons(spec.name, member[2] / member[3]), member, False)
    mask = _poly_mask(polys, height, width)
    return _finish_obj(ann_id, spec, _pick(rng, _COLOR_NAMES), "", True, uncompressed_rle(mask),
                       mask)


def _finish_obj(ann_id: int, spec: _CatSpec, color: str, kind: str, crowd: bool,
                segmentation: Any, mask: np.ndarray) -> _Obj:
    """Box and area exactly as pycocotools computes them from the stored segmentation."""
    h, w = mask.shape
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    return _Obj(ann_id, spec, color, kind, crowd, segmentation, mask, bbox,
                float(mask_utils.area(rle)))


# --------------------------------------------------------------------------------------------
# pixels


def _render(rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    """Background (two-tone gradient + noise), then the shapes, nearer (lower) ones last."""
    h, w = scene.height, scene.width
    horizon = int(h * rng.uniform(0.35, 0.7))
    wall = (rng.uniform(150, 215) + rng.uniform(-30, 30, 3)).astype(np.float32)
    floor = (rng.uniform(95, 160) + rng.uniform(-30, 30, 3)).astype(np.float32)
    ys = np.arange(h, dtype=np.float32)[:, None, None]
    xs = np.arange(w, dtype=np.float32)[None, :, None]
    grad = 0.9 + 0.15 * ys / h + np.float32(rng.uniform(-0.06, 0.06)) * xs / w
    img = np.where(ys < horizon, wall, floor) * grad
    img += rng.integers(-12, 13, (h, w, 3), dtype=np.int16)  # uniform noise is fast to draw
    for o in sorted(scene.crowds + scene.objs, key=lambda o: (not o.crowd, o.bbox[1] + o.bbox[3],
                                                               o.ann_id)):
        assert o.mask is not None
        x0, y0 = int(o.bbox[0]), int(o.bbox[1])
        x1, y1 = int(np.ceil(o.bbox[0] + o.bbox[2])), int(np.ceil(o.bbox[1] + o.bbox[3]))
        yy, xx = np.nonzero(o.mask[y0:y1, x0:x1])  # the box holds the whole mask
        if yy.size == 0:
            continue
        shade = (1.03 - 0.08 * (yy / max(y1 - y0, 1))).astype(np.float32)[:, None]
        color = np.array(COLORS[o.color], dtype=np.float32)[None, :]
        noise = rng.integers(-5, 6, (yy.size, 3), dtype=np.int16)
        img[yy + y0, xx + x0] = color * shade + noise
    return img.clip(0, 255).astype(np.uint8)


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    # No EXIF, no timestamps, fixed quality and subsampling: the same pixels give the same bytes.
    Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=JPEG_QUALITY, subsampling=2,
                                        optimize=False, progressive=False)


# --------------------------------------------------------------------------------------------
# expressions


def _noun(rng: np.random.Generator, o: _Obj) -> str:
    return _pick(rng, _PERSON_NOUNS[o.kind]) if o.spec is _PERSON else _pick(rng, o.spec.nouns)


def _color_phrase(rng: np.random.Generator, o: _Obj, noun: str) -> str:
    c = o.color
    if o.spec is _PERSON:
        return _pick(rng, (f"{noun} in {c}", f"{c} shirt", f"{noun} wearing {c}", f"{c} {noun}"))
    return _pick(rng, (f"{c} {noun}", f"the {c} {noun}", f"{c} {noun}"))


def _describe(rng: np.random.Generator, o: _Obj) -> str:
    """'red car' / 'man in blue': how a neighbour is named."""
    n = _noun(rng, o)
    return f"{n} in {o.color}" if o.spec is _PERSON else f"{o.color} {n}"


def _rank_word(scene: _Scene, o: _Obj) -> str | None:
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


def _vertical_extreme(scene: _Scene, o: _Obj) -> str | None:
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


def _size_word(scene: _Scene, o: _Obj) -> str | None:
    others = [p for p in scene.same(o) if p is not o]
    if not others:
        return None
    if all(o.area > 1.3 * p.area for p in others):
        return "big" if len(others) == 1 else "biggest"
    if all(o.area * 1.3 < p.area for p in others):
        return "small" if len(others) == 1 else "smallest"
    return None


def _relation(scene: _Scene, o: _Obj, m: _Obj) -> str:
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


def _refcoco_texts(rng: np.random.Generator, scene: _Scene, o: _Obj, n_sent: int) -> list[str]:
    """Short game-style expressions (RefCOCO): color, position, ordinals, neighbours."""
    same = scene.same(o)
    k, i = len(same), same.index(o)
    color_unique = sum(p.color == o.color for p in same) == 1
    rank = _rank_word(scene, o)
    first = _color_phrase(rng, o, _noun(rng, o))
    if rank is not None and (not color_unique or rng.random() < 0.3):
        if rank in ("left", "right", "middle") and o.spec is not _PERSON and rng.random() < 0.5:
            first = f"{rank} {o.color} {_noun(rng, o)}"
        else:
            first = _pick(rng, (f"{first} on {rank}", f"{first} {rank}", f"{first}, {rank}"))
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


def _refcoco_plus_texts(rng: np.random.Generator, scene: _Scene, o: _Obj,
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
    if o.spec is _PERSON:
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


def _refcocog_texts(rng: np.random.Generator, scene: _Scene, o: _Obj, n_sent: int) -> list[str]:
    """Longer full-sentence descriptions (RefCOCOg)."""
    n = _noun(rng, o)
    c = o.color
    subj = _pick(rng, (f"a {n} in {c}", f"a {n} wearing a {c} shirt")) if o.spec is _PERSON \
        else f"{_article(c)} {c} {n}"
    h = scene.habs(o)
    pos = _pick(rng, (f"on the {h} side of the picture", f"on the {h}")) if h != "middle" \
        else _pick(rng, ("in the middle of the picture", "in the center of the image"))
    m = scene.nearest(o)
    if m is None:
        rel = _pick(rng, ("with nothing else around it", "all by itself"))
    else:
        d = _describe(rng, m)
        kind = _relation(scene, o, m)
        if kind == "above" and o.spec.name == "umbrella" and m.spec is _PERSON:
            rel = f"held above {_article(d)} {d}"
        elif kind in ("above", "under"):
            rel = f"{'below' if kind == 'under' else 'above'} {_article(d)} {d}"
        else:
            side = "left" if o.cx < m.cx else "right"
            rel = _pick(rng, (f"next to {_article(d)} {d}", f"to the {side} of {_article(d)} {d}"))
    act = _pick(rng, o.spec.actions)
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


def _plural_of(group: list[_Obj]) -> str:
    spec = group[0].spec
    if spec is _PERSON:
        kinds = {o.kind for o in group}
        return _PERSON_PLURAL[kinds.pop()] if len(kinds) == 1 else "people"
    return spec.plural


def _multi_texts(rng: np.random.Generator, scene: _Scene, group: list[_Obj], whole: bool,
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


def _absent_texts(rng: np.random.Generator, scene: _Scene, n_sent: int) -> list[str]:
    """gRefCOCO no-target expressions: a category/color combination the image lacks."""
    present = {(o.spec.name, o.color) for o in scene.objs + scene.crowds}
    while True:
        spec, color = _pick(rng, _SPECS), _pick(rng, _COLOR_NAMES)
        if (spec.name, color) not in present:
            break
    n = _pick(rng, _PERSON_NOUNS[_pick(rng, tuple(_PERSON_NOUNS))]) if spec is _PERSON \
        else _pick(rng, spec.nouns)
    side = _pick(rng, ("left", "right"))
    base = f"{n} in {color}" if spec is _PERSON else f"{color} {n}"
    pool = [f"the {base}", f"{base} on the {side}", f"{base} {side}", base]
    return _pick_distinct(rng, pool.pop(0 if rng.random() < 0.5 else 3), pool, n_sent)


def _style(rng: np.random.Generator, text: str, long: bool) -> str:
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


# --------------------------------------------------------------------------------------------
# refs


@dataclass
class _Ref:
    """A ref kept compactly until its file is written (sent and tokens derive from raw)."""

    ref_id: int
    image_id: int
    ann_ids: list[int]  # [] for a no-target ref
    cat_ids: list[int]
    split: str
    raws: list[str]
    sent_ids: list[int]
    split2: str = ""  # the google split of a RefCOCOg ref
    scalar: bool = False  # gRefCOCO: ann_id / category_id stored as plain ints


class _Ids:
    """Sequential ref and sentence ids of one refs file."""

    def __init__(self) -> None:
        self.ref = 0
        self.sent = 0

    def make(self, image_id: int, targets: list[_Obj], split: str, raws: list[str],
             split2: str = "") -> _Ref:
        sent_ids = list(range(self.sent, self.sent + len(raws)))
        self.sent += len(raws)
        ref = _Ref(self.ref, image_id, [o.ann_id for o in targets], [o.spec.id for o in targets],
                   split, raws, sent_ids, split2)
        self.ref += 1
        return ref


def _sentences(r: _Ref) -> list[dict[str, Any]]:
    out = []
    for raw, sid in zip(r.raws, r.sent_ids, strict=True):
        tokens = clean_sentence(raw)
        out.append({"tokens": tokens, "raw": raw, "sent_id": sid, "sent": " ".join(tokens)})
    return out


def _refer_record(r: _Ref, split: str) -> dict[str, Any]:
    """A ref as REFER's refs(*).p stores it."""
    return {"sent_ids": list(r.sent_ids),
            "file_name": f"{image_file_name(r.image_id)[:-4]}_{r.ann_ids[0]}.jpg",
            "ann_id": r.ann_ids[0], "ref_id": r.ref_id, "image_id": r.image_id,
            "split": split, "sentences": _sentences(r), "category_id": r.cat_ids[0]}


def _grefer_record(r: _Ref) -> dict[str, Any]:
    """A ref as gRefCOCO's grefs(unc).json stores it (lists of targets, no_target flag)."""
    if not r.ann_ids:
        ann: Any = [-1]
        cat: Any = [-1]
    elif r.scalar:
        ann, cat = r.ann_ids[0], r.cat_ids[0]
    else:
        ann, cat = list(r.ann_ids), list(r.cat_ids)
    return {"sent_ids": list(r.sent_ids), "file_name": image_file_name(r.image_id),
            "ann_id": ann, "ref_id": r.ref_id, "image_id": r.image_id, "split": r.split,
            "sentences": _sentences(r), "category_id": cat, "no_target": not r.ann_ids}


def _eligible(scene: _Scene, unc_split: str | None) -> list[_Obj]:
    """Referable objects: polygon ones (REFER's and gRefCOCO's getMask read only polygons of
    referred objects, as in the releases); UNC testA refers to people only, testB to the rest."""
    objs = [o for o in scene.objs if isinstance(o.segmentation, list)]
    if unc_split == "testA":
        return [o for o in objs if o.spec is _PERSON]
    if unc_split == "testB":
        return [o for o in objs if o.spec is not _PERSON]
    return objs


def _choose_targets(rng: np.random.Generator, scene: _Scene, pool: list[_Obj],
                    n: int) -> list[_Obj]:
    """n objects, preferring those that share a category (those need disambiguation)."""
    n = max(1, min(n, len(pool)))
    w = np.array([3.0 if len(scene.same(o)) > 1 else 1.0 for o in pool])
    idx = sorted(int(i) for i in rng.choice(len(pool), size=n, replace=False, p=w / w.sum()))
    return [pool[i] for i in idx]


def _multi_group(rng: np.random.Generator, scene: _Scene,
                 pool: list[_Obj]) -> tuple[list[_Obj], bool] | None:
    """2-3 targets: all instances of a category, the left/right two of three, or mixed."""
    options: list[tuple[list[_Obj], bool]] = []
    by_cat: dict[int, list[_Obj]] = {}
    for o in pool:
        by_cat.setdefault(o.spec.id, []).append(o)
    for cat_id in sorted(by_cat):
        same = scene.same(by_cat[cat_id][0])
        if len(same) in (2, 3) and all(o in pool for o in same):
            options.append((same, True))
        if len(same) == 3 and all(o in pool for o in same):
            options.append((same[:2] if rng.random() < 0.5 else same[1:], False))
    cats = sorted(by_cat)
    if len(cats) >= 2:
        k = 3 if len(cats) >= 3 and rng.random() < 0.3 else 2
        chosen = sorted(int(c) for c in rng.choice(len(cats), size=k, replace=False))
        options.append(([by_cat[cats[c]][0] for c in chosen], False))
    if not options:
        return None
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------------------------
# plan and output


@dataclass
class _Plan:
    """Which image goes to which dataset and split, decided up front (split by image)."""

    image_ids: list[int]
    unc: list[str | None]  # refcoco / refcoco+ / grefcoco split, None: not in those
    umd: list[str | None]  # refcocog splits, None: not in refcocog
    google: list[str | None]


def _assign(rng: np.random.Generator, members: list[int], fractions: dict[str, float],
            out: list[str | None]) -> None:
    order = [members[int(i)] for i in rng.permutation(len(members))]
    start = 0
    for split, frac in fractions.items():
        k = max(2, round(frac * len(members)))
        for i in order[start:start + k]:
            out[i] = split
        start += k
    for i in order[start:]:
        out[i] = "train"


def _make_plan(n: int, seed: int) -> _Plan:
    rng = np.random.default_rng([seed, 0])
    image_ids = sorted(int(i) for i in rng.choice(np.arange(100_000, _ABSENT_IMAGE_ID - 9), n,
                                                  replace=False))
    image_ids = [image_ids[int(i)] for i in rng.permutation(n)]
    # Images 0 and 1 carry crowd and RLE objects and belong to every dataset.
    rest = [int(i) + 2 for i in rng.permutation(n - 2)]
    n_unc_only, n_g_only = max(1, round(0.1 * n)), max(1, round(0.12 * n))
    unc_only, g_only = set(rest[:n_unc_only]), set(rest[n_unc_only:n_unc_only + n_g_only])
    in_unc = [i for i in range(n) if i not in g_only]
    in_g = [i for i in range(n) if i not in unc_only]
    unc: list[str | None] = [None] * n
    umd: list[str | None] = [None] * n
    google: list[str | None] = [None] * n
    _assign(rng, in_unc, {"val": 0.075, "testA": 0.0375, "testB": 0.0375}, unc)
    _assign(rng, in_g, {"val": 0.052, "test": 0.1}, umd)
    _assign(rng, in_g, {"val": 0.16}, google)
    return _Plan(image_ids, unc, umd, google)


class _PartWriter:
    """Streams JSON records of an instances.json section to a part file, comma-separated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f: TextIO = open(path, "w", encoding="ascii")  # noqa: SIM115
        self.first = True

    def add(self, record: dict[str, Any]) -> None:
        if not self.first:
            self.f.write(",")
        self.f.write(_dumps(record))
        self.first = False

    def close(self) -> None:
        self.f.close()


def _write_instances(path: Path, info: dict[str, Any], images_part: Path,
                     anns_part: Path) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write('{"info":' + _dumps(info) + ',"licenses":[],"images":[')
        with open(images_part, encoding="ascii") as src:
            shutil.copyfileobj(src, f)
        f.write('],"annotations":[')
        with open(anns_part, encoding="ascii") as src:
            shutil.copyfileobj(src, f)
        f.write('],"categories":' + _dumps(COCO_CATEGORIES) + "}")


def _info(name: str, seed: int, n_images: int) -> dict[str, Any]:
    return {"description": f"nemo-pipe synthetic {name} (REFER format, drawn shapes)",
            "version": "1.0", "year": 2014, "contributor": "nemo-pipe stages.synthetic_refer",
            "seed": seed, "n_images": n_images}


def _write_pickle(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_bytes(pickle.dumps(records, protocol=PICKLE_PROTOCOL))


def _counts(refs: list[_Ref]) -> dict[str, int]:
    return {"refs": len(refs), "sentences": sum(len(r.raws) for r in refs),
            "images": len({r.image_id for r in refs})}


@dataclass
class _Collected:
    """Everything kept in memory while images stream to disk: refs and the broken subset."""

    refcoco: list[_Ref] = field(default_factory=list)
    refcoco_plus: list[_Ref] = field(default_factory=list)
    refcocog: list[_Ref] = field(default_factory=list)
    grefcoco: list[_Ref] = field(default_factory=list)
    subset_images: list[dict[str, Any]] = field(default_factory=list)
    subset_anns: list[dict[str, Any]] = field(default_factory=list)


def _image_refs(rng: np.random.Generator, scene: _Scene, plan: _Plan, idx: int, u_pos: int,
                ids: dict[str, _Ids], got: _Collected) -> None:
    """Every dataset's refs on one image."""
    image_id = scene.image_id
    unc = plan.unc[idx]
    if unc is not None:
        pool = _eligible(scene, unc)
        n_refs = _draw_count(rng, {1: 0.12, 2: 0.33, 3: 0.38, 4: 0.17})
        targets = _choose_targets(rng, scene, pool, n_refs)
        for o in targets:
            n_sent = _draw_count(rng, {1: 0.05, 2: 0.1, 3: 0.85})
            raws = [_style(rng, t, False) for t in _refcoco_texts(rng, scene, o, n_sent)]
            got.refcoco.append(ids["refcoco"].make(image_id, [o], unc, raws))
            # gRefCOCO keeps RefCOCO's single-target expressions (new ids).
            g = ids["grefcoco"].make(image_id, [o], unc, list(raws))
            g.scalar = g.ref_id % 6 == 2  # as in the release, some ann_ids are plain ints
            got.grefcoco.append(g)
        for o in targets:
            n_sent = _draw_count(rng, {1: 0.05, 2: 0.1, 3: 0.85})
            raws = [_style(rng, t, False) for t in _refcoco_plus_texts(rng, scene, o, n_sent)]
            got.refcoco_plus.append(ids["refcoco+"].make(image_id, [o], unc, raws))
        if u_pos < 3 or rng.random() < 0.8:
            group = _multi_group(rng, scene, pool)
            if group is not None:
                n_sent = _draw_count(rng, {1: 0.3, 2: 0.45, 3: 0.25})
                texts = _multi_texts(rng, scene, group[0], group[1], n_sent)
                raws = [_style(rng, t, False) for t in texts]
                got.grefcoco.append(ids["grefcoco"].make(image_id, group[0], unc, raws))
        if u_pos < 2 or rng.random() < 0.45:
            n_sent = _draw_count(rng, {1: 0.4, 2: 0.45, 3: 0.15})
            raws = [_style(rng, t, False) for t in _absent_texts(rng, scene, n_sent)]
            got.grefcoco.append(ids["grefcoco"].make(image_id, [], unc, raws))
    umd, google = plan.umd[idx], plan.google[idx]
    if umd is not None and google is not None:
        n_refs = _draw_count(rng, {1: 0.35, 2: 0.45, 3: 0.2})
        for o in _choose_targets(rng, scene, _eligible(scene, None), n_refs):
            n_sent = _draw_count(rng, {1: 0.2, 2: 0.7, 3: 0.1})
            raws = [_style(rng, t, True) for t in _refcocog_texts(rng, scene, o, n_sent)]
            got.refcocog.append(ids["refcocog"].make(image_id, [o], umd, raws, google))


def _generate(tmp: Path, n_images: int, seed: int, with_broken: bool) -> dict[str, Any]:
    """Write images and datasets into `tmp`; return the summary counts."""
    plan = _make_plan(n_images, seed)
    images_dir = tmp / "images" / "train2014"
    images_dir.mkdir(parents=True)
    parts = tmp / "_parts"
    parts.mkdir()
    writers = {k: _PartWriter(parts / f"{k}.part") for k in ("unc_img", "unc_ann", "g_img",
                                                             "g_ann")}
    ids = {k: _Ids() for k in ("refcoco", "refcoco+", "refcocog", "grefcoco")}
    got = _Collected()
    next_ann = 1_000_000 + int(np.random.default_rng([seed, 1]).integers(0, 200_000))
    u_pos = 0
    try:
        for idx, image_id in enumerate(plan.image_ids):
            rng = np.random.default_rng([seed, 2, idx])
            scene, next_ann = _make_scene(rng, image_id, plan.unc[idx], idx < 2, next_ann)
            _save_jpeg(_render(rng, scene), images_dir / image_file_name(image_id))
            img_rec = {"file_name": image_file_name(image_id), "height": scene.height,
                       "width": scene.width, "id": image_id}
            anns = [o.ann_record(image_id) for o in sorted(scene.crowds + scene.objs,
                                                          key=lambda o: o.ann_id)]
            for o in scene.objs + scene.crowds:
                o.mask = None  # pixels are on disk; keep memory flat for large runs
            _image_refs(rng, scene, plan, idx, u_pos, ids, got)
            if plan.unc[idx] is not None:
                writers["unc_img"].add(img_rec)
                for a in anns:
                    writers["unc_ann"].add(a)
                if len(got.subset_images) < BROKEN_IMAGES_USED:
                    got.subset_images.append(img_rec)
                    got.subset_anns += anns
                u_pos += 1
            if plan.umd[idx] is not None:
                writers["g_img"].add(img_rec)
                for a in anns:
                    writers["g_ann"].add(a)
    finally:
        for w in writers.values():
            w.close()

    refer = tmp / "refer"
    for name in ("refcoco", "refcoco+", "refcocog", "grefcoco"):
        (refer / name).mkdir(parents=True)
        kind = "g" if name == "refcocog" else "unc"
        _write_instances(refer / name / "instances.json", _info(name, seed, n_images),
                         parts / f"{kind}_img.part", parts / f"{kind}_ann.part")
    shutil.rmtree(parts)
    _write_pickle(refer / "refcoco" / "refs(unc).p",
                  [_refer_record(r, r.split) for r in got.refcoco])
    _write_pickle(refer / "refcoco+" / "refs(unc).p",
                  [_refer_record(r, r.split) for r in got.refcoco_plus])
    _write_pickle(refer / "refcocog" / "refs(umd).p",
                  [_refer_record(r, r.split) for r in got.refcocog])
    _write_pickle(refer / "refcocog" / "refs(google).p",
                  [_refer_record(r, r.split2) for r in got.refcocog])
    (refer / "grefcoco" / "grefs(unc).json").write_text(
        _dumps([_grefer_record(r) for r in got.grefcoco]), encoding="ascii")
    if with_broken:
        _write_broken(tmp, got, seed, n_images)
    return {"refcoco": _counts(got.refcoco), "refcoco+": _counts(got.refcoco_plus),
            "refcocog-umd": _counts(got.refcocog), "refcocog-google": _counts(got.refcocog),
            "grefcoco": _counts(got.grefcoco)}


# --------------------------------------------------------------------------------------------
# broken inputs


def _write_broken(tmp: Path, got: _Collected, seed: int, n_images: int) -> None:
    """One REFER root per failure the readers must report clearly (see BROKEN_CASES)."""
    broken = tmp / "broken"
    subset_ids = {int(i["id"]) for i in got.subset_images}
    refs = [_refer_record(r, r.split) for r in got.refcoco if r.image_id in subset_ids]
    instances = {"info": _info("refcoco (broken-input subset)", seed, n_images), "licenses": [],
                 "images": got.subset_images, "annotations": got.subset_anns,
                 "categories": COCO_CATEGORIES}
    good_refs = pickle.dumps(refs, protocol=PICKLE_PROTOCOL)
    good_inst = _dumps(instances).encode("ascii")

    def root(case: str, refs_bytes: bytes | None, inst_bytes: bytes | None) -> Path:
        d = broken / case / "refcoco"
        d.mkdir(parents=True)
        if refs_bytes is not None:
            (d / "refs(unc).p").write_bytes(refs_bytes)
        if inst_bytes is not None:
            (d / "instances.json").write_bytes(inst_bytes)
        return d

    def with_change(change: dict[str, Any]) -> bytes:
        changed = [dict(r) for r in refs]
        changed[len(changed) // 2].update(change)
        return pickle.dumps(changed, protocol=PICKLE_PROTOCOL)

    middle = refs[len(refs) // 2]
    root("missing_refs", None, good_inst)
    root("missing_instances", good_refs, None)
    root("bad_pickle", good_refs[: len(good_refs) // 2], good_inst)
    root("bad_json", good_refs, good_inst[: len(good_inst) // 2])
    root("dangling_ann", with_change({
        "ann_id": _ABSENT_ANN_ID,
        "file_name": f"{image_file_name(middle['image_id'])[:-4]}_{_ABSENT_ANN_ID}.jpg"}),
        good_inst)
    root("dangling_image", with_change({
        "image_id": _ABSENT_IMAGE_ID,
        "file_name": f"{image_file_name(_ABSENT_IMAGE_ID)[:-4]}_{middle['ann_id']}.jpg"}),
        good_inst)
    root("unknown_split", with_change({"split": "training"}), good_inst)

    case = broken / "images_missing_and_corrupt"
    root("images_missing_and_corrupt", good_refs, good_inst)
    own = case / "images" / "train2014"
    own.mkdir(parents=True)
    for n, img in enumerate(got.subset_images):
        src = tmp / "images" / "train2014" / img["file_name"]
        if n == 1:
            continue  # missing
        if n == 2:  # cut inside the entropy-coded data: the header parses, decoding fails
            data = src.read_bytes()
            (own / img["file_name"]).write_bytes(data[: len(data) // 3])
            continue
        shutil.copyfile(src, own / img["file_name"])

    geometry = _bad_geometry(refs, instances)
    root("bad_geometry", good_refs, _dumps(instances | {"annotations": geometry[0]}).encode())

    lines = ["Deliberately broken REFER inputs (dataset name: refcoco, layout "
             "<case>/refcoco/refs(unc).p + instances.json).",
             "Images: ../images/train2014, except images_missing_and_corrupt, which has its own "
             "images/train2014.", ""]
    lines += [f"{name}: {what}" for name, what in BROKEN_CASES.items()]
    missing, corrupt = got.subset_images[1]["file_name"], got.subset_images[2]["file_name"]
    lines += ["", f"images_missing_and_corrupt: missing {missing}, truncated {corrupt}",
              f"bad_geometry: annotations {', '.join(map(str, geometry[1]))}", ""]
    (broken / "README.txt").write_text("\n".join(lines), encoding="ascii")


def _bad_geometry(refs: list[dict[str, Any]],
                  instances: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
    """The subset's annotations with bad geometry on the targets of the first four distinct
    referenced annotations and on the first unreferenced one; (annotations, changed ids)."""
    targets: list[int] = []
    for r in refs:
        if r["ann_id"] not in targets:
            targets.append(r["ann_id"])
    targets = targets[:4]
    context = [a["id"] for a in instances["annotations"]
               if a["id"] not in {r["ann_id"] for r in refs}][:1]
    changes: dict[int, Any] = dict(zip(targets, (
        lambda a: {"segmentation": [a["segmentation"][0][:-1], *a["segmentation"][1:]]},
        lambda a: {"segmentation": [*a["segmentation"], []]},
        lambda a: {"bbox": a["bbox"][:3]},
        lambda a: {"bbox": [a["bbox"][0], a["bbox"][1], -a["bbox"][2], a["bbox"][3]]},
    ), strict=True))
    for a in context:
        changes[a] = lambda a: {"segmentation": [[1.0, 1.0, 5.0, 1.0]]}
    anns = [a | changes[a["id"]](a) if a["id"] in changes else a
            for a in instances["annotations"]]
    return anns, [*targets, *context]


# --------------------------------------------------------------------------------------------
# entry point


def write_demo_data(out_dir: str | Path, n_images: int = 40, seed: int = 0,
                    with_broken: bool = True) -> DemoSummary:
    """Write the synthetic REFER data root, images and broken inputs to `out_dir`.

    Everything is written to a temporary folder next to `out_dir` and renamed into place at
    the end, so an interrupted run never leaves a half-written dataset behind. `out_dir` must
    not exist or be empty.
    """
    if n_images < MIN_IMAGES:
        raise ValueError(f"n_images must be at least {MIN_IMAGES} (every split needs two "
                         f"images), got {n_images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; delete it or "
                              "choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        counts = _generate(tmp, n_images, seed, with_broken)
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace it portably
        try:
            os.rename(tmp, out)
        except OSError as exc:
            raise FileExistsError(f"{out} appeared while the demo data was written; delete it "
                                  "or choose another output folder") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DemoSummary(out_dir=out, images_dir=out / "images" / "train2014",
                       refer_root=out / "refer", n_images=n_images, seed=seed, datasets=counts,
                       broken_dir=out / "broken" if with_broken else None)
