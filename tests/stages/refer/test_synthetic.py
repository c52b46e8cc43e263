"""The synthetic REFER data, checked by an independent reading of its files.

Nothing here uses the generator's helpers: files are read with pickle/json/PIL/pycocotools
only, and the colors a name stands for are spelled out below, so a wrong mask, a wrong format
or an expression that does not match its picture fails a test.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from stages.refer.synthetic import COCO_CATEGORIES, write_demo_data

# pycocotools 2.0.8 under numpy 2 warns on every decode; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# (refs file relative to refer/, instances dir, split names)
LAYOUTS = {
    "refcoco": ("refcoco/refs(unc).p", "refcoco", {"train", "val", "testA", "testB"}),
    "refcoco+": ("refcoco+/refs(unc).p", "refcoco+", {"train", "val", "testA", "testB"}),
    "refcocog-umd": ("refcocog/refs(umd).p", "refcocog", {"train", "val", "test"}),
    "refcocog-google": ("refcocog/refs(google).p", "refcocog", {"train", "val"}),
    "grefcoco": ("grefcoco/grefs(unc).json", "grefcoco", {"train", "val", "testA", "testB"}),
}
# What each color word should look like in the picture (RGB), for the pixel checks.
PALETTE = {
    "red": (200, 30, 35), "orange": (240, 130, 20), "yellow": (240, 210, 40),
    "green": (40, 150, 60), "blue": (35, 75, 200), "purple": (125, 45, 160),
    "pink": (240, 145, 185), "brown": (120, 72, 35), "black": (25, 25, 25),
    "white": (240, 240, 240), "gray": (128, 128, 128),
}
REAL_COCO = {1: ("person", "person"), 3: ("car", "vehicle"), 13: ("stop sign", "outdoor"),
             17: ("cat", "animal"), 18: ("dog", "animal"), 19: ("horse", "animal"),
             28: ("umbrella", "accessory"), 44: ("bottle", "kitchen"), 47: ("cup", "kitchen"),
             51: ("bowl", "kitchen"), 62: ("chair", "furniture"),
             64: ("potted plant", "furniture")}
BROKEN = ["missing_refs", "missing_instances", "bad_pickle", "bad_json", "dangling_ann",
          "dangling_image", "unknown_split", "images_missing_and_corrupt", "bad_geometry"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("synth") / "data", n_images=40, seed=0)


def load_refs(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with open(path, "rb") as f:
        return pickle.load(f)


def load_instances(path: Path) -> dict:
    return json.loads(path.read_text())


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def targets(ref: dict) -> list[int]:
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    return [a for a in ids if a != -1]


def tokens_of(ref: dict) -> list[list[str]]:
    return [s["tokens"] for s in ref["sentences"]]


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def check_dataset(root: Path, images_dir: Path, name: str) -> dict[str, set[int]]:
    """Every cross-reference of one dataset; returns the images of each split."""
    refs_file, inst_dir, split_names = LAYOUTS[name]
    refs = load_refs(root / refs_file)
    inst = load_instances(root / inst_dir / "instances.json")
    assert set(inst) >= {"info", "licenses", "images", "annotations", "categories"}
    images = {i["id"]: i for i in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    assert len(images) == len(inst["images"]) and len(anns) == len(inst["annotations"])
    assert isinstance(refs, list) and refs
    assert len({r["ref_id"] for r in refs}) == len(refs)
    sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert len(set(sent_ids)) == len(sent_ids)

    split_images: dict[str, set[int]] = defaultdict(set)
    for r in refs:
        assert r["image_id"] in images
        assert r["split"] in split_names
        split_images[r["split"]].add(r["image_id"])
        assert 1 <= len(r["sentences"]) <= 3
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
        for s in r["sentences"]:
            assert s["tokens"] == s["sent"].split() and s["tokens"]
            assert re.fullmatch(r"[a-z0-9 ]+", s["sent"])
            assert re.sub(r"[^a-z0-9]+", " ", s["raw"].lower()).split() == s["tokens"]
        for a in targets(r):
            assert a in anns and anns[a]["image_id"] == r["image_id"]
            # referred objects are polygons, the only kind REFER's getMask can read
            assert not anns[a]["iscrowd"] and isinstance(anns[a]["segmentation"], list)
        stem = f"COCO_train2014_{r['image_id']:012d}"
        if name == "grefcoco":
            assert r["file_name"] == stem + ".jpg"
        else:
            assert r["file_name"] == f"{stem}_{r['ann_id']}.jpg"
            assert r["category_id"] == anns[r["ann_id"]]["category_id"]

    # split by image, every split present with at least 2 images
    assert set(split_images) == split_names
    assert all(len(v) >= 2 for v in split_images.values())
    for a, b in ((a, b) for a in split_images for b in split_images if a < b):
        assert not split_images[a] & split_images[b]
    # instances hold exactly the referenced images and every annotation of them
    assert set(images) == {r["image_id"] for r in refs}
    assert {a["image_id"] for a in anns.values()} == set(images)
    assert {c["id"] for c in inst["categories"]} >= {a["category_id"] for a in anns.values()}
    for img in images.values():
        assert img["file_name"] == f"COCO_train2014_{img['id']:012d}.jpg"
        with Image.open(images_dir / img["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (img["width"], img["height"])
    return split_images


def test_layout_and_summary(data):
    out = data.out_dir
    assert data.images_dir == out / "images" / "train2014"
    assert data.refer_root == out / "refer" and data.broken_dir == out / "broken"
    for rel in ["refcoco/refs(unc).p", "refcoco/instances.json", "refcoco+/refs(unc).p",
                "refcoco+/instances.json", "refcocog/refs(umd).p", "refcocog/refs(google).p",
                "refcocog/instances.json", "grefcoco/grefs(unc).json",
                "grefcoco/instances.json"]:
        assert (data.refer_root / rel).is_file(), rel
    jpgs = sorted(data.images_dir.glob("*.jpg"))
    assert len(jpgs) == data.n_images == 40
    assert all(re.fullmatch(r"COCO_train2014_\d{12}\.jpg", p.name) for p in jpgs)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    for name, (refs_file, _, _) in LAYOUTS.items():
        refs = load_refs(data.refer_root / refs_file)
        assert data.datasets[name] == {
            "refs": len(refs), "sentences": sum(len(r["sentences"]) for r in refs),
            "images": len({r["image_id"] for r in refs})}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_refs_match_instances_and_images(data, name):
    check_dataset(data.refer_root, data.images_dir, name)


def test_images_are_varied_real_jpegs(data):
    sizes = set()
    for p in data.images_dir.glob("*.jpg"):
        with Image.open(p) as im:
            im.load()
            assert im.mode == "RGB"
            sizes.add(im.size)
    assert all(256 <= w <= 512 and 192 <= h <= 448 for w, h in sizes)
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert len(sizes) > 20


def test_categories_are_real_coco():
    assert len(COCO_CATEGORIES) >= 8
    for c in COCO_CATEGORIES:
        assert set(c) == {"id", "name", "supercategory"}
        if c["id"] in REAL_COCO:
            assert (c["name"], c["supercategory"]) == REAL_COCO[c["id"]]
    assert {1, 3, 17, 18, 19, 28, 44, 62} <= {c["id"] for c in COCO_CATEGORIES}


def test_ids_are_coco_like_and_shared(data):
    by_file = {d: load_instances(data.refer_root / d / "instances.json")
               for d in ("refcoco", "refcoco+", "refcocog", "grefcoco")}
    seen_imgs: dict[int, dict] = {}
    seen_anns: dict[int, dict] = {}
    for inst in by_file.values():
        for img in inst["images"]:
            assert 100_000 <= img["id"] <= 999_999
            assert seen_imgs.setdefault(img["id"], img) == img
        for a in inst["annotations"]:
            assert 1_000_000 <= a["id"] <= 9_999_999
            assert seen_anns.setdefault(a["id"], a) == a
    unc = {i["id"] for i in by_file["refcoco"]["images"]}
    g = {i["id"] for i in by_file["refcocog"]["images"]}
    assert unc & g and unc - g and g - unc  # overlapping, not identical image sets


def test_segmentation_kinds_boxes_and_areas(data):
    for d in ("refcoco", "refcoco+", "refcocog", "grefcoco"):
        inst = load_instances(data.refer_root / d / "instances.json")
        sizes = {i["id"]: (i["height"], i["width"]) for i in inst["images"]}
        kinds = Counter()
        multi_part = 0
        for a in inst["annotations"]:
            h, w = sizes[a["image_id"]]
            segm = a["segmentation"]
            assert all(isinstance(v, float) for v in a["bbox"]) and len(a["bbox"]) == 4
            if isinstance(segm, list):
                kinds["polygon"] += 1
                assert a["iscrowd"] == 0
                assert all(len(p) >= 6 and len(p) % 2 == 0 for p in segm)
                multi_part += len(segm) >= 2
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
            elif isinstance(segm["counts"], list):
                kinds["rle-list"] += 1
                assert a["iscrowd"] == 1 and segm["size"] == [h, w]
                assert sum(segm["counts"]) == h * w  # column-major runs cover the image
                assert sum(segm["counts"][1::2]) == a["area"]
                rle = mask_utils.frPyObjects(segm, h, w)
            else:
                kinds["rle-str"] += 1
                assert a["iscrowd"] == 0 and isinstance(segm["counts"], str)
                assert segm["size"] == [h, w]
                rle = {"size": segm["size"], "counts": segm["counts"].encode()}
            assert a["area"] == float(mask_utils.area(rle)) > 0
            assert a["bbox"] == pytest.approx(list(mask_utils.toBbox(rle)))
        assert kinds["polygon"] > kinds["rle-str"] >= 1 and kinds["rle-list"] >= 1, (d, kinds)
        assert multi_part > 0
        # some images hold 2-3 instances of one category
        per_image = Counter((a["image_id"], a["category_id"]) for a in inst["annotations"]
                            if not a["iscrowd"])
        assert any(n in (2, 3) for n in per_image.values())
        # and some annotations are not referred to
        refs = load_refs(data.refer_root / LAYOUTS["refcocog-umd" if d == "refcocog" else d][0])
        referred = {a for r in refs for a in targets(r)}
        assert {a["id"] for a in inst["annotations"]} - referred


@pytest.mark.parametrize("folder", ["refcoco", "refcoco+", "refcocog", "grefcoco"])
def test_pycocotools_reads_every_instances_file(data, folder):
    inst = load_instances(data.refer_root / folder / "instances.json")
    coco = load_coco(data.refer_root / folder / "instances.json")
    assert sorted(coco.getAnnIds(iscrowd=None)) == sorted(a["id"] for a in inst["annotations"])
    assert sorted(coco.getImgIds()) == sorted(i["id"] for i in inst["images"])
    for a in inst["annotations"]:
        m = coco.annToMask(a)
        img = coco.imgs[a["image_id"]]
        assert m.shape == (img["height"], img["width"])
        assert m.sum() == a["area"]
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def erode(m: np.ndarray, r: int) -> np.ndarray:
    p = np.pad(m, r)
    out = m.copy()
    h, w = m.shape
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out &= p[dy:dy + h, dx:dx + w]
    return out


def dilate(m: np.ndarray, r: int) -> np.ndarray:
    return ~erode(~m, r)


@pytest.mark.parametrize("name", ["refcoco", "refcocog-umd"])
def test_masks_are_the_drawn_objects(data, name):
    """annToMask of a referred object covers pixels of the color its expressions name."""
    refs_file, inst_dir, _ = LAYOUTS[name]
    coco = load_coco(data.refer_root / inst_dir / "instances.json")
    refs = load_refs(data.refer_root / refs_file)
    names = np.array(list(PALETTE))
    rgb = np.array(list(PALETTE.values()), dtype=float)
    checked = outside_differs = 0
    pixels: dict[int, np.ndarray] = {}
    for r in refs:
        img = coco.imgs[r["image_id"]]
        if r["image_id"] not in pixels:
            pixels[r["image_id"]] = np.asarray(
                Image.open(data.images_dir / img["file_name"]).convert("RGB"), dtype=float)
        pix = pixels[r["image_id"]]
        masks = {a: coco.annToMask(coco.anns[a]).astype(bool)
                 for a in coco.getAnnIds(imgIds=[r["image_id"]], iscrowd=None)}
        assert all(m.shape == (img["height"], img["width"]) for m in masks.values())
        own = masks[r["ann_id"]]
        others = np.zeros_like(own)
        for a, m in masks.items():
            if a != r["ann_id"]:
                others |= m
        inside = erode(own & ~others, 2)
        if inside.sum() < 40:
            continue  # small or mostly hidden behind another object
        mean = pix[inside].mean(axis=0)
        dist = np.linalg.norm(rgb - mean, axis=1)
        color = str(names[dist.argmin()])
        assert dist.min() < 40, (r, mean)
        words = {t for s in tokens_of(r) for t in s}
        assert color in words, (color, [s["raw"] for s in r["sentences"]])
        assert pix[inside].std(axis=0).max() < 20  # one flat color, not mask + background
        ring = dilate(own, 4) & ~dilate(own, 1) & ~dilate(others, 1)
        if ring.sum() >= 40:
            outside_differs += np.linalg.norm(pix[ring].mean(axis=0) - rgb[dist.argmin()]) > 40
        checked += 1
    assert checked >= 30
    assert outside_differs >= 0.7 * checked  # the mask is not larger than the drawn shape


def test_refcoco_expressions(data):
    refs = load_refs(data.refer_root / "refcoco/refs(unc).p")
    words = Counter(t for r in refs for s in tokens_of(r) for t in s)
    for w in ("left", "right", "second", "next", "top"):
        assert words[w] > 0, w
    assert any(s["raw"] != s["sent"] for r in refs for s in r["sentences"])
    assert any(s["raw"].endswith(" ") for r in refs for s in r["sentences"])
    assert any(re.search(r"[A-Z]", s["raw"]) for r in refs for s in r["sentences"])
    # UNC testA refers to people, testB to other objects (as in the real partition)
    assert {r["category_id"] for r in refs if r["split"] == "testA"} == {1}
    assert 1 not in {r["category_id"] for r in refs if r["split"] == "testB"}


def test_refcoco_plus_has_no_location_words(data):
    refs = load_refs(data.refer_root / "refcoco+/refs(unc).p")
    words = {t for r in refs for s in tokens_of(r) for t in s}
    assert not words & {"left", "right", "top", "bottom", "middle", "leftmost", "rightmost"}
    assert words & set(PALETTE)


def test_refcocog_sentences_are_longer_full_sentences(data):
    g = load_refs(data.refer_root / "refcocog/refs(umd).p")
    c = load_refs(data.refer_root / "refcoco/refs(unc).p")
    g_len = np.mean([len(s) for r in g for s in tokens_of(r)])
    c_len = np.mean([len(s) for r in c for s in tokens_of(r)])
    assert g_len > 2 * c_len and g_len > 7
    assert sum(s["raw"][:1].isupper() for r in g for s in r["sentences"]) > 0.5 * sum(
        len(r["sentences"]) for r in g)


def test_refcocog_partitions_share_refs(data):
    umd = load_refs(data.refer_root / "refcocog/refs(umd).p")
    google = load_refs(data.refer_root / "refcocog/refs(google).p")
    strip = [{k: v for k, v in r.items() if k != "split"} for r in umd]
    assert strip == [{k: v for k, v in r.items() if k != "split"} for r in google]


def test_unc_datasets_share_the_image_partition(data):
    splits = {}
    for name in ("refcoco", "refcoco+", "grefcoco"):
        refs = load_refs(data.refer_root / LAYOUTS[name][0])
        splits[name] = {r["image_id"]: r["split"] for r in refs}
    assert splits["refcoco"] == splits["refcoco+"] == splits["grefcoco"]


def test_statistics_like_refcoco(data):
    def ratio(name):
        d = data.datasets[name]
        return d["refs"] / d["images"], d["sentences"] / d["refs"]

    refs_per_image, sents_per_ref = ratio("refcoco")
    assert 2.0 <= refs_per_image <= 3.0 and 2.5 <= sents_per_ref <= 3.0
    refs_per_image, sents_per_ref = ratio("refcocog-umd")
    assert 1.4 <= refs_per_image <= 2.4 and 1.6 <= sents_per_ref <= 2.2


def test_grefcoco_target_kinds(data):
    refs = load_refs(data.refer_root / "grefcoco/grefs(unc).json")
    anns = {a["id"]: a for a in load_instances(
        data.refer_root / "grefcoco/instances.json")["annotations"]}
    kinds = Counter()
    for r in refs:
        if r["no_target"]:
            kinds["no-target"] += 1
            assert r["ann_id"] == [-1] and r["category_id"] == [-1]
            continue
        assert r["no_target"] is False
        ids = targets(r)
        cats = r["category_id"] if isinstance(r["category_id"], list) else [r["category_id"]]
        assert cats == [anns[a]["category_id"] for a in ids]
        if isinstance(r["ann_id"], int):
            kinds["scalar"] += 1
            assert isinstance(r["category_id"], int)
        elif len(ids) == 1:
            kinds["single"] += 1
        else:
            kinds["multi"] += 1
            assert len(ids) in (2, 3) and len(set(ids)) == len(ids)
            words = {t for s in tokens_of(r) for t in s}
            assert words & {"two", "three", "both", "all", "and"} or words & {
                "people", "cats", "dogs", "cars", "men", "women", "kids"}, r
    assert all(kinds[k] >= 3 for k in ("no-target", "scalar", "single", "multi")), kinds
    # no-target expressions name a colored thing (one the image does not show)
    for r in refs:
        if r["no_target"]:
            assert all(set(s) & set(PALETTE) for s in tokens_of(r)), r


def test_determinism_and_small_datasets(tmp_path):
    a = write_demo_data(tmp_path / "a", n_images=12, seed=5)
    b = write_demo_data(tmp_path / "b", n_images=12, seed=5)
    fa, fb = all_files(a.out_dir), all_files(b.out_dir)
    assert fa.keys() == fb.keys() and len(fa) > 30
    for k in fa:
        assert fa[k] == fb[k], k
    assert a.datasets == b.datasets
    for name in LAYOUTS:  # 12 images still give every split of every dataset 2+ images
        check_dataset(a.refer_root, a.images_dir, name)
    c = write_demo_data(tmp_path / "c", n_images=12, seed=6, with_broken=False)
    assert c.broken_dir is None and not (c.out_dir / "broken").exists()
    assert all_files(c.refer_root) != all_files(a.refer_root)


def test_existing_output_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_demo_data(out, n_images=12)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    s = write_demo_data(empty, n_images=12, with_broken=False)
    assert (s.refer_root / "refcoco" / "refs(unc).p").is_file()
    with pytest.raises(ValueError, match="at least 12"):
        write_demo_data(tmp_path / "small", n_images=11)


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    import stages.refer.synthetic.writer as synth

    calls = []

    def failing_save(pixels, path):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        Image.fromarray(pixels).save(path, "JPEG")

    monkeypatch.setattr(synth, "save_jpeg", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_demo_data(tmp_path / "out", n_images=12)
    assert list(tmp_path.iterdir()) == []


def test_broken_cases(data):
    broken = data.broken_dir
    readme = (broken / "README.txt").read_text()
    assert all(case in readme for case in BROKEN)
    assert sorted(p.name for p in broken.iterdir() if p.is_dir()) == sorted(BROKEN)

    def files(case):
        return broken / case / "refcoco" / "refs(unc).p", broken / case / "refcoco" / (
            "instances.json")

    refs_p, inst_p = files("missing_refs")
    assert not refs_p.exists() and load_instances(inst_p)["images"]
    refs_p, inst_p = files("missing_instances")
    assert load_refs(refs_p) and not inst_p.exists()
    refs_p, inst_p = files("bad_pickle")
    with pytest.raises(Exception), open(refs_p, "rb") as f:  # noqa: B017 - any failure
        pickle.load(f)
    assert load_instances(inst_p)["annotations"]
    refs_p, inst_p = files("bad_json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(inst_p.read_text())
    assert load_refs(refs_p)

    def problems(case):
        refs_p, inst_p = files(case)
        refs, inst = load_refs(refs_p), load_instances(inst_p)
        images = {i["id"] for i in inst["images"]}
        anns = {a["id"]: a for a in inst["annotations"]}
        return refs, {
            "image": [r for r in refs if r["image_id"] not in images],
            "ann": [r for r in refs if r["ann_id"] not in anns],
            "split": [r for r in refs if r["split"] not in {"train", "val", "testA", "testB"}],
        }

    for case, kind in (("dangling_ann", "ann"), ("dangling_image", "image"),
                       ("unknown_split", "split")):
        refs, found = problems(case)
        assert len(found[kind]) == 1, case
        assert all(not v for k, v in found.items() if k != kind), case
        if kind == "split":
            assert found["split"][0]["split"] == "training"
        if kind == "image":  # the reader must meet the missing image, not a missing ann
            assert found["image"][0]["ann_id"] in {
                a["id"] for a in load_instances(data.refer_root / "refcoco/instances.json")[
                    "annotations"]}

    # images_missing_and_corrupt: valid files, its own images folder with 1 absent, 1 corrupt
    case = broken / "images_missing_and_corrupt"
    refs, found = problems("images_missing_and_corrupt")
    assert not any(found.values())
    inst = load_instances(case / "refcoco" / "instances.json")
    own = case / "images" / "train2014"
    missing, corrupt, fine = [], [], []
    for img in inst["images"]:
        p = own / img["file_name"]
        if not p.exists():
            missing.append(img["id"])
            assert (data.images_dir / img["file_name"]).exists()
            continue
        try:
            with Image.open(p) as im:
                im.load()
                assert im.size == (img["width"], img["height"])
            fine.append(img["id"])
        except OSError:
            corrupt.append(img["id"])
    assert len(missing) == 1 and len(corrupt) == 1 and len(fine) >= 2
    assert {r["image_id"] for r in refs} == {i["id"] for i in inst["images"]}

    # bad_geometry: the good subset except four referenced and one unreferenced annotation
    refs, found = problems("bad_geometry")
    assert not any(found.values())
    good = {a["id"]: a for a in load_instances(case / "refcoco" / "instances.json")[
        "annotations"]}
    changed = {a["id"]: a for a in load_instances(broken / "bad_geometry" / "refcoco" /
                                                  "instances.json")["annotations"]
               if a != good[a["id"]]}
    assert set(changed) <= set(good) and len(changed) == 5
    referenced = {r["ann_id"] for r in refs}
    assert len(set(changed) & referenced) == 4

    def geometry_ok(a):
        polys = a["segmentation"] if isinstance(a["segmentation"], list) else None
        return (len(a["bbox"]) == 4 and a["bbox"][2] > 0 and a["bbox"][3] > 0
                and (polys is None or (polys and all(len(p) >= 6 and len(p) % 2 == 0
                                                     for p in polys))))

    assert all(geometry_ok(a) for a in good.values())
    assert not any(geometry_ok(a) for a in changed.values())
