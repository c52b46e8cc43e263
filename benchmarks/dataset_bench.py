"""NemoDataset throughput: mosaic samples (gamma=1) against single-image samples (gamma=0).

Builds a small shards fixture (64 synthetic 640x480 JPEGs, 8 sentences each, 12 mosaic
candidates per sentence, mask RLEs from pycocotools) unless ``--shards``/``--images`` point at a
real artifact, then times full passes of a DataLoader with 2 workers (persistent, after a
warm-up pass, so worker start-up and the first page-cache misses are not counted) and, for a
noise-free per-sample cost, the same in one process. Samples go through a to-tensor transform,
as in training. Target: a mosaic sample costs <= 2x a single-image sample. A single sample
decodes its image at full size; a mosaic fills its four cells from the artifact's thumbnails
(longest side 320, as the shards stage writes them), or, for comparison, from the originals
decoded at reduced size via JPEG draft.

    .venv/bin/python benchmarks/dataset_bench.py [--shards DIR --images DIR] [--split train]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.dataset import NemoDataset, collate_fn  # noqa: E402

N_IMAGES, SENTS_PER_IMAGE, N_CANDIDATES = 64, 8, 12
SIZE = (640, 480)


def build_fixture(root: Path, n_images: int = N_IMAGES, seed: int = 0) -> tuple[Path, Path]:
    """A shards artifact (schema version 1) over synthetic JPEGs; returns (shards, images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    images_dir, shards = root / "images", root / "shards"
    images_dir.mkdir(parents=True)
    w, h = SIZE
    yy, xx = np.mgrid[:h, :w]
    for i in range(n_images):
        base = np.stack([(xx * 255 // w), (yy * 255 // h), np.full((h, w), 9 * i % 256)], -1)
        noise = rng.integers(-25, 25, size=(h, w, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(images_dir / f"{i:06d}.jpg", quality=90)

    rows = []
    for i in range(n_images):
        others = [j for j in range(n_images) if j != i]
        k = min(N_CANDIDATES, len(others))
        for s in range(SENTS_PER_IMAGE):
            m = np.zeros((h, w), np.uint8)
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            m[y0:y0 + h // 3, x0:x0 + w // 4] = 1
            rle = mask_utils.encode(np.asfortranarray(m))
            sid = i * SENTS_PER_IMAGE + s
            rows.append({
                "sent_id": sid, "ref_id": sid // 2, "image_id": i, "split": "train",
                "sent": f"the object {sid}", "category_id": 1, "ann_ids": [sid],
                "no_target": False,
                "mask_rle": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "neg_image_ids": [int(v) for v in rng.choice(others, k, replace=False)],
                "k_shortfall": 0, "positional_words": [], "allowed_quadrants": [0, 1, 2, 3],
                "hn_texts": ["a hard negative", "another one"], "hn_kinds": ["same_image"] * 2,
                "hn_scores": [0.5, float("nan")],
            })
    split_schema = pa.schema([
        ("sent_id", pa.int64()), ("ref_id", pa.int64()), ("image_id", pa.int64()),
        ("split", pa.string()), ("sent", pa.string()), ("category_id", pa.int32()),
        ("ann_ids", pa.list_(pa.int64())), ("no_target", pa.bool_()),
        ("mask_rle", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
        ("neg_image_ids", pa.list_(pa.int64())), ("k_shortfall", pa.int32()),
        ("positional_words", pa.list_(pa.string())), ("allowed_quadrants", pa.list_(pa.int8())),
        ("hn_texts", pa.list_(pa.string())), ("hn_kinds", pa.list_(pa.string())),
        ("hn_scores", pa.list_(pa.float32())),
    ], metadata={b"nemo_pipe.schema_version": b"1"})
    (shards / "train").mkdir(parents=True)
    (shards / "images").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=split_schema),
                   shards / "train" / "part-00000.parquet", row_group_size=256,
                   compression="zstd")
    images = pa.table({
        "image_id": pa.array(range(n_images), pa.int64()),
        "file_name": [f"{i:06d}.jpg" for i in range(n_images)],
        "width": pa.array([w] * n_images, pa.int32()),
        "height": pa.array([h] * n_images, pa.int32()),
    }).replace_schema_metadata({b"nemo_pipe.schema_version": b"1"})
    pq.write_table(images, shards / "images" / "part-00000.parquet", compression="zstd")
    # thumbnails as the shards stage makes them (longest side 320, JPEG quality 90)
    from stages.thumbnails import write_pack

    index, _ = write_pack(shards, "part-00000", [(i, str(images_dir / f"{i:06d}.jpg"))
                                                 for i in range(n_images)], 320, 90)
    (shards / "thumbnails").mkdir()
    pq.write_table(index.replace_schema_metadata({b"nemo_pipe.schema_version": b"1"}),
                   shards / "thumbnails" / "part-00000.parquet")
    from pipeline.io import describe_file

    # the manifest lists every file, as the engine's does: the reader refuses an artifact whose
    # files it cannot check
    files = {f.relative_to(shards).as_posix(): describe_file(f)
             for f in sorted(shards.rglob("*")) if f.is_file()}
    (shards / "_manifest.json").write_text(json.dumps({"stage": "shards", "schema_version": "1",
                                                       "files": files}))
    (shards / "_SUCCESS").write_text("")
    return shards, images_dir


def to_tensors(image, mask):
    """What a training transform ends with; tensors also cross the worker queue cheaply."""
    import torch

    return (torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),
            torch.from_numpy(np.asarray(mask).copy()))


def in_process_pass(ds: NemoDataset, samples: int, epoch: int) -> float:
    """Samples/s of one in-process pass over the first `samples` items (no IPC at all)."""
    ds.set_epoch(epoch)
    n = min(len(ds), samples)
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - t0)


def make_loader(ds: NemoDataset, workers: int, batch_size: int):
    import torch

    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_fn,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def loader_pass(loader, epoch: int) -> float:
    """Samples/s of one full DataLoader pass (persistent workers: no start-up cost)."""
    loader.dataset.set_epoch(epoch)
    t0 = time.perf_counter()
    n = sum(len(batch["sentence"]) for batch in loader)
    return n / (time.perf_counter() - t0)


def per_op_ms(ds: NemoDataset, reps: int = 30) -> dict[str, float]:
    """Costs of the operations a sample is made of, on the split's first image: the floor of
    the mosaic/single ratio under the decode rules (positive at full size, negatives drafted)."""
    from PIL import Image

    from pipeline.dataset import cell_boxes, decode_rle

    row = ds.row(0)
    path = ds.image_path(row["image_id"])
    with Image.open(path) as im:
        w, h = im.size
    cw, ch = cell_boxes(w, h)[3][2:]

    def decode(draft: tuple[int, int] | None) -> Image.Image:
        with open(path, "rb") as f:
            im = Image.open(f)
            if draft:
                im.draft("RGB", draft)
            im.load()
        return im

    full = decode(None)

    def clock(fn) -> float:  # best of reps: the machine may be shared
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    return {
        "jpeg_bytes_kb": path.stat().st_size / 1024,
        "full_decode": clock(lambda: decode(None)),
        "draft_decode_to_cell": clock(lambda: decode((cw, ch))),
        "bilinear_resize_to_cell": clock(
            lambda: full.resize((cw, ch), Image.Resampling.BILINEAR)),
        "rle_decode": clock(lambda: decode_rle(row["mask_rle"])),
    }


def thumbnail_decode_ms(shards: Path, reps: int = 30) -> float:
    """Best-of time to decode the first thumbnail of the artifact (to a 320x240 cell)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    row = pq.read_table(shards / "thumbnails").slice(0, 1).to_pylist()[0]
    with open(shards / "thumbnail_packs" / row["pack"], "rb") as f:
        f.seek(row["offset"])
        data = f.read(row["length"])
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (320, 240))
        im.load()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, help="existing shards artifact (else build a fixture)")
    ap.add_argument("--images", type=Path, help="images dir of --shards")
    ap.add_argument("--split", default="train")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed passes per mode, interleaved; the best one is reported")
    ap.add_argument("--in-process-samples", type=int, default=128)
    args = ap.parse_args()
    if (args.shards is None) != (args.images is None):
        ap.error("--shards and --images go together")

    with tempfile.TemporaryDirectory(prefix="nemo-dataset-bench-") as tmp:
        if args.shards is None:
            t0 = time.perf_counter()
            shards, images = build_fixture(Path(tmp))
            print(f"fixture: {N_IMAGES} JPEGs {SIZE[0]}x{SIZE[1]}, "
                  f"{N_IMAGES * SENTS_PER_IMAGE} sentences, built in "
                  f"{time.perf_counter() - t0:.1f} s")
        else:
            shards, images = args.shards, args.images
        # modes: single images, mosaics from thumbnails (when the artifact has them, as the
        # shards stage makes by default) and mosaics from the originals (decoded with draft)
        modes = {"single": (0.0, None), "mosaic": (1.0, None), "mosaic, originals": (1.0, False)}
        datasets = {g: NemoDataset(shards, args.split, images, gamma=gamma, n_hard_negatives=2,
                                   transform=to_tensors, thumbnails=thumbs)
                    for g, (gamma, thumbs) in modes.items()}
        loaders = {g: make_loader(ds, args.workers, args.batch_size) for g, ds in datasets.items()}
        for g, ds in datasets.items():  # warm-up: worker start-up, imports, page cache
            in_process_pass(ds, 32, 0)
            loader_pass(loaders[g], 0)
        one = dict.fromkeys(datasets, 0.0)
        many = dict.fromkeys(datasets, 0.0)
        for r in range(args.repeats):  # interleaved, best of: load from others hits both modes
            for g, ds in datasets.items():
                one[g] = max(one[g], in_process_pass(ds, args.in_process_samples, r + 1))
                many[g] = max(many[g], loader_pass(loaders[g], r + 1))
        for g, ds in datasets.items():
            print(f"{g:18s} (gamma={ds.gamma:.0f}, thumbnails={ds.uses_thumbnails!s:5}): "
                  f"{one[g]:7.1f} samples/s in-process   {many[g]:7.1f} samples/s with "
                  f"{args.workers} DataLoader workers (batch {args.batch_size}, {len(ds)} "
                  f"samples, best of {args.repeats} passes)")
        for g in ("mosaic", "mosaic, originals"):
            print(f"{g}/single cost ratio: {one['single'] / one[g]:.2f} in-process, "
                  f"{many['single'] / many[g]:.2f} with {args.workers} workers"
                  + (" (target <= 2)" if g == "mosaic" else ""))
        del loaders  # shut the persistent workers down before the per-op timings
        ops = per_op_ms(NemoDataset(shards, args.split, images, gamma=0.0))
        ops["thumbnail_decode_to_cell"] = thumbnail_decode_ms(shards)
        single_ms = ops["full_decode"] + ops["rle_decode"]
        floor = (single_ms + ops["bilinear_resize_to_cell"]
                 + 3 * ops["draft_decode_to_cell"]) / single_ms
        print("per-op ms (first image, {jpeg_bytes_kb:.0f} KB JPEG): full decode {full_decode:.2f},"
              " draft decode to cell {draft_decode_to_cell:.2f}, bilinear resize to cell "
              "{bilinear_resize_to_cell:.2f}, RLE decode {rle_decode:.2f}, thumbnail decode "
              "{thumbnail_decode_to_cell:.2f}".format(**ops))
        print("originals-path floor: (full + RLE + resize + 3 x draft) / (full + RLE) = "
              f"{floor:.2f}")
        print(f"machine: {platform.machine()}, cpu_count={os.cpu_count()}, "
              f"python {platform.python_version()}")


if __name__ == "__main__":
    main()
