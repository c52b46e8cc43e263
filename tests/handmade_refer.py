"""A tiny REFER dataset written by hand (refcoco layout), for ingest's bad-input tests.

Every annotation and ref is spelled out here, so a test knows without any pipeline code which
annotations are bad, why, and which refs must survive. `py2_pickle` writes a pickle the way
Python 2's cPickle protocol 2 does (byte strings as SHORT_BINSTRING/BINSTRING, unicode as
BINUNICODE), independently of Python 3's pickler.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

NAN = float("nan")
CATEGORIES = [{"supercategory": "person", "id": 1, "name": "person"},
              {"supercategory": "vehicle", "id": 3, "name": "car"}]
# (image id, width, height)
IMAGES = [(11, 64, 48), (12, 80, 60), (13, 72, 54), (14, 60, 40)]
SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]  # a fine polygon on image 12
SQUARE_BOX = [10.0, 10.0, 20.0, 20.0]

# Bad geometry on image 12 (80x60): name -> (what is changed, a phrase of ingest's reason).
BAD = {
    "odd_polygon": ({"segmentation": [[10, 10, 30, 10, 30, 30, 10]]},
                    "odd number of coordinates (7)"),
    "four_coordinate_polygon": ({"segmentation": [[10, 10, 30, 10]]},
                                "4 coordinates, fewer than 3 points"),
    "empty_segmentation": ({"segmentation": []}, "segmentation is an empty list"),
    "empty_polygon": ({"segmentation": [SQUARE, []]}, "polygon 1 is empty"),
    "nan_coordinate": ({"segmentation": [[10, 10, 30, NAN, 30, 30, 10, 30]]},
                       "not a finite number (nan)"),
    "string_coordinate": ({"segmentation": [[10, 10, 30, "x", 30, 30, 10, 30]]},
                          "not a finite number ('x')"),
    "rle_size_mismatch": ({"segmentation": {"size": [61, 80], "counts": [61 * 80]}},
                          "RLE size 61x80 (height x width) differs from its image's 60x80"),
    "rle_runs_short": ({"segmentation": {"size": [60, 80], "counts": [100, 20]}},
                       "RLE runs cover 120 pixels, not the 60x80 = 4800"),
    "rle_bad_string": ({"segmentation": {"size": [60, 80], "counts": "~~~"}},
                       "not a valid COCO RLE string"),
    "bbox_three_values": ({"bbox": [10, 10, 20]}, "bbox has 3 values, not 4"),
    "bbox_negative_width": ({"bbox": [30, 10, -20, 20]}, "width or height that is not positive"),
    "bbox_zero_height": ({"bbox": [10, 10, 20, 0]}, "width or height that is not positive"),
    "bbox_nan": ({"bbox": [10, NAN, 20, 20]}, "holds a value that is not a finite number"),
    "bbox_outside_image": ({"bbox": [70, 10, 20, 20]}, "lies outside its 80x60"),
    "unknown_category": ({"category_id": 999}, "category 999 is not among the categories"),
    # coordinates pycocotools would rasterise at a cost of gigabytes (or crash on, past 2**31)
    "far_coordinate": ({"segmentation": [[10, 10, 1e8, 10, 30, 30, 10, 30]]},
                       "coordinate x=1e+08 far outside its 80x60"),
    "coordinate_sum_overflow": ({"segmentation": [[1e308, 10, 1e308, 10, 30, 30]]},
                                "coordinates too large to be pixel positions"),
    # well-formed, but the mask is no training target: it shows nothing, or not what the box says
    "polygon_beside_image": ({"segmentation": [[90, 10, 100, 10, 100, 30, 90, 30]]},
                             "its mask covers no pixel"),
    "collinear_polygon": ({"segmentation": [[10, 10, 20, 20, 30, 30]]},
                          "its mask covers no pixel"),
    "all_zero_rle": ({"segmentation": {"size": [60, 80], "counts": [60 * 80]}},
                     "its mask covers no pixel"),
    "mask_beside_bbox": ({"segmentation": [[50, 10, 70, 10, 70, 30, 50, 30]]},
                         "outside its bbox [10.0, 10.0, 20.0, 20.0]"),
    "iscrowd_text": ({"iscrowd": "0"}, "iscrowd '0' is neither 0 nor 1"),
}


def _ann(ann_id: int, image_id: int, segmentation: Any, bbox: list[float], category: int = 1,
         crowd: int = 0) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": category,
            "segmentation": segmentation, "bbox": bbox, "area": 100.0, "iscrowd": crowd}


def _crowd_rle(h: int, w: int) -> dict[str, Any]:
    """An uncompressed (crowd) RLE of a rectangle, run lengths counted by hand."""
    m = np.zeros((h, w), np.uint8)
    m[5:20, 40:50] = 1
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"size": [h, w], "counts": [int(r) for r in runs]}


def _compressed_rle(h: int, w: int) -> dict[str, Any]:
    m = np.zeros((h, w), np.uint8, order="F")
    m[30:40, 5:25] = 1
    rle = mask_utils.encode(m)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


@dataclass
class Handmade:
    root: Path  # the data root (refcoco/ under it)
    images_dir: Path
    instances: dict[str, Any]
    refs: list[dict[str, Any]]
    bad_ann: dict[str, int] = field(default_factory=dict)  # BAD name -> ann id
    context_bad_ann: int | None = None  # a bad annotation no ref points at
    dropped_refs: set[int] = field(default_factory=set)

    @property
    def instances_path(self) -> Path:
        return self.root / "refcoco" / "instances.json"

    @property
    def refs_path(self) -> Path:
        return self.root / "refcoco" / "refs(unc).p"


def write_handmade(out: Path, bad: list[str] | None = None, context_bad: bool = True,
                   refs_bytes: bytes | None = None) -> Handmade:
    """Write the dataset to `out`; `bad` selects BAD kinds (all by default)."""
    bad = list(BAD) if bad is None else bad
    images_dir = out / "images" / "train2014"
    images_dir.mkdir(parents=True)
    (out / "refcoco").mkdir()
    image_records = []
    rng = np.random.default_rng(0)
    for image_id, w, h in IMAGES:
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            images_dir / name, "JPEG")
        image_records.append({"id": image_id, "file_name": name, "width": w, "height": h})

    anns = [
        _ann(101, 11, [[2, 2, 30, 2, 30, 20, 2, 20]], [2, 2, 28, 18]),
        _ann(102, 11, [[35, 5, 60, 5, 60, 40], [40, 42, 50, 42, 45, 47]], [35, 5, 25, 42], 3),
        # sticks out of the 64x48 image by half a pixel: within the tolerance
        _ann(103, 11, [[50, 30, 64, 30, 64, 48, 50, 48]], [50, 30, 14.5, 18.4]),
        _ann(104, 11, _crowd_rle(48, 64), [40, 5, 10, 15], 1, crowd=1),
        _ann(105, 11, _compressed_rle(48, 64), [5, 30, 20, 10]),
        _ann(250, 12, [SQUARE], SQUARE_BOX, 3),
        _ann(301, 13, [[5, 5, 40, 5, 20, 40]], [5, 5, 35, 35]),
        _ann(401, 14, [[5, 5, 40, 5, 20, 30]], [5, 5, 35, 25], 3),
    ]
    refs: list[dict[str, Any]] = []
    sent_id = [1000]

    def ref(image_id: int, ann_id: Any, split: str, n_sents: int = 2) -> int:
        ref_id = len(refs) + 1
        sents = []
        for k in range(n_sents):
            text = f"object {ref_id} number {k}"
            sents.append({"sent_id": sent_id[0], "sent": text, "raw": text.title(),
                          "tokens": text.split()})
            sent_id[0] += 1
        refs.append({"ref_id": ref_id, "image_id": image_id, "ann_id": ann_id, "split": split,
                     "category_id": 1, "sent_ids": [s["sent_id"] for s in sents],
                     "sentences": sents, "file_name": f"x_{ref_id}.jpg"})
        return ref_id

    splits = ["train", "val", "testA", "testB"]
    for i, a in enumerate((101, 102, 103, 250, 301, 401)):
        ref(int(next(x["image_id"] for x in anns if x["id"] == a)), a, splits[i % 2], 3)
    made = Handmade(out, images_dir, {}, refs)
    for n, name in enumerate(bad):
        change, _ = BAD[name]
        a = _ann(201 + n, 12, [SQUARE], list(SQUARE_BOX))
        a.update(change)
        anns.append(a)
        made.bad_ann[name] = a["id"]
        made.dropped_refs.add(ref(12, a["id"], splits[n % 4]))
    if bad:  # a two-target ref with one bad target is dropped as a whole
        made.dropped_refs.add(ref(12, [250, made.bad_ann[bad[0]]], "train", 1))
    if context_bad:
        anns.append(_ann(106, 11, [[1, 1, 5, 1, 5]], [1, 1, 4, 4]))  # odd; nobody's target
        made.context_bad_ann = 106
    made.instances = {"info": {}, "licenses": [], "images": image_records, "annotations": anns,
                      "categories": CATEGORIES}
    made.instances_path.write_text(json.dumps(made.instances))  # NaN written as NaN
    made.refs_path.write_bytes(refs_bytes if refs_bytes is not None
                               else pickle.dumps(refs, protocol=2))
    return made


def py2_pickle(obj: Any) -> bytes:
    """Protocol-2 opcodes as Python 2 writes them: `bytes` stand for py2 `str`, `str` for
    `unicode` (no memo opcodes, which a reader does not need)."""
    out = bytearray(b"\x80\x02")

    def emit(o: Any) -> None:
        if isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.extend(b"K" + bytes([o]))
            elif -2**31 <= o < 2**31:
                out.extend(b"J" + struct.pack("<i", o))
            else:
                data = o.to_bytes((o.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(data)]) + data)
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, bytes):
            out.extend((b"U" + bytes([len(o)])) if len(o) < 256
                       else (b"T" + struct.pack("<i", len(o))))
            out.extend(o)
        elif isinstance(o, str):
            data = o.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(o, list):
            out.extend(b"]")
            if o:
                out.extend(b"(")
                for v in o:
                    emit(v)
                out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}")
            if o:
                out.extend(b"(")
                for k, v in o.items():
                    emit(k)
                    emit(v)
                out.extend(b"u")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)
