"""Image embedding throughput against its decode ceiling, measured in the same run.

On N synthetic COCO-sized JPEGs (640x480) it times:
  ceiling  decode + open_clip preprocess alone, in the same thread pool the stage uses;
  full     the embed_images shard work (decode, preprocess, tiny CLIP forward, Parquet write);
  fast     the ceiling with `embed.fast_decode` (PIL draft), and its effect on the embeddings.
and prints images/s and the ratio full / ceiling (target >= 0.8 on CPU: the model keeps up with
decoding, so the stage is decode-bound).

    .venv/bin/python benchmarks/embed_bench.py [--n 512] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stage import ShardWriter  # noqa: E402
from stages.embed import (  # noqa: E402
    EmbedParams,
    _embed_images_shard,
    decoded_batches,
    embeddings_matrix,
    get_bundle,
    load_pixels,
)


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, size=(480 // 8, 640 // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((640, 480), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(5):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            color = tuple(int(v) for v in rng.integers(0, 255, 3))
            draw.ellipse([x, y, x + 80, y + 80], fill=color)
        path = folder / f"COCO_train2014_{i:012d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def ceiling(paths: list[Path], params: EmbedParams, batch: int) -> float:
    bundle = get_bundle(params.model, params.pretrained, params.device)
    timing = {"read_s": 0.0}
    threads = params.workers or (os.cpu_count() or 1)
    t0 = time.perf_counter()
    count = 0

    def decode(p: Path):
        return load_pixels(str(p), bundle.preprocess, params.fast_decode, bundle.image_size)

    for b in decoded_batches(paths, decode, batch, threads, timing):
        count += len(b)
    return count / (time.perf_counter() - t0)


def full(paths: list[Path], params: EmbedParams, batch: int, out: Path) -> tuple[float, dict]:
    payload = {"items": [(i, str(p)) for i, p in enumerate(paths)], "batch": batch}
    t0 = time.perf_counter()
    stats = _embed_images_shard(payload, ShardWriter(out, 0, "1", params))
    return len(paths) / (time.perf_counter() - t0), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.n)
        params = EmbedParams(model="tiny", pretrained=None)
        get_bundle(params.model, params.pretrained, params.device)  # load outside the timings
        ceiling(paths[: args.batch], params, args.batch)  # warm-up
        exact_ceiling = ceiling(paths, params, args.batch)
        rate, stats = full(paths, params, args.batch, Path(tmp) / "exact")
        fast_params = params.model_copy(update={"fast_decode": True})
        fast_ceiling = ceiling(paths, fast_params, args.batch)
        full(paths, fast_params, args.batch, Path(tmp) / "fast")
        a = embeddings_matrix(pq.read_table(Path(tmp) / "exact" / "embeddings").column("embedding"))
        b = embeddings_matrix(pq.read_table(Path(tmp) / "fast" / "embeddings").column("embedding"))
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; {args.n} JPEGs 640x480, tiny CLIP, batch {args.batch}")
    print(f"decode+preprocess ceiling : {exact_ceiling:8.1f} img/s")
    print(f"full embed (shard work)   : {rate:8.1f} img/s  "
          f"(read {stats['read_s']:.2f}s, infer {stats['infer_s']:.2f}s, "
          f"write {stats['write_s']:.2f}s)")
    print(f"ratio full / ceiling      : {rate / exact_ceiling:8.2f}  (target >= 0.8)")
    print(f"fast_decode ceiling       : {fast_ceiling:8.1f} img/s  "
          f"({fast_ceiling / exact_ceiling:.2f}x the exact decode)")
    print(f"fast_decode vs exact embeddings: mean cosine {cos.mean():.4f}, min {cos.min():.4f}")


if __name__ == "__main__":
    main()
