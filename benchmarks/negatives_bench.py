"""The negatives stage against the bare matrix product of the same shapes, in one run.

RefCOCO-sized by default: about 120k training queries x 17k pool images, d = 512, random
normalised vectors (3 sentences per image, as in RefCOCO). The baseline is the text-to-image
product t @ V^T computed block by block (never the whole matrix) with nothing else; the stage
adds the image-to-image scores, exact top-M selection with tie-breaking, and Parquet writing,
through the real engine (stub upstream stages provide the embeddings). Target: ratio <= 2.

    .venv/bin/python benchmarks/negatives_bench.py [--queries 120624] [--pool 16994] [--dim 512]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.executor import LocalExecutor  # noqa: E402
from pipeline.registry import Registry  # noqa: E402
from pipeline.runner import Pipeline, peak_rss_mb  # noqa: E402
from pipeline.stage import RunEnv, Stage  # noqa: E402
from stages.negatives import Negatives  # noqa: E402

SIZES: dict[str, int] = {}


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


class FakeIngest(Stage):
    name, version, tables = "ingest", "bench", ("refs", "sentences")

    def run(self, ctx):
        import pyarrow as pa

        n_img, n_q = SIZES["pool"], SIZES["queries"]
        ids = np.arange(n_img, dtype=np.int64) + 100_000
        ref_image = ids[np.arange(n_q) // max(1, n_q // n_img) % n_img]
        ctx.write_table("refs", pa.table({"ref_id": np.arange(n_q), "image_id": ref_image,
                                          "split": ["train"] * n_q}))
        ctx.write_table("sentences", pa.table({"sent_id": np.arange(n_q),
                                               "ref_id": np.arange(n_q)}))


class FakeImages(Stage):
    name, version, tables, inputs = "embed_images", "bench", ("embeddings",), ("ingest",)

    def run(self, ctx):
        import pyarrow as pa

        from stages.embed import embedding_array

        ids = np.arange(SIZES["pool"], dtype=np.int64) + 100_000
        vectors = unit_vectors(len(ids), SIZES["dim"], 1)
        ctx.write_table("embeddings", pa.table({"image_id": ids,
                                                "embedding": embedding_array(vectors)}))


class FakeTexts(Stage):
    name, version, tables, inputs = "embed_texts", "bench", ("embeddings",), ("ingest",)

    def run(self, ctx):
        import pyarrow as pa

        from stages.embed import embedding_array

        n = SIZES["queries"]
        ctx.write_table("embeddings", pa.table({
            "sent_id": np.arange(n), "ref_id": np.arange(n),
            "embedding": embedding_array(unit_vectors(n, SIZES["dim"], 2))}))


def bare_product(texts: np.ndarray, pool: np.ndarray, block: int) -> float:
    import torch

    p = torch.from_numpy(pool.astype(np.float32))
    t0 = time.perf_counter()
    for s in range(0, len(texts), block):
        torch.from_numpy(texts[s:s + block].astype(np.float32)) @ p.T
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=120_624)
    ap.add_argument("--pool", type=int, default=16_994)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--block", type=int, default=1024)
    args = ap.parse_args()
    SIZES.update(queries=args.queries, pool=args.pool, dim=args.dim)

    baseline = bare_product(unit_vectors(args.queries, args.dim, 2),
                            unit_vectors(args.pool, args.dim, 1), args.block)
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry([FakeIngest, FakeImages, FakeTexts, Negatives])
        cfg = load_config(reg, sets=[f"negatives.m={args.m}", f"negatives.block={args.block}"])
        pipe = Pipeline(reg, cfg, RunEnv(Path(tmp), "refcoco"), LocalExecutor(), progress=False)
        for name in ("ingest", "embed_images", "embed_texts"):
            pipe.run(name)
        t0 = time.perf_counter()
        pipe.run("negatives")
        stage = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in pipe.artifact_dir("negatives").rglob("*.parquet"))

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; {args.queries} queries x {args.pool} pool, d={args.dim}, "
          f"M={args.m}, block={args.block}")
    print(f"bare t @ V^T, blocked : {baseline:8.1f} s")
    print(f"negatives stage       : {stage:8.1f} s  (table {size / 2**30:.2f} GiB on disk)")
    print(f"ratio stage / bare    : {stage / baseline:8.2f}  (target <= 2)")
    print(f"peak memory           : {peak_rss_mb():8.0f} MiB")


if __name__ == "__main__":
    main()
