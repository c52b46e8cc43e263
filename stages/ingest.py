"""ingest: REFER-format refs + instances + COCO images -> normalized Parquet tables.

Tables (keyed by ids): images, objects (every annotation of the referenced images, masks as
compressed COCO RLE equal to pycocotools' `annToMask`), refs, sentences, categories, errors.
Images are checked in parallel shards of `images_per_shard`; a killed run resumes from the
finished shards. Missing or undecodable images are recorded in `errors` and their refs dropped
(or fatal with `ingest.strict=true`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.context import ShardTask, ShardWriter, StageContext
from pipeline.errors import InputError
from pipeline.filehash import FileHashCache
from pipeline.stage import Count, NonNegInt, Params, RunEnv, Stage, runtime_field
from stages.datasets import DataManifest, load_data_manifest
from stages.refer_io import ReferData, locate_inputs, read_refer

log = logging.getLogger(__name__)

ERROR_EXAMPLES = 5


class IngestParams(Params):
    strict: bool = runtime_field(False, "missing or undecodable images are fatal")
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
    return FileHashCache(env.work_dir / ".cache" / "file_hashes.sqlite")


_parsed: dict[str, ReferData] = {}


def _parse(manifest: DataManifest, data_root: Path, digest_key: str) -> ReferData:
    """Parse once per process for a given content of the input files."""
    if digest_key not in _parsed:
        _parsed.clear()
        _parsed[digest_key] = read_refer(manifest, data_root)
    return _parsed[digest_key]


class Ingest(Stage):
    """Read a REFER-format dataset into Parquet tables (images, objects, refs, sentences, ...)."""

    name = "ingest"
    version = "1"
    params_model = IngestParams
    tables = ("images", "objects", "refs", "sentences", "categories", "errors")
    libraries = ("pyarrow", "pycocotools", "pillow")

    def _inputs(self, env: RunEnv) -> tuple[DataManifest, Path, Path, str, list[tuple[int, str]]]:
        manifest = load_data_manifest(env.dataset)
        data_root, images_dir = data_locations(env, manifest)
        refs_path, inst_path = locate_inputs(manifest, data_root)
        cache = _hash_cache(env)
        d = cache.digests([refs_path, inst_path])
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

    def fingerprint(self, env: RunEnv, params: Params) -> dict[str, Any]:
        manifest, _, images_dir, digest_key, listing = self._inputs(env)
        digests = _image_digests(env, images_dir, listing)
        h = hashlib.sha256()
        for (image_id, _), dg in zip(listing, digests, strict=True):
            h.update(f"{image_id}:{dg[1] if dg else 'missing'}\n".encode())
        return {"inputs": hashlib.sha256(digest_key.encode()).hexdigest()[:32],
                "images": h.hexdigest()[:32], "n_images": len(listing)}

    def run(self, ctx: StageContext) -> None:
        import pyarrow as pa

        params: IngestParams = ctx.params  # type: ignore[assignment]
        manifest, data_root, images_dir, digest_key, listing = self._inputs(ctx.env)
        data = _parse(manifest, data_root, digest_key)
        digests = dict(zip((i for i, _ in listing),
                           _image_digests(ctx.env, images_dir, listing), strict=True))

        image_ids = sorted(data.images)
        tasks = []
        for n, start in enumerate(range(0, len(image_ids), params.images_per_shard)):
            chunk = image_ids[start:start + params.images_per_shard]
            tasks.append(ShardTask(n, {
                "images_dir": str(images_dir),
                "threads": params.threads,
                "images": [_image_record(data.images[i], digests[i]) for i in chunk],
                "anns": [a for i in chunk for a in data.anns_by_image.get(i, [])],
            }))
        shard_stats = ctx.run_shards(_ingest_shard, tasks, desc="check images")

        bad = sorted({i for s in shard_stats for i in s["bad_image_ids"]})
        examples = [e for s in shard_stats for e in s["error_examples"]][:ERROR_EXAMPLES]
        if bad:
            msg = (f"{len(bad)} of {len(image_ids)} images are missing or undecodable in "
                   f"{images_dir}; first: " + "; ".join(examples))
            if params.strict:
                raise InputError(msg + " (ingest.strict=true; fix the images or set "
                                 "ingest.strict=false to skip them)")
            log.warning("%s. Their refs are dropped; see the errors table.", msg)

        bad_set = set(bad)
        refs = [r for r in data.refs if r.image_id not in bad_set]
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
                   split_counts=counts, expected_mismatches=_compare_expected(manifest, counts))
        ctx.extra["data_manifest"] = manifest.source_path


def _image_digests(env: RunEnv, images_dir: Path,
                   listing: list[tuple[int, str]]) -> list[tuple[int, str] | None]:
    from tqdm.auto import tqdm

    paths = [images_dir / f for _, f in listing]
    with tqdm(total=len(paths), desc="ingest: hash images", unit="img", disable=None) as bar:
        found = _hash_cache(env).digests(paths, on_progress=bar.update)
    out = []
    for p in paths:
        d = found[p.absolute()]
        out.append((d.size, d.digest) if d else None)
    return out


def _image_record(img: dict[str, Any], digest: tuple[int, str] | None) -> dict[str, Any]:
    return {"image_id": int(img["id"]), "file_name": str(img["file_name"]),
            "width": int(img["width"]), "height": int(img["height"]),
            "bytes": digest[0] if digest else -1, "content_hash": digest[1] if digest else None}


def _check_image(images_dir: Path, rec: dict[str, Any]) -> str | None:
    """Why an image is unusable, or None. A reduced-size JPEG decode catches truncation cheaply."""
    from PIL import Image

    if rec["content_hash"] is None:
        return "missing file"
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


def annotation_rle(ann: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """Compressed RLE of an annotation, as pycocotools' COCO.annToRLE builds it."""
    from pycocotools import mask as mask_utils

    segm = ann["segmentation"]
    if isinstance(segm, list):
        if not segm:
            import numpy as np

            rle = mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
        rle = segm
    else:
        raise InputError(f"annotation {ann['id']}: segmentation is neither polygons nor RLE")
    size = [int(v) for v in rle["size"]]
    if size != [height, width]:
        raise InputError(f"annotation {ann['id']}: its RLE size {size} differs from its image "
                         f"{height}x{width} in instances.json")
    counts = rle["counts"]
    return {"size": size, "counts": counts.decode() if isinstance(counts, bytes) else counts}


def _ingest_shard(payload: dict[str, Any], writer: ShardWriter) -> dict[str, Any]:
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
    anns = sorted((a for a in payload["anns"] if int(a["image_id"]) in good_ids),
                  key=lambda a: int(a["id"]))
    rles = []
    for a in anns:
        img = good_ids[int(a["image_id"])]
        rles.append(annotation_rle(a, img["height"], img["width"]))
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
    writer.write_table("errors", pa.table({
        "stage": pa.array(["ingest"] * len(bad), pa.string()),
        "item_id": pa.array([r["image_id"] for r, _ in bad], pa.int64()),
        "path": pa.array([str(images_dir / r["file_name"]) for r, _ in bad], pa.string()),
        "error": pa.array([p for _, p in bad], pa.string()),
    }))
    return {
        "bad_image_ids": [r["image_id"] for r, _ in bad],
        "error_examples": [f"{r['file_name']}: {p}" for r, p in bad[:ERROR_EXAMPLES]],
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
