"""The negatives stage against the bare matrix product of the same shapes, in one run.

RefCOCO-sized by default: about 120k training queries x 17k pool images, d = 512, random
normalised vectors (7 sentences per image, as in RefCOCO). The baseline is the text-to-image
product t @ V^T computed block by block (never the whole matrix) with nothing else; the stage
adds the image-to-image scores, exact top-M selection with tie-breaking, and Parquet writing,
through the real engine (stub upstream stages provide the embeddings). Target: ratio <= 2.

Next to the ratio it prints the table's bytes, the stage's write throughput (table bytes per
second of the whole stage) and, as the disk's own figure, plain writes of as many bytes into
the same directory; and the ratio of CPU time (this process's user + system), which other
processes on a shared machine disturb less than wall time.

    .venv/bin/python benchmarks/negatives_bench.py [--queries 120624] [--pool 16994] [--dim 512]
        [--device cpu|cuda] [--block 1024] [--selection auto|sort|topk] [--score-dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def cpu_seconds() -> float:
    """User + system time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bare_product(texts: np.ndarray, pool: np.ndarray, block: int,
                 device: str = "cpu") -> tuple[float, float]:
    """(wall, cpu) seconds of t @ V^T block by block in float32, on `device`. On the CPU the
    products go into one buffer reused across blocks, as the stage's do (a fresh 70 MiB
    result per block costs its pages from the kernel again): the baseline gets every
    advantage the stage has."""
    import torch

    dev = torch.device(device)
    p = torch.from_numpy(pool.astype(np.float32)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    buf = torch.empty((block, len(pool)), dtype=torch.float32) if dev.type == "cpu" else None
    sync()
    c0, t0 = cpu_seconds(), time.perf_counter()
    for s in range(0, len(texts), block):
        t = torch.from_numpy(texts[s:s + block].astype(np.float32)).to(dev)
        if buf is None:
            t @ p.T
        else:
            torch.matmul(t, p.T, out=buf[:len(t)])
    sync()
    return time.perf_counter() - t0, cpu_seconds() - c0


def disk_write(folder: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` with plain 64 MiB writes and close: the disk's (and page
    cache's) own speed, for the stage's write throughput to be read against."""
    chunk = np.random.default_rng(3).integers(0, 255, 64 << 20, dtype=np.uint8)
    path = folder / "disk_baseline.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(memoryview(chunk)[:min(left, len(chunk))])
            left -= len(chunk)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def run_stage(queries: int, pool: int, dim: int, m: int, block: int, device: str = "auto",
              selection: str = "auto", score_dtype: str = "float32",
              disk_baseline: bool = True) -> dict[str, Any]:
    """The bare product and the stage on the same sizes; figures as a dict."""
    SIZES.update(queries=queries, pool=pool, dim=dim)
    import torch

    bare_device = "cuda" if device == "auto" and torch.cuda.is_available() else (
        "cpu" if device == "auto" else device)
    bare_wall, bare_cpu = bare_product(unit_vectors(queries, dim, 2),
                                       unit_vectors(pool, dim, 1), block, bare_device)
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry([FakeIngest, FakeImages, FakeTexts, Negatives])
        cfg = load_config(reg, sets=[f"negatives.m={m}", f"negatives.block={block}",
                                     f"negatives.device={device}",
                                     f"negatives.selection={selection}",
                                     f"negatives.score_dtype={score_dtype}"])
        pipe = Pipeline(reg, cfg, RunEnv(Path(tmp), "refcoco"), LocalExecutor(), progress=False)
        for name in ("ingest", "embed_images", "embed_texts"):
            pipe.run(name)
        c0, t0 = cpu_seconds(), time.perf_counter()
        pipe.run("negatives")
        stage_wall, stage_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        manifest = json.loads((pipe.artifact_dir("negatives") / "_manifest.json").read_text())
        split = {k: manifest["stats"].get(k) for k in ("inputs_s", "search_s", "write_s")}
        split["engine_s"] = stage_wall - manifest["stats"]["seconds"]
        files = sorted(pipe.artifact_dir("negatives").rglob("*.parquet"))
        size = sum(f.stat().st_size for f in files)
        disk = disk_write(Path(tmp), size) if disk_baseline else None
    return {"queries": queries, "pool": pool, "dim": dim, "m": m, "block": block,
            "device": bare_device, "selection": selection, "score_dtype": score_dtype,
            "bare_s": bare_wall, "bare_cpu_s": bare_cpu, "stage_s": stage_wall,
            "stage_cpu_s": stage_cpu, "ratio": stage_wall / bare_wall,
            "cpu_ratio": stage_cpu / bare_cpu if bare_cpu else None,
            "table_bytes": size, "files": len(files),
            "write_mb_s": size / 2**20 / stage_wall,
            "disk_s": disk, "disk_mb_s": size / 2**20 / disk if disk else None,
            "split": split, "peak_rss_mb": peak_rss_mb()}


def report(r: dict[str, Any]) -> list[str]:
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}; {r['queries']} queries x {r['pool']} pool, d={r['dim']}, "
        f"M={r['m']}, block={r['block']}, device={r['device']}, scores {r['score_dtype']}",
        f"bare t @ V^T, blocked : {r['bare_s']:8.2f} s  (cpu {r['bare_cpu_s']:.1f} s)",
        f"negatives stage       : {r['stage_s']:8.2f} s  (cpu {r['stage_cpu_s']:.1f} s)",
        f"ratio stage / bare    : {r['ratio']:8.2f}  (target <= 2; cpu-time ratio "
        + (f"{r['cpu_ratio']:.2f})" if r["cpu_ratio"] else "n/a)"),
        f"table                 : {r['table_bytes'] / 2**30:8.2f} GiB in {r['files']} files, "
        f"written at {r['write_mb_s']:.0f} MiB/s over the whole stage",
    ]
    sp = r["split"]
    lines.append(f"stage's time          : inputs {sp['inputs_s']:.2f} s, search "
                 f"{sp['search_s']:.2f} s, table and writes {sp['write_s']:.2f} s, engine "
                 f"(plan, hashes, publish) {sp['engine_s']:.2f} s")
    if r["disk_s"] is not None:
        lines.append(f"disk, plain writes    : {r['disk_mb_s']:8.0f} MiB/s  (the same bytes in "
                     f"{r['disk_s']:.1f} s; stage / disk time {r['stage_s'] / r['disk_s']:.2f})")
    lines.append(f"peak memory           : {r['peak_rss_mb']:8.0f} MiB")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=120_624)
    ap.add_argument("--pool", type=int, default=16_994)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--device", default="cpu", help="cpu (default: the CPU target), cuda, auto")
    ap.add_argument("--selection", default="auto", choices=["auto", "sort", "topk"])
    ap.add_argument("--score-dtype", default="float32", choices=["float32", "float16"])
    args = ap.parse_args()
    r = run_stage(args.queries, args.pool, args.dim, args.m, args.block, args.device,
                  args.selection, args.score_dtype)
    print("\n".join(report(r)))


if __name__ == "__main__":
    main()
