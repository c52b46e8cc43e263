"""Reading REFER-format files (`refs(<split>).p`, `grefs(<split>).json`, `instances.json`).

Everything that can be wrong with the files is checked here, before any work: each problem is
an :class:`InputError` naming the file, the offending record and what to do, never a bare
traceback from deep inside a stage.
"""

from __future__ import annotations

import json
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from stages.datasets import DataManifest

NO_TARGET = -1


@dataclass
class Sentence:
    sent_id: int
    sent: str
    raw: str
    tokens: list[str]


@dataclass
class Ref:
    ref_id: int
    image_id: int
    ann_ids: list[int]  # empty for a gRefCOCO no-target ref
    split: str
    category_id: int  # first target's category; -1 for no-target
    sentences: list[Sentence] = field(default_factory=list)


@dataclass
class ReferData:
    refs: list[Ref]
    images: dict[int, dict[str, Any]]  # the images the refs use, from instances.json
    anns_by_image: dict[int, list[dict[str, Any]]]  # every annotation of those images
    categories: list[dict[str, Any]]


def locate_inputs(manifest: DataManifest, data_root: Path) -> tuple[Path, Path]:
    refs = manifest.refs_path(data_root)
    instances = manifest.instances_path(data_root)
    for path, what in ((refs, "refs"), (instances, "instances")):
        if not path.is_file():
            layout = f"<data-root>/{manifest.dir}/{path.name}"
            raise InputError(
                f"{path}: {what} file not found. {manifest.name} expects the REFER layout "
                f"{layout} (see {manifest.source_path}); check --data-root (now {data_root})"
            )
    return refs, instances


def _load_refs_file(path: Path, fmt: str) -> Any:
    if fmt == "grefer" and path.suffix == ".json":
        return _load_json(path, "refs")
    try:
        with open(path, "rb") as f:
            try:
                return pickle.load(f)
            except UnicodeDecodeError:  # a Python 2 pickle with non-ASCII byte strings
                f.seek(0)
                return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError,
            IndexError, TypeError) as exc:
        raise InputError(
            f"{path}: cannot be read as a REFER refs pickle ({type(exc).__name__}: {exc}); "
            "the file is probably truncated or not a refs file: download it again"
        ) from None


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path}: the {what} file is not valid JSON ({exc}); it is probably truncated: "
            "download it again"
        ) from None


def _require(record: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputError(f"{where} lacks the field(s) {', '.join(missing)}; is this a REFER file?")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_refer(manifest: DataManifest, data_root: Path) -> ReferData:
    """Parse and cross-check a dataset's refs and instances files."""
    refs_path, inst_path = locate_inputs(manifest, data_root)
    raw_refs = _load_refs_file(refs_path, manifest.format)
    if not isinstance(raw_refs, list) or not all(isinstance(r, dict) for r in raw_refs):
        raise InputError(f"{refs_path}: expected a list of ref records, got "
                         f"{type(raw_refs).__name__}")
    if not raw_refs:
        raise InputError(f"{refs_path}: the refs file holds no refs")
    instances = _load_json(inst_path, "instances")
    if not isinstance(instances, dict):
        raise InputError(f"{inst_path}: expected a JSON object with images/annotations/categories")
    _require(instances, ("images", "annotations", "categories"), str(inst_path))

    images = {}
    for img in instances["images"]:
        _require(img, ("id", "file_name", "width", "height"), f"{inst_path}: an image record")
        images[int(img["id"])] = img
    anns = {}
    for ann in instances["annotations"]:
        _require(ann, ("id", "image_id", "category_id", "segmentation", "bbox"),
                 f"{inst_path}: an annotation record")
        anns[int(ann["id"])] = ann
    categories = []
    for cat in instances["categories"]:
        _require(cat, ("id", "name"), f"{inst_path}: a category record")
        categories.append(cat)
    cat_ids = {int(c["id"]) for c in categories}

    refs: list[Ref] = []
    seen_refs: set[int] = set()
    seen_sents: dict[int, int] = {}
    splits = set(manifest.splits)
    for raw in raw_refs:
        _require(raw, ("ref_id", "image_id", "ann_id", "split", "sentences"),
                 f"{refs_path}: ref record {raw.get('ref_id', '?')}")
        ref_id = int(raw["ref_id"])
        where = f"{refs_path}: ref {ref_id}"
        if ref_id in seen_refs:
            raise InputError(f"{where} appears twice (ref ids must be unique)")
        seen_refs.add(ref_id)
        split = raw["split"]
        if split not in splits:
            raise InputError(
                f"{where} has split {split!r}, not one of {sorted(splits)} that "
                f"{manifest.source_path} declares for {manifest.name}; is --dataset right?"
            )
        image_id = int(raw["image_id"])
        if image_id not in images:
            raise InputError(f"{where} points at image {image_id}, which {inst_path} does not "
                             "have; the refs and instances files do not belong together")
        ann_ids = [int(a) for a in _as_list(raw["ann_id"]) if int(a) != NO_TARGET]
        for a in ann_ids:
            if a not in anns:
                raise InputError(f"{where} points at annotation {a}, which {inst_path} does not "
                                 "have; the refs and instances files do not belong together")
            if int(anns[a]["image_id"]) != image_id:
                raise InputError(f"{where} is on image {image_id} but its annotation {a} is on "
                                 f"image {anns[a]['image_id']} in {inst_path}")
        category_id = int(anns[ann_ids[0]]["category_id"]) if ann_ids else NO_TARGET
        if ann_ids and category_id not in cat_ids:
            raise InputError(f"{inst_path}: annotation {ann_ids[0]} has category {category_id}, "
                             "which is not among its categories")
        sentences = []
        for s in raw["sentences"]:
            _require(s, ("sent_id", "sent"), f"{where}: a sentence")
            sid = int(s["sent_id"])
            if sid in seen_sents:
                raise InputError(f"{where}: sentence {sid} also belongs to ref "
                                 f"{seen_sents[sid]} (sentence ids must be unique)")
            seen_sents[sid] = ref_id
            sent = str(s["sent"])
            tokens = [str(t) for t in s.get("tokens", sent.split())]
            sentences.append(Sentence(sid, sent, str(s.get("raw", sent)), tokens))
        refs.append(Ref(ref_id, image_id, ann_ids, split, category_id, sentences))

    used = {r.image_id for r in refs}
    anns_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in anns.values():
        if int(ann["image_id"]) in used:
            anns_by_image[int(ann["image_id"])].append(ann)
    return ReferData(
        refs=refs,
        images={i: images[i] for i in sorted(used)},
        anns_by_image=dict(anns_by_image),
        categories=sorted(categories, key=lambda c: int(c["id"])),
    )


def other_referent_sentences(ref: dict[str, Any], refs: dict[int, dict[str, Any]],
                             refs_of_image: dict[int, list[int]],
                             sents_of_ref: dict[int, list[int]]) -> list[int]:
    """Sentence ids of the image's other referents whose targets do not overlap `ref`'s (by
    ref id, then sentence id): the same-image hard negatives; nothing for a no-target ref, which
    has no object to contrast with."""
    if not ref["ann_ids"]:
        return []
    mine = set(ref["ann_ids"])
    return [s for other in sorted(refs_of_image[ref["image_id"]])
            if other != ref["ref_id"] and not mine & set(refs[other]["ann_ids"])
            for s in sents_of_ref.get(other, [])]
