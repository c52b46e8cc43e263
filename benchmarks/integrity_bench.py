"""What verifying upstream bytes costs: mosaic_tables over RefCOCO-shaped negatives, and shards.

Every stage hashes each upstream file it reads (sha256, against the upstream manifest) and parses
it from the same in-memory buffer (the hash on a second thread, beside the parsing; the table is
used only once the hash matched). This runs the real `mosaic_tables` and `shards`
stages through the engine, each with verification on and off (the private switch
NEMO_PIPE_BENCH_NO_VERIFY=1 skips only the hash: the bytes are still read into memory), on
synthetic upstream tables of RefCOCO's shape: ~120k training queries with M = 2048 candidates
(int32 ids, float32 rho_ti/rho_ii, written with the negatives stage's own Parquet format), and
for shards the ingest tables and a K = 800 mosaic table. It also prints sha256's throughput over
the bytes each stage reads. Target: verification adds <= 5% to each stage.

    .venv/bin/python benchmarks/integrity_bench.py [--queries 120624] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
from pipeline.runner import Pipeline  # noqa: E402
from pipeline.stage import RunEnv, Stage  # noqa: E402
from pipeline.upstream import NO_VERIFY_ENV  # noqa: E402
from stages.mosaic_tables import MosaicTables  # noqa: E402
from stages.negatives import NEGATIVES_FORMAT, NegativesParams, negatives_schema  # noqa: E402
from stages.shards import Shards  # noqa: E402

SIZES: dict[str, int] = {}
SENTS_PER_REF, REFS_PER_IMAGE = 3, 3
WORDS = ["left", "man", "red", "shirt", "the", "on", "right", "woman", "cup", "table"]


def _ids() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = SIZES["queries"]
    sent = np.arange(q, dtype=np.int64)
    ref = sent // SENTS_PER_REF
    image = 100_000 + ref // REFS_PER_IMAGE
    return sent, ref, image


class FakeIngest(Stage):
    name, version = "ingest", "bench"
    tables = ("refs", "sentences", "objects", "images")

    def run(self, ctx):
        import pyarrow as pa

        rng = np.random.default_rng(0)
        sent, ref, image = _ids()
        refs = np.unique(ref)
        images = np.unique(image)
        split = np.where(refs % 10 == 9, "val", "train")
        ctx.write_table("refs", pa.table({
            "ref_id": refs, "image_id": 100_000 + refs // REFS_PER_IMAGE, "split": split,
            "category_id": pa.array(rng.integers(1, 80, len(refs)), pa.int32()),
            "ann_ids": pa.array([[int(r)] for r in refs], pa.list_(pa.int64()))}))
        words = rng.integers(0, len(WORDS), (len(sent), 5))
        tokens = [[WORDS[w] for w in row] for row in words]
        ctx.write_table("sentences", pa.table({
            "sent_id": sent, "ref_id": ref, "sent": [" ".join(t) for t in tokens],
            "raw": [" ".join(t).capitalize() + "." for t in tokens],
            "tokens": pa.array(tokens, pa.list_(pa.string()))}))
        rle = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
        ctx.write_table("objects", pa.table({
            "ann_id": refs, "rle": pa.array(
                [{"size": [480, 640], "counts": "PX`0" + "2N1O" * 40} for _ in refs], rle)}))
        ctx.write_table("images", pa.table({
            "image_id": images, "file_name": [f"COCO_train2014_{i:012d}.jpg" for i in images],
            "width": pa.array(np.full(len(images), 640), pa.int32()),
            "height": pa.array(np.full(len(images), 480), pa.int32())}))


class FakeNegatives(Stage):
    """RefCOCO-shaped negatives parts, in the negatives stage's schema and Parquet format."""

    name, version, inputs = "negatives", "bench", ("ingest",)
    tables, params_model = ("negatives",), NegativesParams

    def run(self, ctx):
        import pyarrow as pa

        from pipeline.io import part_name, write_parquet

        p = ctx.params
        sent, ref, image = _ids()
        train = (ref % 10) != 9
        sent, ref, image = sent[train], ref[train], image[train]
        schema = negatives_schema(pa.float32())
        rng = np.random.default_rng(1)
        for n, s in enumerate(range(0, len(sent), p.queries_per_shard)):
            rows = slice(s, s + p.queries_per_shard)
            q, m = len(sent[rows]), p.m
            offsets = pa.array(np.arange(q + 1, dtype=np.int32) * m)
            ids = rng.integers(100_000, 100_000 + SIZES["pool"], q * m).astype(np.int32)
            ti = -np.sort(-rng.random((q, m), dtype=np.float32), axis=1).reshape(-1) * 0.4
            ii = rng.random(q * m, dtype=np.float32) * 0.9
            table = pa.table({
                "sent_id": sent[rows], "ref_id": ref[rows], "image_id": image[rows],
                "cand_image_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
                "rho_ti": pa.ListArray.from_arrays(offsets, pa.array(ti)),
                "rho_ii": pa.ListArray.from_arrays(offsets, pa.array(ii)),
                **{k: pa.array(np.full(q, v, np.float32)) for k, v in
                   (("ti_min", 0.0), ("ti_max", 0.4), ("ii_min", 0.0), ("ii_max", 0.9))}},
                schema=schema)
            write_parquet(table, ctx.tmp_dir / "negatives" / part_name(n), self.version,
                          NEGATIVES_FORMAT)


class FakeImages(Stage):
    """Image embeddings of the pool: mosaic_tables reads the training pool's ids from them
    (and, for k=all only, the vectors)."""

    name, version, tables, inputs = "embed_images", "bench", ("embeddings",), ("ingest",)

    def run(self, ctx):
        import pyarrow as pa

        from stages.embed import embedding_array

        ids = 100_000 + np.arange(SIZES["pool"], dtype=np.int64)
        vectors = np.random.default_rng(2).standard_normal((len(ids), 16)).astype(np.float16)
        ctx.write_table("embeddings", pa.table({"image_id": ids,
                                                "embedding": embedding_array(vectors)}))


def read_bytes_of(pipe: Pipeline, stage: str) -> int:
    """Bytes of the upstream files `stage` reads (every table of every input)."""
    total = 0
    for up in pipe.resolve(stage).upstream:
        m = json.loads((pipe.artifact_dir(up) / "_manifest.json").read_text())
        total += sum(f["bytes"] for f in m["files"].values())
    return total


def read_overhead(pipe: Pipeline, stage: str, repeats: int = 3) -> float:
    """Seconds that verification adds to reading every upstream file `stage` reads: verified
    reads minus the same reads unhashed (wall time: the hash of a Parquet file runs beside its
    parsing) (median of interleaved runs; less exposed to a busy
    machine's noise than whole-stage timings)."""
    import statistics

    from pipeline.upstream import manifest_files, upstream_file

    files = []
    for up in pipe.resolve(stage).upstream:
        d = pipe.artifact_dir(up)
        listed = manifest_files(json.loads((d / "_manifest.json").read_text()), d)
        files += [upstream_file(d, up, d.name, listed, rel) for rel in listed]
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for verify in (False, True):
            os.environ.pop(NO_VERIFY_ENV, None) if verify else os.environ.update(
                {NO_VERIFY_ENV: "1"})
            t0 = time.perf_counter()
            for f in files:  # as stages read them: Parquet parsed (hashed meanwhile), or bytes
                f.read_table() if f.rel.endswith(".parquet") else f.read_bytes()
            times[verify].append(time.perf_counter() - t0)
    os.environ.pop(NO_VERIFY_ENV, None)
    return statistics.median(times[True]) - statistics.median(times[False])


def sha256_rate() -> float:
    data = os.urandom(256 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return len(data) / (time.perf_counter() - t0)


def timed(pipe: Pipeline, stage: str, verify: bool) -> float:
    if verify:
        os.environ.pop(NO_VERIFY_ENV, None)
    else:
        os.environ[NO_VERIFY_ENV] = "1"
    try:
        t0 = time.perf_counter()
        pipe.run(stage, force=True)
        return time.perf_counter() - t0
    finally:
        os.environ.pop(NO_VERIFY_ENV, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=120_624, help="sentences (RefCOCO: ~142k, "
                                                                 "120k of them train)")
    ap.add_argument("--pool", type=int, default=16_994)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--k", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting (minimum kept)")
    args = ap.parse_args()
    SIZES.update(queries=args.queries, pool=args.pool)
    rate = sha256_rate()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; {args.queries} sentences, M={args.m}, K={args.k}; "
          f"sha256 {rate / 2**20:.0f} MiB/s")
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry([FakeIngest, FakeImages, FakeNegatives, MosaicTables, Shards])
        cfg = load_config(reg, sets=[f"negatives.m={args.m}", f"mosaic_tables.k={args.k}",
                                     "shards.thumbnails=false"])
        pipe = Pipeline(reg, cfg, RunEnv(Path(tmp), "refcoco"), LocalExecutor(), progress=False)
        pipe.run("shards")
        worst = 0.0
        for stage in ("mosaic_tables", "shards"):
            on, off = [], []
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                off.append(timed(pipe, stage, verify=False))
                on.append(timed(pipe, stage, verify=True))
            size = read_bytes_of(pipe, stage)
            base = min(off + on)
            extra = (min(on) - min(off)) / min(off)
            hash_share = size / rate / base
            read_share = read_overhead(pipe, stage) / base
            worst = max(worst, hash_share, read_share)
            print(f"{stage:<14} reads {size / 2**20:7.1f} MiB; stage {min(off):6.2f} s unverified, "
                  f"{min(on):6.2f} s verified ({extra * 100:+.1f}%, whole-stage timings: noisy)")
            print(f"{'':<14} verification's cost: sha256 of the input {size / rate:5.2f} s = "
                  f"{hash_share * 100:.1f}% of the stage; verified minus plain reads of the "
                  f"same files {read_share * 100:.1f}% (target <= 5%)")
    print(f"worst: {worst * 100:.1f}% ({'within' if worst <= 0.05 else 'over'} the 5% target)")


if __name__ == "__main__":
    main()
