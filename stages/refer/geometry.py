"""Geometry checks of COCO annotations, run before pycocotools ever sees them.

pycocotools trusts its input: an odd-length polygon silently loses its last coordinate, a
4-coordinate polygon is read as a bounding box (TypeError), an empty polygon raises a bare
`Exception`, and a NaN coordinate makes `frPyObjects` allocate until the process is killed. A
bbox nobody rasterises is carried to the shards as is. So every annotation ingest publishes is
checked here first; :func:`annotation_problem` names what is wrong in words a user can act on,
and only annotations it accepts reach `annotation_rle`, whose mask then equals pycocotools'
`COCO.annToMask`.
"""

from __future__ import annotations

import math
from typing import Any

# A COCO bbox may stick out of its image by this many pixels on any side (annotation tools
# round, and COCO boxes of objects touching the border end a fraction of a pixel outside).
BBOX_TOLERANCE_PX = 1.0
MIN_POLYGON_COORDS = 6  # three points: fewer encloses no area (and 4 reads as a bbox)


def _finite_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _polygons_problem(segm: list[Any]) -> str | None:
    if not segm:
        return "segmentation is an empty list (no polygon)"
    for i, poly in enumerate(segm):
        if not isinstance(poly, (list, tuple)):
            return (f"segmentation is not a list of polygons (item {i} is "
                    f"{type(poly).__name__}, not a list of coordinates)")
        n = len(poly)
        if n == 0:
            return f"polygon {i} is empty"
        if n % 2:
            return f"polygon {i} has an odd number of coordinates ({n})"
        if n < MIN_POLYGON_COORDS:
            return f"polygon {i} has {n} coordinates, fewer than 3 points"
        # sum() is one C loop; only a failing polygon is searched for its culprit
        try:
            ok = math.isfinite(sum(poly)) and not any(isinstance(v, bool) for v in poly)
        except (TypeError, OverflowError):
            ok = False
        if not ok:
            bad = next(v for v in poly if not _finite_number(v))
            return f"polygon {i} holds a coordinate that is not a finite number ({bad!r})"
    return None


def rle_string_counts(s: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string (pycocotools' `rleFrString`), or None when
    the string is not one: a character outside '0'..'o', a number cut off, a negative run."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n:
                return None
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:  # runs after the third are stored as differences
            x += counts[-2]
        if x < 0:
            return None
        counts.append(x)
    return counts


def _rle_problem(segm: dict[str, Any], height: int, width: int) -> str | None:
    size = segm.get("size")
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        return f"RLE size {size!r} is not [height, width]"
    if [size[0], size[1]] != [height, width]:
        return (f"RLE size {size[0]}x{size[1]} (height x width) differs from its image's "
                f"{height}x{width}")
    counts = segm.get("counts")
    if isinstance(counts, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            return "uncompressed RLE counts are not all non-negative integers"
        runs: list[int] | None = list(counts)
    elif isinstance(counts, (str, bytes)):
        try:
            text = counts.decode("ascii") if isinstance(counts, bytes) else counts
        except UnicodeDecodeError:
            text = "\x00"
        runs = rle_string_counts(text)
        if runs is None:
            return "compressed RLE counts are not a valid COCO RLE string"
    else:
        return f"RLE counts are {type(counts).__name__}, neither a list nor a string"
    total = sum(runs)
    if total != height * width:
        return (f"RLE runs cover {total} pixels, not the {height}x{width} = {height * width} "
                "of its image")
    return None


def _bbox_problem(bbox: Any, height: int, width: int) -> str | None:
    if not isinstance(bbox, (list, tuple)):
        return f"bbox is {type(bbox).__name__}, not 4 numbers [x, y, w, h]"
    if len(bbox) != 4:
        return f"bbox has {len(bbox)} values, not 4 [x, y, w, h]"
    if not all(_finite_number(v) for v in bbox):
        return f"bbox {list(bbox)!r} holds a value that is not a finite number"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return f"bbox {list(bbox)!r} has a width or height that is not positive"
    tol = BBOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return (f"bbox {list(bbox)!r} lies outside its {width}x{height} (width x height) image "
                f"by more than {tol:g} pixel")
    return None


def annotation_problem(ann: dict[str, Any], height: int, width: int,
                       category_ids: set[int]) -> str | None:
    """Why an annotation cannot be published (its mask or box would be wrong), or None.

    `height`/`width` are its image's, from instances.json (already checked to be positive).
    """
    cat = ann.get("category_id")
    if isinstance(cat, bool) or not isinstance(cat, int):
        return f"category_id {cat!r} is not an integer"
    if cat not in category_ids:
        return f"category {cat} is not among the categories of instances.json"
    area = ann.get("area", 0.0)
    if not _finite_number(area):
        return f"area {area!r} is not a finite number"
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        problem = _polygons_problem(segm)
    elif isinstance(segm, dict):
        problem = _rle_problem(segm, height, width)
    else:
        problem = f"segmentation is {type(segm).__name__}, neither polygons nor RLE"
    return problem or _bbox_problem(ann.get("bbox"), height, width)
