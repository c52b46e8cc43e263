"""The GPU benchmark of issue 16: embed_images, negatives and multiview on one card.

Random-init weights of the real architectures (no weights can be downloaded; throughput does
not depend on them), the project's own code paths, sizes of the issue:

  embed      embed_images shard work on 640x480 JPEGs made on the fly, ViT-B-16 and ViT-L-14,
             decode=pil against decode=gpu, next to the forward pass alone and each decode
             path alone (targets: >= 3,000 img/s B-16, >= 1,400 img/s L-14 with decode=gpu);
  negatives  the stage at RefCOCO size, 120,624 x 16,994 x 512, M = 2048, on the GPU, next to
             its bare blocked product (target: <= 3 s);
  multiview  the hf backend with LLaVA-1.5-7B-shaped batches (benchmarks/llava_bench.py: batch
             sweep incl. the memory-estimated `auto`, static cache, sorting, OOM retry, eager
             attention; target >= 6 req/s and no out-of-memory); about 7 minutes, so run it
             as its own device call (`--only multiview`).

Each section runs in its own try block; figures go to `--out`/gpu_bench.json as they come and
the report to `--results` (default benchmarks/RESULTS-gpu.md), with the card's name. Without a
CUDA device it refuses (exit 2), unless `--smoke --allow-cpu`: tiny sizes and the tiny model,
so CI runs every code path on CPU.

    python benchmarks/gpu_bench.py                      # on the GPU machine (README: GPU)
    python benchmarks/gpu_bench.py --smoke --allow-cpu --out /tmp/gb --results /tmp/gb/r.md
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# (model, decode=gpu target img/s)
EMBED_MODELS = [("ViT-B-16", 3000), ("ViT-L-14", 1400)]
NEGATIVES = {"queries": 120_624, "pool": 16_994, "dim": 512, "m": 2048, "block": 8192}
NEGATIVES_TARGET_S = 3.0
FULL = {"images": 3072, "batch": 256}
SMOKE = {"images": 12, "batch": 4, "models": [("tiny", None)],
         "negatives": {"queries": 600, "pool": 300, "dim": 32, "m": 64, "block": 128}}


def cuda_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def make_jpegs(folder: Path, n: int, distinct: int = 64, threads: int = 8) -> list[Path]:
    """n 640x480 JPEGs, photo-like (smooth colour fields, shapes, noise), quality 90: `distinct`
    different images written n times over (decoding cost depends on content, not on identity)."""
    from PIL import Image, ImageDraw, ImageFilter

    def one(i: int) -> bytes:
        rng = np.random.default_rng(i)
        base = rng.integers(0, 255, size=(15, 20, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((640, 480), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            color = tuple(int(v) for v in rng.integers(0, 255, 3))
            draw.ellipse([x, y, x + 90, y + 70], fill=color)
        img = img.filter(ImageFilter.GaussianBlur(1))
        arr = np.asarray(img).astype(np.float32) + rng.normal(0, 5, (480, 640, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(threads) as pool:
        blobs = list(pool.map(one, range(min(n, distinct))))
    paths = []
    for i in range(n):
        path = folder / f"COCO_train2014_{i:012d}.jpg"
        path.write_bytes(blobs[i % len(blobs)])
        paths.append(path)
    return paths


def _encode_image_batch() -> Any:
    """stages.models.clip.encode_image_batch wherever the models package keeps it."""
    try:
        from stages.models.clip import encode_image_batch  # type: ignore[import-not-found]
    except ImportError:
        from stages.models.clip import encode_image_batch
    return encode_image_batch


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def embed_one(model: str, paths: list[Path], batch: int, device: str, tmp: Path,
              threads: int) -> dict[str, Any]:
    """One model: forward alone, each decode path alone, and the shard work with each."""
    import torch

    from pipeline.stage import ShardWriter
    from stages.embed import (
        EmbedParams,
        _embed_images_shard,
        decoded_batches,
        get_bundle,
        load_pixels,
    )
    from stages.ops.gpu_images import TensorPreprocess, device_batches

    bundle = get_bundle(model, None, device)
    encode = _encode_image_batch()
    out: dict[str, Any] = {"model": model, "images": len(paths), "batch": batch,
                           "device": str(bundle.device), "threads": threads}
    pixels = torch.randn((batch, 3, *bundle.image_size), device=bundle.device)
    encode(bundle, pixels)  # warm-up (kernels, autotuning)
    _sync()
    reps = max(2, len(paths) // batch)
    t0 = time.perf_counter()
    for _ in range(reps):
        encode(bundle, pixels)
    _sync()
    out["forward_img_s"] = reps * batch / (time.perf_counter() - t0)

    items = [(i, str(p)) for i, p in enumerate(paths)]

    def pil(item: tuple[int, str]) -> Any:
        return load_pixels(item[1], bundle.preprocess, False, bundle.image_size)

    prep = TensorPreprocess.from_transform(bundle.preprocess)
    for name, batches in (
            ("pil_decode_img_s", lambda: decoded_batches(items, pil, batch, threads,
                                                         {"read_s": 0.0})),
            ("gpu_decode_img_s", lambda: device_batches(items, prep, pil, batch, threads,
                                                        bundle.device, {"read_s": 0.0}))):
        t0 = time.perf_counter()
        count = sum(len(b.good) if hasattr(b, "good") else len(b) for b in batches())
        _sync()
        out[name] = count / (time.perf_counter() - t0)

    for decode in ("pil", "gpu"):
        params = EmbedParams(model=model, pretrained=None, batch_size=batch, workers=threads,
                             device=device, decode=decode)
        payload = {"items": items, "batch": batch, "decode": decode}
        warm = {**payload, "items": items[: 2 * batch]}
        _embed_images_shard(warm, ShardWriter(tmp / f"warm-{model}-{decode}", 0, "1", params))
        _sync()
        t0 = time.perf_counter()
        stats = _embed_images_shard(payload, ShardWriter(tmp / f"{model}-{decode}", 0, "1", params))
        _sync()
        wall = time.perf_counter() - t0
        out[f"stage_{decode}_img_s"] = len(items) / wall
        out[f"stage_{decode}_busy"] = stats["infer_s"] / wall
        out[f"stage_{decode}_failed"] = len(stats["failed"])
        out[f"stage_{decode}_pil_fallbacks"] = stats["pil_fallbacks"]
    for d in tmp.glob(f"*{model}-*"):
        shutil.rmtree(d, ignore_errors=True)
    return out


def bench_embed(args: argparse.Namespace, sizes: dict[str, Any], tmp: Path) -> dict[str, Any]:
    paths = make_jpegs(tmp / "jpegs", sizes["images"])
    models = SMOKE["models"] if args.smoke else EMBED_MODELS
    device = "cuda" if cuda_name() else "cpu"
    threads = os.cpu_count() or 1
    results = []
    for model, target in models:
        print(f"embed: {model} ...", flush=True)
        r = embed_one(model, paths, sizes["batch"], device, tmp, threads)
        r["target_img_s"] = target
        results.append(r)
        print(f"embed: {model}: " + json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                                 for k, v in r.items()}), flush=True)
    return {"models": results}


def bench_negatives(args: argparse.Namespace) -> dict[str, Any]:
    from negatives_bench import run_stage

    n = SMOKE["negatives"] if args.smoke else NEGATIVES
    device = "cuda" if cuda_name() else "cpu"
    print(f"negatives: {n} on {device} ...", flush=True)
    r = run_stage(n["queries"], n["pool"], n["dim"], n["m"], n["block"], device=device,
                  selection="topk" if device == "cuda" else "auto")
    r["target_s"] = NEGATIVES_TARGET_S
    print("negatives: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                      for k, v in r.items()}), flush=True)
    return r


def bench_multiview(args: argparse.Namespace) -> dict[str, Any]:
    """Issue 16 item 3 (LLaVA batches that fill the card): `benchmarks/llava_bench.py`'s parts
    (batch sweep incl. auto, static cache, sorting, OOM retry, eager attention) on a
    LLaVA-1.5-7B-shaped model, or its `tiny` check with --smoke. It takes about 7 minutes on the
    H200, so a device session runs it as its own call (`--only multiview`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llava_bench import run_llava_bench

    out = Path(args.out) if args.out else None
    return run_llava_bench(out, tiny=args.smoke, device=None if cuda_name() else "cpu")


def _fmt(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(results: dict[str, Any]) -> str:
    """RESULTS-gpu.md: the card, the library versions, one table per section."""
    meta = results["meta"]
    lines = [
        "# GPU benchmark results",
        "",
        f"Written by `benchmarks/gpu_bench.py{' --smoke' if meta['smoke'] else ''}` on "
        f"{meta['date']}: **{meta['device']}**, {meta['cpus']} CPU cores, Python "
        f"{meta['python']}, torch {meta['torch']}, torchvision {meta['torchvision']}. Random-"
        "init weights of the real architectures (throughput does not depend on them).",
        ""]
    embed = results.get("embed")
    if embed is None:
        pass
    elif "error" in embed:
        lines += ["## embed_images (640x480 JPEGs)", "",
                  f"failed: `{embed['error']}`", ""]
    else:
        lines += ["## embed_images (640x480 JPEGs)", "",
                  "| model | forward alone | PIL decode alone | GPU decode alone | stage, "
                  "decode=pil | stage, decode=gpu | model busy (gpu) | target (gpu) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in embed.get("models", []):
            met = r["target_img_s"] is not None and r["stage_gpu_img_s"] >= r["target_img_s"]
            lines.append(
                f"| {r['model']} | {_fmt(r['forward_img_s'])} | {_fmt(r['pil_decode_img_s'])} "
                f"| {_fmt(r['gpu_decode_img_s'])} | {_fmt(r['stage_pil_img_s'])} | "
                f"{_fmt(r['stage_gpu_img_s'])} | {r['stage_gpu_busy']:.0%} | "
                f">= {_fmt(r['target_img_s'])}: {'met' if met else 'NOT met'} |"
                if r["target_img_s"] else
                f"| {r['model']} | {_fmt(r['forward_img_s'])} | {_fmt(r['pil_decode_img_s'])} "
                f"| {_fmt(r['gpu_decode_img_s'])} | {_fmt(r['stage_pil_img_s'])} | "
                f"{_fmt(r['stage_gpu_img_s'])} | {r['stage_gpu_busy']:.0%} | - |")
        lines += ["", "images/s; batch and threads: " + ", ".join(
            f"{r['model']} {r['batch']}/{r['threads']}" for r in embed.get("models", [])), ""]
    neg = results.get("negatives")
    if neg is None:
        pass
    elif "error" in neg:
        lines += ["## negatives", "", f"failed: `{neg['error']}`", ""]
    else:
        met = neg["stage_s"] <= neg["target_s"]
        lines += ["## negatives", "",
            f"{neg['queries']:,} queries x {neg['pool']:,} pool, d={neg['dim']}, M={neg['m']}, "
            f"block {neg['block']}, {neg['device']}, selection {neg['selection']}.",
            "",
            "| bare blocked product | stage | ratio | table | written at | plain disk writes | "
            "target |",
            "|---|---|---|---|---|---|---|",
            f"| {neg['bare_s']:.3f} s | {neg['stage_s']:.2f} s | {neg['ratio']:.1f} | "
            f"{neg['table_bytes'] / 2**30:.2f} GiB in {neg['files']} files | "
            f"{neg['write_mb_s']:,.0f} MiB/s | {_fmt(neg['disk_mb_s'])} MiB/s | "
            f"<= {neg['target_s']:.0f} s: {'met' if met else 'NOT met'} |", "",
            "The stage's time: " + ", ".join(
                f"{name} {neg['split'][key]:.2f} s" for name, key in (
                    ("reading the embeddings", "inputs_s"), ("search", "search_s"),
                    ("table and writes", "write_s"),
                    ("engine (plan, sha256 of the files, publish)", "engine_s"))
                if neg["split"].get(key) is not None) + ".", ""]
    mv = results.get("multiview")
    head = ["## multiview (hf backend, LLaVA-1.5-7B shape)", ""]
    if mv is None:
        pass
    elif "error" in mv:
        lines += [*head, f"failed: `{mv['error']}`", ""]
    elif mv.get("status") == "not built":
        lines += [*head, mv["message"] + ".", ""]
    else:
        lines += [*head, "```", json.dumps(mv, indent=2), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and the tiny model")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="with --smoke: run on CPU (CI checks the code paths)")
    ap.add_argument("--only", nargs="*", choices=["embed", "negatives", "multiview"],
                    help="run these sections only")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT")
                    else None, help="folder for gpu_bench.json (default $OUT when set)")
    ap.add_argument("--results", type=Path, default=None,
                    help="the Markdown report (default benchmarks/RESULTS-gpu.md; none for "
                         "--smoke unless given)")
    args = ap.parse_args(argv)

    import torch

    name = cuda_name()
    if name is None and not (args.smoke and args.allow_cpu):
        print(f"error: no CUDA device (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}): gpu_bench measures the GPU paths; run it on a GPU "
              "machine (README: GPU), or check its code on CPU with --smoke --allow-cpu",
              file=sys.stderr)
        return 2
    import torchvision

    results: dict[str, Any] = {"meta": {
        "device": name or f"CPU ({platform.processor() or platform.machine()})",
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "date": datetime.date.today().isoformat(), "smoke": args.smoke}}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        if args.out:
            (args.out / "gpu_bench.json").write_text(json.dumps(results, indent=2))

    sizes = SMOKE if args.smoke else FULL
    sections = args.only or ["embed", "negatives", "multiview"]
    with tempfile.TemporaryDirectory() as tmp:
        for section in sections:
            started = time.perf_counter()
            try:
                if section == "embed":
                    results["embed"] = bench_embed(args, sizes, Path(tmp))
                elif section == "negatives":
                    results["negatives"] = bench_negatives(args)
                else:
                    results["multiview"] = bench_multiview(args)
            except Exception as exc:  # one section's failure must not lose the others
                traceback.print_exc()
                results[section] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{section}: done in {time.perf_counter() - started:.0f} s", flush=True)
            save()
    report = render(results)
    target = args.results or (None if args.smoke else HERE / "RESULTS-gpu.md")
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(report)
        print(f"wrote {target}")
    print(report)
    return 1 if any("error" in results.get(s, {}) for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
