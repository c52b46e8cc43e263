"""Scenes of the synthetic REFER data: categories, shapes, masks, layouts and pixels.

Every object is a filled shape whose pixels are exactly its annotation's mask (before JPEG
compression and occlusion by objects drawn later); box and area are computed by pycocotools
from the stored segmentation, as the real releases' are.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from stages.refer.views import refer_tokens

T = TypeVar("T")

JPEG_QUALITY = 90

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
COLOR_NAMES = tuple(COLORS)


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


SPECS: tuple[_CatSpec, ...] = (
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
_SPEC_BY_NAME = {s.name: s for s in SPECS}
PERSON = _SPEC_BY_NAME["person"]
_NON_PERSON = tuple(s for s in SPECS if s is not PERSON)

COCO_CATEGORIES: list[dict[str, Any]] = [
    {"supercategory": s.supercategory, "id": s.id, "name": s.name}
    for s in sorted(SPECS, key=lambda s: s.id)
]

PERSON_NOUNS = {"man": ("man", "guy", "person"), "woman": ("woman", "lady", "person"),
                "child": ("kid", "child", "little kid")}

# --------------------------------------------------------------------------------------------
# small helpers


def pick(rng: np.random.Generator, seq: Sequence[T]) -> T:
    """A uniformly chosen element, as the element itself (never a numpy scalar)."""
    return seq[int(rng.integers(len(seq)))]


def image_file_name(image_id: int) -> str:
    """COCO train2014 file name of an image id."""
    return f"COCO_train2014_{image_id:012d}.jpg"


def clean_sentence(raw: str) -> list[str]:
    """The tokens REFER stores for a raw expression (`stages.refer.views.refer_tokens`)."""
    return refer_tokens(raw)


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
class Obj:
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
class Scene:
    image_id: int
    width: int
    height: int
    objs: list[Obj]  # non-crowd, referable
    crowds: list[Obj]

    def same(self, o: Obj) -> list[Obj]:
        """The instances of o's category, left to right."""
        return sorted((p for p in self.objs if p.spec is o.spec), key=lambda p: (p.cx, p.ann_id))

    def habs(self, o: Obj) -> str:
        return "left" if o.cx < self.width / 3 else "right" if o.cx > 2 * self.width / 3 \
            else "middle"

    def vabs(self, o: Obj) -> str:
        return "top" if o.cy < self.height / 3 else "bottom" if o.cy > 2 * self.height / 3 \
            else "middle"

    def nearest(self, o: Obj) -> Obj | None:
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
    weights = np.array([s.weight for s in SPECS])
    if unc_split == "testA":  # RefCOCO testA: images with several people, refs on people
        main = PERSON
    elif unc_split == "testB":  # testB: refs on other objects
        main = pick(rng, _NON_PERSON)
    else:
        main = SPECS[int(rng.choice(len(SPECS), p=weights / weights.sum()))]
    repeated = unc_split in ("testA", "testB") or rng.random() < 0.65
    n_main = min(n_obj, int(rng.integers(2, 4))) if repeated else 1
    cats = [main] * n_main
    while len(cats) < n_obj:
        cats.append(SPECS[int(rng.choice(len(SPECS), p=weights / weights.sum()))])
    return cats


def _choose_colors(rng: np.random.Generator, cats: list[_CatSpec]) -> list[str]:
    """Colors; same-category instances mostly differ, sometimes not (then position decides)."""
    colors: list[str] = []
    for i, c in enumerate(cats):
        used = {colors[j] for j in range(i) if cats[j] is c}
        options = [n for n in COLOR_NAMES if n not in used] if rng.random() < 0.75 \
            else list(COLOR_NAMES)
        colors.append(pick(rng, options or list(COLOR_NAMES)))
    return colors


def make_scene(rng: np.random.Generator, image_id: int, unc_split: str | None,
                force_special: bool, next_ann_id: int) -> tuple[Scene, int]:
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
    crowds: list[Obj] = []
    ann_id = next_ann_id
    if with_crowd:
        ann_id += int(rng.integers(1, 40))
        crowds.append(_make_crowd(rng, ann_id, width, height, taken))
    objs: list[Obj] = []
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
        kind = pick(rng, tuple(PERSON_NOUNS)) if spec is PERSON else ""
        objs.append(_finish_obj(ann_id, spec, color, kind, False, segmentation, mask))
    return Scene(image_id, width, height, objs, crowds), ann_id


def _make_crowd(rng: np.random.Generator, ann_id: int, width: int, height: int,
                taken: list[tuple[float, float, float, float]]) -> Obj:
    """A COCO-style crowd: a group of small people or bottles under one uncompressed RLE."""
    spec = PERSON if rng.random() < 0.7 else _SPEC_BY_NAME["bottle"]
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
    return _finish_obj(ann_id, spec, pick(rng, COLOR_NAMES), "", True, uncompressed_rle(mask),
                       mask)


def _finish_obj(ann_id: int, spec: _CatSpec, color: str, kind: str, crowd: bool,
                segmentation: Any, mask: np.ndarray) -> Obj:
    """Box and area exactly as pycocotools computes them from the stored segmentation."""
    h, w = mask.shape
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    return Obj(ann_id, spec, color, kind, crowd, segmentation, mask, bbox,
                float(mask_utils.area(rle)))


# --------------------------------------------------------------------------------------------
# pixels


def render(rng: np.random.Generator, scene: Scene) -> np.ndarray:
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


def save_jpeg(pixels: np.ndarray, path: Path) -> None:
    # No EXIF, no timestamps, fixed quality and subsampling: the same pixels give the same bytes.
    Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=JPEG_QUALITY, subsampling=2,
                                        optimize=False, progressive=False)

