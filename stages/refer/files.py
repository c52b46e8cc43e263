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

from pipeline.errors import InputError, NemoError
from stages.refer.manifests import DataManifest

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
    # sentences left out while parsing, by reason (`blank`: no text to train on); ingest
    # records them in its manifest with the refs it drops
    dropped_sentences: dict[str, int] = field(default_factory=dict)
    repeated_targets: int = 0  # refs that listed one target twice (kept once)


def locate_inputs(manifest: DataManifest, data_root: Path) -> tuple[Path, Path]:
    refs = manifest.refs_path(data_root)
    instances = manifest.instances_path(data_root)
    for path, what in ((refs, "refs"), (instances, "instances")):
        if path.exists() and not path.is_file():
            raise InputError(f"{path}: the {what} file is not a regular file (a directory?); "
                             f"put the {manifest.name} {what} file there")
        if not path.is_file():
            layout = f"<data-root>/{manifest.dir}/{path.name}"
            raise InputError(
                f"{path}: {what} file not found. {manifest.name} expects the REFER layout "
                f"{layout} (see {manifest.source_path}); check --data-root (now {data_root})"
            )
    return refs, instances


# What a REFER refs pickle may ask for besides containers and scalars, which pickle builds
# without any global: Python 3 writes bytes at protocol 2 as `_codecs.encode(text, "latin1")`
# (empty bytes as `bytes()`), and a set as `set(list)`. Each is wrapped to take only those
# arguments. Python 2's `str`/`unicode`/`long` need no global at all.
_EXPECTED = "a REFER refs file holds only lists, dicts, strings and numbers"


def _text(raw: bytes) -> str:
    """A byte string of a REFER file as text: UTF-8 when it is, else latin-1 (never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin1")


def _latin1_bytes(text: Any = "", encoding: str = "latin1") -> str:
    """`_codecs.encode(text, "latin1")`, the bytes of a Python 3 protocol-2 pickle, as text."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return _text(text.encode("latin1"))


def _empty_bytes(*args: Any) -> str:
    if args:
        raise pickle.UnpicklingError("bytes() with arguments")
    return ""


def _plain_set(items: Any = ()) -> set[Any]:
    if not isinstance(items, (list, tuple)):
        raise pickle.UnpicklingError("set() of something other than a list")
    return set(items)


def _plain_frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_plain_set(items))


_SAFE_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes, ("codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "set"): _plain_set, ("builtins", "set"): _plain_set,
    ("__builtin__", "frozenset"): _plain_frozenset, ("builtins", "frozenset"): _plain_frozenset,
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds containers and scalars only. `find_class` is the one door through which a pickle
    reaches code (REDUCE, BUILD, NEWOBJ, INST and the extension registry all get their callable
    from it; persistent ids are refused by the base class), so nothing else can run."""

    def __init__(self, f: Any, path: Path, encoding: str) -> None:
        super().__init__(f, encoding=encoding)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        safe = _SAFE_GLOBALS.get((module, name))
        if safe is None:
            raise InputError(
                f"{self.path}: refusing to run code from a pickle: it asks for "
                f"{module}.{name}, and {_EXPECTED}. The file is not a REFER refs file or was "
                "tampered with: download it again from its source"
            )
        return safe


def _decode_bytes(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return _text(obj)
    if isinstance(obj, list):
        return [_decode_bytes(v) for v in obj]
    if isinstance(obj, dict):
        return {_decode_bytes(k): _decode_bytes(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_decode_bytes(v) for v in obj)
    return obj


def load_pickle_data(path: Path) -> Any:
    """A pickle of plain data, read without running any code it may carry; strings are `str`.

    REFER's pickles were written by Python 2, whose byte strings (`str`) are read as ASCII;
    if one is not ASCII the file is read again keeping them as bytes, which are then decoded
    as UTF-8 where valid and as latin-1 otherwise (latin-1 alone would garble UTF-8 text).
    """
    with open(path, "rb") as f:
        try:
            data = _DataOnlyUnpickler(f, path, "ASCII").load()
        except UnicodeDecodeError:
            f.seek(0)
            data = _DataOnlyUnpickler(f, path, "bytes").load()
    # Python 3 pickles (protocol >= 3) hold `bytes` whatever the encoding asked for
    return _decode_bytes(data)


def load_refs_file(path: Path, fmt: str) -> Any:
    """The records of a refs file as stored (a grefer `.json`, else a REFER pickle read without
    running code), or an InputError saying what is wrong with the file."""
    if fmt == "grefer" and path.suffix == ".json":
        return _load_json(path, "refs")
    try:
        return load_pickle_data(path)
    except NemoError:
        raise
    except OSError as exc:
        raise InputError(f"{path}: cannot read the refs file ({exc.strerror or exc}); check "
                         "that it is a readable file") from None
    except (MemoryError, RecursionError) as exc:
        raise InputError(f"{path}: the refs pickle is too large or too deeply nested to read "
                         f"({type(exc).__name__}); it is not a REFER refs file") from None
    except Exception as exc:  # a truncated pickle raises many types
        raise InputError(
            f"{path}: cannot be read as a REFER refs pickle ({type(exc).__name__}: {exc}); "
            "the file is probably truncated or not a refs file: download it again"
        ) from None


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} file ({exc.strerror or exc}); check "
                         "that it is a readable file") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, and
        # the int-string limit (a number of over 4,300 digits) are all ValueErrors
        raise InputError(
            f"{path}: the {what} file is not valid JSON ({exc}); it is probably truncated or "
            "damaged: download it again"
        ) from None


def _require(record: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputError(f"{where} lacks the field(s) {', '.join(missing)}; is this a REFER file?")


INT64_RANGE = (-(2**63), 2**63 - 1)  # the ids' Parquet columns
INT32_RANGE = (-(2**31), 2**31 - 1)  # category ids


def _int(value: Any, what: str, where: str, bounds: tuple[int, int] = INT64_RANGE) -> int:
    """An id field as an int; a wrong type, or a value its column cannot hold, is an
    InputError naming the record, not a ValueError or OverflowError deep in a stage."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{where}: {what} {value!r} is not an integer")
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"{where}: {what} {value!r} is not an integer") from None
    if not bounds[0] <= number <= bounds[1]:
        raise InputError(f"{where}: {what} {number} is outside the range an id may take "
                         f"({bounds[0]}..{bounds[1]}); fix the record")
    return number


def _text_field(value: Any, what: str, where: str) -> str:
    """A text field as stored: a string that UTF-8 can encode. A number or list printed as
    text, or a lone surrogate that Parquet cannot write, is an InputError here."""
    if not isinstance(value, str):
        raise InputError(f"{where}: {what} {value!r} is {type(value).__name__}, not text; "
                         "fix the record")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}: {what} {value!r} is not valid Unicode text (it holds a "
                         "lone surrogate); fix the encoding of the file") from None
    return value


def _sentence(s: dict[str, Any], sid: int, where: str) -> Sentence:
    sent = _text_field(s["sent"], "sent", f"{where}: sentence {sid}")
    raw = _text_field(s.get("raw", sent), "raw", f"{where}: sentence {sid}")
    tokens = s.get("tokens", sent.split())
    if not isinstance(tokens, list):
        raise InputError(f"{where}: sentence {sid} has tokens {tokens!r}, not a list of "
                         "words; fix the record")
    return Sentence(sid, sent, raw,
                    [_text_field(t, "token", f"{where}: sentence {sid}") for t in tokens])


def _ref_targets(raw: dict[str, Any], fmt: str, where: str) -> tuple[list[int], bool]:
    """A ref's target annotation ids (none for a gRefCOCO no-target ref), and whether one was
    listed twice. A REFER ref has a target; a gRefCOCO ref lists its targets or [-1], never
    both, and its `no_target` flag, where present, must agree."""
    listed = [_int(v, "ann_id", where) for v in _as_list(raw["ann_id"])]
    given = [a for a in listed if a != NO_TARGET]
    targets = list(dict.fromkeys(given))
    if NO_TARGET in listed and targets:
        raise InputError(f"{where} lists both targets {targets} and no-target ({NO_TARGET}) in "
                         "ann_id; fix the record")
    if fmt != "grefer" and not targets:
        raise InputError(f"{where} has ann_id {raw['ann_id']!r}: a REFER ref has a target "
                         "annotation (only gRefCOCO has no-target refs); is --dataset right?")
    flag = raw.get("no_target")
    if flag is not None and bool(flag) != (not targets):
        raise InputError(f"{where} has no_target={flag!r} but ann_id {raw['ann_id']!r}; the "
                         "flag and the targets disagree: fix the record")
    return targets, len(targets) < len(given)


def _records(container: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    value = container[key]
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise InputError(f"{path}: {key} must be a list of JSON objects; is this a COCO "
                         "instances file?")
    return value


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_refer(manifest: DataManifest, data_root: Path) -> ReferData:
    """Parse and cross-check a dataset's refs and instances files."""
    refs_path, inst_path = locate_inputs(manifest, data_root)
    raw_refs = load_refs_file(refs_path, manifest.format)
    if not isinstance(raw_refs, list):
        raise InputError(f"{refs_path}: expected a list of ref records, got "
                         f"{type(raw_refs).__name__}; is this a REFER refs file?")
    odd = next((r for r in raw_refs if not isinstance(r, dict)), None)
    if odd is not None:
        raise InputError(f"{refs_path}: expected a list of ref records (dicts), but it holds "
                         f"{type(odd).__name__} {str(odd)[:60]!r}; is this a REFER refs file?")
    if not raw_refs:
        raise InputError(f"{refs_path}: the refs file holds no refs")
    instances = _load_json(inst_path, "instances")
    if not isinstance(instances, dict):
        raise InputError(f"{inst_path}: expected a JSON object with images/annotations/categories")
    _require(instances, ("images", "annotations", "categories"), str(inst_path))

    images = {}
    for img in _records(instances, "images", inst_path):
        _require(img, ("id", "file_name", "width", "height"), f"{inst_path}: an image record")
        image_id = _int(img["id"], "id", f"{inst_path}: an image record")
        if image_id in images:
            raise InputError(f"{inst_path}: image id {image_id} appears twice (image ids must "
                             "be unique); the file is damaged or was merged wrongly")
        name = _text_field(img["file_name"], "file_name", f"{inst_path}: image {image_id}")
        if "\x00" in name or not name.strip():
            raise InputError(f"{inst_path}: image {image_id} has file_name {name!r}, which "
                             "cannot be a file's name; fix the image record")
        for side in ("width", "height"):
            v = img[side]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InputError(f"{inst_path}: image {image_id} has {side} {v!r}, not a "
                                 "positive integer; fix the image record")
        images[image_id] = img
    anns = {}
    for ann in _records(instances, "annotations", inst_path):
        _require(ann, ("id", "image_id", "category_id", "segmentation", "bbox"),
                 f"{inst_path}: an annotation record")
        where = f"{inst_path}: annotation {ann['id']!r}"
        ann_id = _int(ann["id"], "id", where)
        _int(ann["image_id"], "image_id", where)
        if ann_id in anns:
            raise InputError(f"{inst_path}: annotation id {ann_id} appears twice (annotation "
                             "ids must be unique); the file is damaged or was merged wrongly")
        anns[ann_id] = ann
    categories = []
    category_ids: set[int] = set()
    for cat in _records(instances, "categories", inst_path):
        _require(cat, ("id", "name"), f"{inst_path}: a category record")
        if isinstance(cat["id"], bool) or not isinstance(cat["id"], int):
            raise InputError(f"{inst_path}: category id {cat['id']!r} is not an integer")
        cat_id = _int(cat["id"], "category id", f"{inst_path}: a category record", INT32_RANGE)
        if cat_id in category_ids:
            raise InputError(f"{inst_path}: category id {cat_id} appears twice (category ids "
                             "must be unique); fix the categories list")
        category_ids.add(cat_id)
        _text_field(cat["name"], "name", f"{inst_path}: category {cat_id}")
        _text_field(cat.get("supercategory", ""), "supercategory",
                    f"{inst_path}: category {cat_id}")
        categories.append(cat)

    refs: list[Ref] = []
    seen_refs: set[int] = set()
    seen_sents: dict[int, int] = {}
    blank = repeated = 0
    splits = set(manifest.splits)
    for raw in raw_refs:
        _require(raw, ("ref_id", "image_id", "ann_id", "split", "sentences"),
                 f"{refs_path}: ref record {raw.get('ref_id', '?')}")
        ref_id = _int(raw["ref_id"], "ref_id", f"{refs_path}: a ref record")
        where = f"{refs_path}: ref {ref_id}"
        if ref_id in seen_refs:
            raise InputError(f"{where} appears twice (ref ids must be unique)")
        seen_refs.add(ref_id)
        split = raw["split"]
        if not isinstance(split, str) or split not in splits:
            raise InputError(
                f"{where} has split {split!r}, not one of {sorted(splits)} that "
                f"{manifest.source_path} declares for {manifest.name}; is --dataset right?"
            )
        image_id = _int(raw["image_id"], "image_id", where)
        if image_id not in images:
            raise InputError(f"{where} points at image {image_id}, which {inst_path} does not "
                             "have; the refs and instances files do not belong together")
        ann_ids, twice = _ref_targets(raw, manifest.format, where)
        repeated += twice
        for a in ann_ids:
            if a not in anns:
                raise InputError(f"{where} points at annotation {a}, which {inst_path} does not "
                                 "have; the refs and instances files do not belong together")
            if int(anns[a]["image_id"]) != image_id:
                raise InputError(f"{where} is on image {image_id} but its annotation {a} is on "
                                 f"image {anns[a]['image_id']} in {inst_path}")
        # a target with a bad category is reported (and its ref dropped) by ingest's
        # geometry check, which names the annotation; the id here only has to be an int
        first_cat = anns[ann_ids[0]]["category_id"] if ann_ids else NO_TARGET
        category_id = first_cat if isinstance(first_cat, int) else NO_TARGET
        sentences = []
        if not isinstance(raw["sentences"], list) or not all(
                isinstance(s, dict) for s in raw["sentences"]):
            raise InputError(f"{where}: sentences must be a list of records")
        for s in raw["sentences"]:
            _require(s, ("sent_id", "sent"), f"{where}: a sentence")
            sid = _int(s["sent_id"], "sent_id", where)
            if sid in seen_sents:
                raise InputError(f"{where}: sentence {sid} also belongs to ref "
                                 f"{seen_sents[sid]} (sentence ids must be unique)")
            seen_sents[sid] = ref_id
            sentence = _sentence(s, sid, where)
            if sentence.sent.strip():
                sentences.append(sentence)
            else:  # nothing to train on or to contrast with: a named exclusion
                blank += 1
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
        dropped_sentences={"blank": blank} if blank else {},
        repeated_targets=repeated,
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
