"""Geometry checks of COCO annotations, run before pycocotools ever sees them.

pycocotools trusts its input: an odd-length polygon silently loses its last coordinate, a
4-coordinate polygon is read as a bounding box (TypeError), an empty polygon raises a bare
`Exception`, and a NaN coordinate makes `frPyObjects` allocate until the process is killed. A
bbox nobody rasterises is carried to the shards as is. So every annotation ingest publishes is
checked here first; :func:`annotation_problem` names what is wrong in words a user can act on,
and only annotations it accepts reach `annotation_rle`, whose mask then equals pycocotools'
`COCO.annToMask`. :func:`annotation_mask` then checks the mask itself: a polygon that covers no
pixel (outside its image, or collinear), an all-zero RLE, or a mask lying outside its own bbox
would give a training target that shows nothing, or something else than the box says.
"""

from __future__ import annotations

import math
from typing import Any

# A COCO bbox may stick out of its image by this many pixels on any side (annotation tools
# round, and COCO boxes of objects touching the border end a fraction of a pixel outside).
BBOX_TOLERANCE_PX = 1.0
MIN_POLYGON_COORDS = 6  # three points: fewer encloses no area (and 4 reads as a bbox)
# A polygon coordinate may lie this many image sides beyond its image: annotation tools clip
# loosely, but pycocotools' rasteriser allocates per pixel of edge length (1e7 px took 0.8 GB,
# 1e9 overflows its int and crashes the process), so far-off coordinates are refused first.
POLYGON_MARGIN_SIDES = 1.0
# A mask must lie inside its bbox grown by this many pixels, or this share of the box's side,
# whichever is larger: rasterising moves a polygon's extent by up to a pixel, and the share
# keeps thin parts of large objects from tripping the check; a mask beside its box does.
MASK_BBOX_TOLERANCE_PX = 2.0
MASK_BBOX_TOLERANCE_SHARE = 0.1


def _finite_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _polygons_problem(segm: list[Any], height: int, width: int) -> str | None:
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
            bad = next((v for v in poly if not _finite_number(v)), None)
            if bad is None:  # each is finite, their sum is not: far too large anyway
                return f"polygon {i} holds coordinates too large to be pixel positions"
            return f"polygon {i} holds a coordinate that is not a finite number ({bad!r})"
        far = _far_coordinate(poly, height, width)
        if far is not None:
            return (f"polygon {i} has a coordinate {far} far outside its {width}x{height} "
                    "(width x height) image")
    return None


def _far_coordinate(poly: list[Any] | tuple[Any, ...], height: int, width: int) -> str | None:
    """`x=...`/`y=...` of a coordinate more than POLYGON_MARGIN_SIDES image sides outside."""
    for axis, values, side in (("x", poly[0::2], width), ("y", poly[1::2], height)):
        margin = POLYGON_MARGIN_SIDES * side
        lo, hi = min(values), max(values)
        if lo < -margin:
            return f"{axis}={lo:g}"
        if hi > side + margin:
            return f"{axis}={hi:g}"
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
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1) or not isinstance(crowd, int):  # bool is an int: True/False pass
        return f"iscrowd {crowd!r} is neither 0 nor 1"
    area = ann.get("area", 0.0)
    if not _finite_number(area):
        return f"area {area!r} is not a finite number"
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        problem = _polygons_problem(segm, height, width)
    elif isinstance(segm, dict):
        problem = _rle_problem(segm, height, width)
    else:
        problem = f"segmentation is {type(segm).__name__}, neither polygons nor RLE"
    return problem or _bbox_problem(ann.get("bbox"), height, width)


def annotation_rle(ann: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """Compressed RLE of an annotation, as pycocotools' COCO.annToRLE builds it.

    Only for an annotation `annotation_problem` accepts: pycocotools does not check its input.
    """
    from pycocotools import mask as mask_utils

    segm = ann["segmentation"]
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    counts = rle["counts"]
    return {"size": [height, width],
            "counts": counts.decode() if isinstance(counts, bytes) else counts}


def mask_problem(rle: dict[str, Any], bbox: list[float]) -> str | None:
    """Why a well-formed annotation's mask cannot be a training target, or None: it covers no
    pixel, or it lies outside its own (already checked) bbox beyond the tolerance above. A box
    larger than its mask is not judged: thin parts may rasterise to nothing."""
    from pycocotools import mask as mask_utils

    coded = {"size": rle["size"], "counts": rle["counts"].encode()}
    if int(mask_utils.area(coded)) == 0:
        return "its mask covers no pixel of its image (polygon outside the image, collinear, " \
               "or an all-zero RLE)"
    mx, my, mw, mh = (float(v) for v in mask_utils.toBbox(coded))
    x, y, w, h = (float(v) for v in bbox)
    tx = max(MASK_BBOX_TOLERANCE_PX, MASK_BBOX_TOLERANCE_SHARE * w)
    ty = max(MASK_BBOX_TOLERANCE_PX, MASK_BBOX_TOLERANCE_SHARE * h)
    if mx < x - tx or my < y - ty or mx + mw > x + w + tx or my + mh > y + h + ty:
        return (f"its mask spans [x {mx:g}..{mx + mw:g}, y {my:g}..{my + mh:g}], outside its "
                f"bbox {[x, y, w, h]!r}: the segmentation and the box disagree")
    return None


def annotation_mask(ann: dict[str, Any], height: int, width: int,
                    category_ids: set[int]) -> tuple[dict[str, Any] | None, str | None]:
    """(compressed RLE, None) for an annotation that can be published, else (None, why)."""
    problem = annotation_problem(ann, height, width, category_ids)
    if problem is not None:
        return None, problem
    rle = annotation_rle(ann, height, width)
    problem = mask_problem(rle, ann["bbox"])
    return (None, problem) if problem is not None else (rle, None)
