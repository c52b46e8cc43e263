"""Writing the synthetic REFER data: refs, plan, files, broken inputs, the entry point.

Files are streamed to a temporary folder and renamed into place at the end; the same
`(n_images, seed)` gives the same bytes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from stages.refer.synthetic.expressions import (
    absent_texts,
    multi_texts,
    refcoco_plus_texts,
    refcoco_texts,
    refcocog_texts,
    style,
)
from stages.refer.synthetic.scenes import (
    COCO_CATEGORIES,
    PERSON,
    Obj,
    Scene,
    clean_sentence,
    image_file_name,
    make_scene,
    render,
    save_jpeg,
)

MIN_IMAGES = 12  # 4 UNC splits x 2 images, plus images only in one of the two image sets
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


def _draw_count(rng: np.random.Generator, probs: dict[int, float]) -> int:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=JSON_SEPARATORS)


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

    def make(self, image_id: int, targets: list[Obj], split: str, raws: list[str],
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


def _eligible(scene: Scene, unc_split: str | None) -> list[Obj]:
    """Referable objects: polygon ones (REFER's and gRefCOCO's getMask read only polygons of
    referred objects, as in the releases); UNC testA refers to people only, testB to the rest."""
    objs = [o for o in scene.objs if isinstance(o.segmentation, list)]
    if unc_split == "testA":
        return [o for o in objs if o.spec is PERSON]
    if unc_split == "testB":
        return [o for o in objs if o.spec is not PERSON]
    return objs


def _choose_targets(rng: np.random.Generator, scene: Scene, pool: list[Obj],
                    n: int) -> list[Obj]:
    """n objects, preferring those that share a category (those need disambiguation)."""
    n = max(1, min(n, len(pool)))
    w = np.array([3.0 if len(scene.same(o)) > 1 else 1.0 for o in pool])
    idx = sorted(int(i) for i in rng.choice(len(pool), size=n, replace=False, p=w / w.sum()))
    return [pool[i] for i in idx]


def _multi_group(rng: np.random.Generator, scene: Scene,
                 pool: list[Obj]) -> tuple[list[Obj], bool] | None:
    """2-3 targets: all instances of a category, the left/right two of three, or mixed."""
    options: list[tuple[list[Obj], bool]] = []
    by_cat: dict[int, list[Obj]] = {}
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
    # "contributor" keeps the module's old name: it is part of the demo data's bytes, which
    # every artifact key downstream depends on.
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


def _image_refs(rng: np.random.Generator, scene: Scene, plan: _Plan, idx: int, u_pos: int,
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
            raws = [style(rng, t, False) for t in refcoco_texts(rng, scene, o, n_sent)]
            got.refcoco.append(ids["refcoco"].make(image_id, [o], unc, raws))
            # gRefCOCO keeps RefCOCO's single-target expressions (new ids).
            g = ids["grefcoco"].make(image_id, [o], unc, list(raws))
            g.scalar = g.ref_id % 6 == 2  # as in the release, some ann_ids are plain ints
            got.grefcoco.append(g)
        for o in targets:
            n_sent = _draw_count(rng, {1: 0.05, 2: 0.1, 3: 0.85})
            raws = [style(rng, t, False) for t in refcoco_plus_texts(rng, scene, o, n_sent)]
            got.refcoco_plus.append(ids["refcoco+"].make(image_id, [o], unc, raws))
        if u_pos < 3 or rng.random() < 0.8:
            group = _multi_group(rng, scene, pool)
            if group is not None:
                n_sent = _draw_count(rng, {1: 0.3, 2: 0.45, 3: 0.25})
                texts = multi_texts(rng, scene, group[0], group[1], n_sent)
                raws = [style(rng, t, False) for t in texts]
                got.grefcoco.append(ids["grefcoco"].make(image_id, group[0], unc, raws))
        if u_pos < 2 or rng.random() < 0.45:
            n_sent = _draw_count(rng, {1: 0.4, 2: 0.45, 3: 0.15})
            raws = [style(rng, t, False) for t in absent_texts(rng, scene, n_sent)]
            got.grefcoco.append(ids["grefcoco"].make(image_id, [], unc, raws))
    umd, google = plan.umd[idx], plan.google[idx]
    if umd is not None and google is not None:
        n_refs = _draw_count(rng, {1: 0.35, 2: 0.45, 3: 0.2})
        for o in _choose_targets(rng, scene, _eligible(scene, None), n_refs):
            n_sent = _draw_count(rng, {1: 0.2, 2: 0.7, 3: 0.1})
            raws = [style(rng, t, True) for t in refcocog_texts(rng, scene, o, n_sent)]
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
            scene, next_ann = make_scene(rng, image_id, plan.unc[idx], idx < 2, next_ann)
            save_jpeg(render(rng, scene), images_dir / image_file_name(image_id))
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
