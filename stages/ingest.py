"""ingest: REFER-format refs + instances + COCO images -> normalized Parquet tables.

Tables (keyed by ids): images, objects (every annotation of the referenced images, masks as
compressed COCO RLE equal to pycocotools' `annToMask`), refs, sentences, categories, errors.
Images and annotations are checked in parallel shards of `images_per_shard`; a killed run
resumes from the finished shards. A missing, unreadable or undecodable image and an annotation
with bad geometry (see `stages.refer.geometry`) are recorded in `errors` and the refs that use
them dropped; with `ingest.strict=true` either is fatal instead (a bad annotation no ref points
at is always only recorded: nothing is trained on it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.errors import InputError
from pipeline.filehash import FileHashCache
from pipeline.stage import (
    Count,
    NonNegInt,
    Params,
    RunEnv,
    ShardTask,
    ShardWriter,
    Stage,
    StageContext,
    runtime_field,
)
from stages.refer.files import Ref, ReferData, locate_inputs, read_refer
from stages.refer.geometry import annotation_mask
from stages.refer.manifests import DataManifest, load_data_manifest

log = logging.getLogger(__name__)

ERROR_EXAMPLES = 5


class IngestParams(Params):
    strict: bool = runtime_field(False, "missing, unreadable or undecodable images and "
                                 "referenced annotations with bad geometry are fatal")
    images_per_shard: Count = Field(1000, description="images checked per resumable shard")
    threads: NonNegInt = runtime_field(0, "image-check threads per shard (0: one per core)")


def data_locations(env: RunEnv, manifest: DataManifest) -> tuple[Path, Path]:
    """The REFER data root and the COCO images dir of a run, with errors that say how to fix."""
    data_root = env.locations.get("data_root")
    if data_root is None:
        raise InputError(
            f"no data root for {manifest.name}: pass --data-root DIR (the folder holding "
            f"{manifest.dir}/{manifest.refs_file}) or set NEMO_DATA_ROOT"
        )
    data_root = Path(data_root)
    images = env.locations.get("images")
    if images is None:
        candidates = [data_root / "images" / "train2014", data_root.parent / "images" / "train2014"]
        found = [c for c in candidates if c.is_dir()]
        if not found:
            raise InputError(
                f"no images dir for {manifest.name}: pass --images DIR (the COCO train2014 "
                f"folder) or set NEMO_IMAGES; looked in {', '.join(map(str, candidates))}"
            )
        images = found[0]
    images = Path(images)
    if not images.is_dir():
        raise InputError(f"--images {images}: not a directory (expected the COCO train2014 folder)")
    return data_root, images


def _hash_cache(env: RunEnv) -> FileHashCache:
    return FileHashCache.for_work_dir(env.work_dir)


def _parse(manifest: DataManifest, data_root: Path, digest_key: str) -> ReferData:
    """Parse once per process for a given content of the input files."""
    from pipeline.process_cache import process_cached

    return process_cached("ingest.refer", digest_key, lambda: read_refer(manifest, data_root),
                          max_entries=1)


class Ingest(Stage[IngestParams]):
    """Read a REFER-format dataset into Parquet tables (images, objects, refs, sentences, ...)."""

    name = "ingest"
    # 2: bad geometry and unreadable image paths are errors rows; 3: empty masks, masks
    # outside their bbox, far-off polygon coordinates and bad iscrowd too, blank sentences
    # left out (counted), a target listed twice kept once
    version = "3"
    tables = ("images", "objects", "refs", "sentences", "categories", "errors")
    libraries = ("pyarrow", "pycocotools", "pillow")

    def _inputs(self, env: RunEnv) -> tuple[DataManifest, Path, Path, str, list[tuple[int, str]]]:
        manifest = load_data_manifest(env.dataset)
        data_root, images_dir = data_locations(env, manifest)
        refs_path, inst_path = locate_inputs(manifest, data_root)
        cache = _hash_cache(env)
        try:
            d = cache.digests([refs_path, inst_path])
        except OSError as exc:
            raise InputError(f"{exc.filename or refs_path.parent}: cannot read it "
                             f"({exc.strerror or exc}); check that it is a readable file"
                             ) from None
        digest_key = f"{manifest.digest}:{d[refs_path.absolute()].digest}:" \
                     f"{d[inst_path.absolute()].digest}"
        memo = cache.get_memo(f"ingest-images:{digest_key}")
        if memo is None:
            data = _parse(manifest, data_root, digest_key)
            listing = [(i, str(img["file_name"])) for i, img in data.images.items()]
            cache.set_memo(f"ingest-images:{digest_key}", json.dumps(listing))
        else:
            listing = [(int(i), str(f)) for i, f in json.loads(memo)]
        return manifest, data_root, images_dir, digest_key, listing

    def fingerprint(self, env: RunEnv, params: IngestParams) -> dict[str, Any]:
        manifest, _, images_dir, digest_key, listing = self._inputs(env)
        digests = _image_digests(env, images_dir, listing)
        h = hashlib.sha256()
        for (image_id, _), dg in zip(listing, digests, strict=True):
            h.update(f"{image_id}:{dg[1] if isinstance(dg, tuple) else 'bad: ' + dg}\n"
                     .encode())
        return {"inputs": hashlib.sha256(digest_key.encode()).hexdigest()[:32],
                "images": h.hexdigest()[:32], "n_images": len(listing)}

    def run(self, ctx: StageContext[IngestParams]) -> None:
        import pyarrow as pa

        params = ctx.params
        manifest, data_root, images_dir, digest_key, listing = self._inputs(ctx.env)
        data = _parse(manifest, data_root, digest_key)
        inst_path = manifest.instances_path(data_root)
        categories = sorted(int(c["id"]) for c in data.categories)
        referenced = {a for r in data.refs for a in r.ann_ids}
        if params.strict:  # before any image is read: the files alone decide this
            bad_refd = _referenced_problems(data, set(categories))
            if bad_refd:
                raise InputError(
                    f"{inst_path}: {len(bad_refd)} annotation(s) that refs point at have bad "
                    "geometry; first: " + "; ".join(
                        f"annotation {a}: {why}" for a, why in bad_refd[:ERROR_EXAMPLES])
                    + " (ingest.strict=true; fix the annotations or set ingest.strict=false "
                    "to drop their refs)")
        digests = dict(zip((i for i, _ in listing),
                           _image_digests(ctx.env, images_dir, listing), strict=True))

        image_ids = sorted(data.images)
        tasks = []
        for n, start in enumerate(range(0, len(image_ids), params.images_per_shard)):
            chunk = image_ids[start:start + params.images_per_shard]
            anns = [a for i in chunk for a in data.anns_by_image.get(i, [])]
            tasks.append(ShardTask(n, {
                "images_dir": str(images_dir),
                "instances_path": str(inst_path),
                "threads": params.threads,
                "images": [_image_record(data.images[i], digests[i]) for i in chunk],
                "anns": anns,
                "referenced": sorted(int(a["id"]) for a in anns if int(a["id"]) in referenced),
                "category_ids": categories,
            }))
        shard_stats = ctx.run_shards(_ingest_shard, tasks, desc="check images")

        bad = sorted({i for s in shard_stats for i in s["bad_image_ids"]})
        examples = [e for s in shard_stats for e in s["error_examples"]][:ERROR_EXAMPLES]
        if bad:
            msg = (f"{len(bad)} of {len(image_ids)} images are missing, unreadable or "
                   f"undecodable in {images_dir}; first: " + "; ".join(examples))
            if params.strict:
                raise InputError(msg + " (ingest.strict=true; fix the images or set "
                                 "ingest.strict=false to skip them)")
            log.warning("%s. Their refs are dropped; see the errors table.", msg)
        bad_anns = {a: (refd, why) for s in shard_stats for a, refd, why in s["bad_anns"]}
        bad_refd = sorted(a for a, (refd, _) in bad_anns.items() if refd)
        if bad_anns:
            log.warning("%d annotation(s) in %s have bad geometry (%d that refs point at: their "
                        "refs are dropped); first: %s. See the errors table.", len(bad_anns),
                        inst_path, len(bad_refd), "; ".join(
                            f"annotation {a}: {bad_anns[a][1]}"
                            for a in sorted(bad_anns)[:ERROR_EXAMPLES]))

        refs, dropped = _keep_refs(data.refs, set(bad), set(bad_refd))
        dropped["sentences"].update(data.dropped_sentences)
        if data.dropped_sentences.get("blank"):
            log.warning("%d sentence(s) in %s are blank and were left out (counted in the "
                        "manifest's dropped_sentences_by_reason)", data.dropped_sentences["blank"],
                        manifest.refs_path(data_root))
        if data.repeated_targets:
            log.warning("%d ref(s) in %s list a target twice; each target is kept once",
                        data.repeated_targets, manifest.refs_path(data_root))
        ctx.write_table("refs", pa.table({
            "ref_id": pa.array([r.ref_id for r in refs], pa.int64()),
            "image_id": pa.array([r.image_id for r in refs], pa.int64()),
            "ann_ids": pa.array([r.ann_ids for r in refs], pa.list_(pa.int64())),
            "split": pa.array([r.split for r in refs], pa.string()),
            "category_id": pa.array([r.category_id for r in refs], pa.int32()),
        }).sort_by("ref_id"))
        sents = sorted(((s, r.ref_id) for r in refs for s in r.sentences),
                       key=lambda x: x[0].sent_id)
        ctx.write_table("sentences", pa.table({
            "sent_id": pa.array([s.sent_id for s, _ in sents], pa.int64()),
            "ref_id": pa.array([rid for _, rid in sents], pa.int64()),
            "sent": pa.array([s.sent for s, _ in sents], pa.string()),
            "raw": pa.array([s.raw for s, _ in sents], pa.string()),
            "tokens": pa.array([s.tokens for s, _ in sents], pa.list_(pa.string())),
        }))
        ctx.write_table("categories", pa.table({
            "category_id": pa.array([int(c["id"]) for c in data.categories], pa.int32()),
            "name": pa.array([str(c["name"]) for c in data.categories], pa.string()),
            "supercategory": pa.array([str(c.get("supercategory", "")) for c in data.categories],
                                      pa.string()),
        }))
        counts = _split_counts(refs)
        ctx.record(images=len(image_ids) - len(bad), bad_images=len(bad), refs=len(refs),
                   sentences=len(sents), dropped_refs=len(data.refs) - len(refs),
                   dropped_refs_by_reason=dict(sorted(dropped["refs"].items())),
                   dropped_sentences=sum(dropped["sentences"].values()),
                   dropped_sentences_by_reason=dict(sorted(dropped["sentences"].items())),
                   repeated_targets=data.repeated_targets,
                   bad_annotations=len(bad_anns), bad_referenced_annotations=len(bad_refd),
                   split_counts=counts, expected_mismatches=_compare_expected(manifest, counts))
        ctx.extra["data_manifest"] = manifest.source_path


def _referenced_problems(data: ReferData, category_ids: set[int]) -> list[tuple[int, str]]:
    """(ann id, why) of every annotation a ref points at whose geometry is bad, by id."""
    sizes = {i: (int(img["height"]), int(img["width"])) for i, img in data.images.items()}
    referenced = {a for r in data.refs for a in r.ann_ids}
    out = []
    for image_id, anns in data.anns_by_image.items():
        for a in anns:
            if int(a["id"]) in referenced:
                _, why = annotation_mask(a, *sizes[image_id], category_ids)
                if why is not None:
                    out.append((int(a["id"]), why))
    return sorted(out)


def _keep_refs(refs: list[Ref], bad_images: set[int],
               bad_anns: set[int]) -> tuple[list[Ref], dict[str, Counter[str]]]:
    """The refs whose image and targets are usable, and what was dropped per reason."""
    kept: list[Ref] = []
    dropped: dict[str, Counter[str]] = {"refs": Counter(), "sentences": Counter()}
    for r in refs:
        reason = ("bad_image" if r.image_id in bad_images
                  else "bad_annotation" if bad_anns.intersection(r.ann_ids) else None)
        if reason is None:
            kept.append(r)
        else:
            dropped["refs"][reason] += 1
            dropped["sentences"][reason] += len(r.sentences)
    return kept, dropped


# An image that cannot be used: (its bytes, its content hash), or why not.
ImageDigest = tuple[int, str] | str


def _image_digests(env: RunEnv, images_dir: Path,
                   listing: list[tuple[int, str]]) -> list[ImageDigest]:
    """Each image's (size, hash), or why it is unusable: a missing file, a directory, a
    symlink loop or a file that cannot be read are errors rows, not a traceback."""
    from tqdm.auto import tqdm

    paths = [images_dir / f for _, f in listing]
    problems = {p: _path_problem(p) for p in paths}
    files = [p for p in paths if problems[p] is None]
    cache = _hash_cache(env)
    with tqdm(total=len(files), desc="ingest: hash images", unit="img", disable=None) as bar:
        try:
            found = cache.digests(files, on_progress=bar.update)
        except OSError:  # some file cannot be read: find all such, then hash the rest once
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                for p, why in zip(files, pool.map(_unreadable, files), strict=True):
                    problems[p] = why
            files = [p for p in files if problems[p] is None]
            try:
                found = cache.digests(files)
            except OSError as exc:
                raise InputError(f"{exc.filename or images_dir}: cannot be read while hashing "
                                 f"the images ({exc.strerror or exc}); check the file and the "
                                 "disk") from None
    out: list[ImageDigest] = []
    for p in paths:
        d = found.get(p.absolute())
        problem = problems[p] or (None if d else "missing file")
        out.append(problem if problem else (d.size, d.digest))  # type: ignore[union-attr]
    return out


def _unreadable(path: Path) -> str | None:
    """Why reading a file fails (it is read whole, as hashing does), or None."""
    from pipeline import filehash

    try:
        filehash.hash_file(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return None


def _path_problem(path: Path) -> str | None:
    """Why an image path is not a readable regular file (None: fine, or simply absent)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing file"
    except OSError as exc:  # a symlink loop, a name too long, a directory we may not enter
        return f"unreadable: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return "not a file: a directory"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


def _image_record(img: dict[str, Any], digest: ImageDigest) -> dict[str, Any]:
    ok = isinstance(digest, tuple)
    return {"image_id": int(img["id"]), "file_name": str(img["file_name"]),
            "width": int(img["width"]), "height": int(img["height"]),
            "bytes": digest[0] if ok else -1, "content_hash": digest[1] if ok else None,
            "problem": None if ok else digest}


def _check_image(images_dir: Path, rec: dict[str, Any]) -> str | None:
    """Why an image is unusable, or None. A reduced-size JPEG decode catches truncation cheaply."""
    from PIL import Image

    if rec["problem"] is not None:
        return str(rec["problem"])
    try:
        with Image.open(images_dir / rec["file_name"]) as im:
            size = im.size
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"undecodable: {type(exc).__name__}: {exc}"
    if size != (rec["width"], rec["height"]):
        return (f"size {size[0]}x{size[1]} differs from instances.json "
                f"{rec['width']}x{rec['height']}")
    return None


def _ingest_shard(payload: dict[str, Any], writer: ShardWriter[IngestParams]) -> dict[str, Any]:
    import pyarrow as pa

    images_dir = Path(payload["images_dir"])
    records = payload["images"]
    threads = payload["threads"] or (os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        problems = list(pool.map(lambda r: _check_image(images_dir, r), records))
    good = [r for r, p in zip(records, problems, strict=True) if p is None]
    bad = [(r, p) for r, p in zip(records, problems, strict=True) if p is not None]
    good_ids = {r["image_id"]: r for r in good}

    writer.write_table("images", pa.table({
        "image_id": pa.array([r["image_id"] for r in good], pa.int64()),
        "file_name": pa.array([r["file_name"] for r in good], pa.string()),
        "width": pa.array([r["width"] for r in good], pa.int32()),
        "height": pa.array([r["height"] for r in good], pa.int32()),
        "bytes": pa.array([r["bytes"] for r in good], pa.int64()),
        "content_hash": pa.array([r["content_hash"] for r in good], pa.string()),
    }))
    category_ids = set(payload["category_ids"])
    referenced = set(payload["referenced"])
    anns, rles, bad_anns = [], [], []
    for a in sorted((a for a in payload["anns"] if int(a["image_id"]) in good_ids),
                    key=lambda a: int(a["id"])):
        img = good_ids[int(a["image_id"])]
        rle, why = annotation_mask(a, img["height"], img["width"], category_ids)
        if rle is not None:
            anns.append(a)
            rles.append(rle)
        else:
            bad_anns.append((int(a["id"]), int(a["id"]) in referenced, why))
    rle_type = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
    writer.write_table("objects", pa.table({
        "ann_id": pa.array([int(a["id"]) for a in anns], pa.int64()),
        "image_id": pa.array([int(a["image_id"]) for a in anns], pa.int64()),
        "category_id": pa.array([int(a["category_id"]) for a in anns], pa.int32()),
        "bbox": pa.array([[float(v) for v in a["bbox"]] for a in anns], pa.list_(pa.float64())),
        "area": pa.array([float(a.get("area", 0.0)) for a in anns], pa.float64()),
        "iscrowd": pa.array([bool(a.get("iscrowd", 0)) for a in anns], pa.bool_()),
        "rle": pa.array(rles, rle_type),
    }))
    ann_errors = [(a, f"annotation {a}: {why}; " + (
        "the refs that point at it are dropped" if refd
        else "no ref points at it; left out of objects")) for a, refd, why in bad_anns]
    writer.write_table("errors", pa.table({
        "stage": pa.array(["ingest"] * (len(bad) + len(ann_errors)), pa.string()),
        "item_id": pa.array([r["image_id"] for r, _ in bad] + [a for a, _ in ann_errors],
                            pa.int64()),
        "path": pa.array([str(images_dir / r["file_name"]) for r, _ in bad]
                         + [payload["instances_path"]] * len(ann_errors), pa.string()),
        "error": pa.array([p for _, p in bad] + [e for _, e in ann_errors], pa.string()),
    }))
    return {
        "bad_image_ids": [r["image_id"] for r, _ in bad],
        "error_examples": [f"{r['file_name']}: {p}" for r, p in bad[:ERROR_EXAMPLES]],
        "bad_anns": [list(b) for b in bad_anns],
    }


def _split_counts(refs: list[Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, Any]] = {}
    for r in refs:
        c = out.setdefault(r.split, {"refs": 0, "images": set(), "sentences": 0})
        c["refs"] += 1
        c["images"].add(r.image_id)
        c["sentences"] += len(r.sentences)
    return {s: {"refs": c["refs"], "images": len(c["images"]), "sentences": c["sentences"]}
            for s, c in sorted(out.items())}


def _compare_expected(manifest: DataManifest,
                      counts: dict[str, dict[str, int]]) -> list[str]:
    """Differences from the published statistics; warned about for a full-size dataset only.

    A toy or synthetic dataset differs by design, so warnings start once a dataset holds at
    least a tenth of the published refs.
    """
    expected_total = sum(c.refs for c in manifest.expected.values())
    found_total = sum(c["refs"] for c in counts.values())
    diffs = []
    for split, exp in manifest.expected.items():
        got = counts.get(split, {})
        for what in ("refs", "images", "sentences"):
            want = getattr(exp, what)
            if want is not None and got.get(what, 0) != want:
                diffs.append(f"{split}.{what}: {got.get(what, 0)} (published {want})")
    if diffs and expected_total and found_total >= expected_total / 10:
        log.warning("%s differs from the published statistics (%s): %s", manifest.name,
                    manifest.source_path, "; ".join(diffs))
    return diffs
