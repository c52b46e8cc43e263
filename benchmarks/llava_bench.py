"""LLaVA generation on a GPU: batch sizes (auto included), sorting, attention and KV cache.

Issue 16 item 3. No real weights can be fetched, so the model is LLaVA-1.5-7B's architecture
with seeded random weights, built by `benchmarks.gpu_multiview_run.build_model` (EOS off: every
request writes exactly its budget), saved with ``save_pretrained`` and loaded back through the
stage's own path (`HFVisionGenerator`: the processor, left padding, the memory-sized batches).
Throughput does not depend on the weights. Requests are synthetic 640x480 images with the
multiview prompt: fixed-length ones (``--prompt-tokens``, 1,641 as in the baseline of
benchmarks/RESULTS-gpu-baseline.md, 576 of them the image's) for the sweeps, and images with 1
to 8 instances (prompts of different lengths) for the sorting comparison. Every request writes
``--new-tokens`` (160).

Parts (each in its own try block; figures go to ``OUT/llava_bench.json`` as they come):

* ``build``: the random model, saved (skipped when the directory already has one);
* ``sweep``: SDPA, dynamic cache, ``batch_size`` 16, 48, 96 and ``auto`` (one full batch each,
  of the size the memory estimate allows under that cap);
* ``static``: the same model with the static KV cache, ``auto`` and 96;
* ``sort``: the 1-to-8-instance requests in batches of 16, sorted by prompt length or not,
  and how many answers agree;
* ``oom``: the memory estimate switched off (``memory_gib`` far above the card) and a cap of
  128: the out-of-memory retry on a real card (batch tried, batch settled, seconds lost);
* ``eager``: the model loaded again with eager attention, 16 and ``auto``;
* ``flash``: the same with ``flash_attention_2`` when flash-attn is installed (skipped if not).

Each measurement: requests/s and generated tokens/s (wall time around ``generate``, CUDA
synchronised), the batch sizes that ran, out-of-memory retries, peak GPU memory.

    # on the GPU machine (see README.md, "multiview on a GPU"):
    PYTHONUNBUFFERED=1 python3 benchmarks/llava_bench.py --out $OUT
    # on CPU, tiny model, to check the script (seconds): python benchmarks/llava_bench.py --tiny

`run_llava_bench(...)` returns the same figures for benchmarks/gpu_bench.py. Without CUDA and
without ``tiny`` it raises `DeviceError` (the CLI: ``error: ...``, exit 2).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("build", "sweep", "static", "sort", "oom", "eager", "flash")
FULL = {"prompt_tokens": 1641, "new_tokens": 160, "sweep": [16, 48, 96, "auto"],
        "static": ["auto", 96], "sort": (16, 6), "oom_cap": 128, "eager": [16, "auto"]}
# tiny: the same parts at CPU sizes (the tiny LLaVA's image is 16 tokens), with a memory
# budget that makes `auto` choose a small batch (0.5 GiB of it is the fixed overhead)
TINY = {"prompt_tokens": 1000, "new_tokens": 6, "sweep": [2, 4, "auto"], "static": ["auto"],
        "sort": (2, 1), "oom_cap": 8, "eager": [2, "auto"], "memory_gib": 0.55}
TARGET_REQUESTS_PER_S = 6.0  # issue 16, LLaVA-1.5-7B shape, 1,641 + 160 tokens, one H200


def _torch() -> Any:
    import torch

    return torch


def fixed_prompt(gen: Any, image: Any, target: int) -> tuple[str, int]:
    """A multiview prompt of `target` tokens as `gen` sees it (image included), or the
    nearest below: the prompt for as many instances (4 at most) as fit, then filler words, as
    many as fit (just the one-instance prompt when even that is longer)."""
    from stages.text.view_prompts import Instance, build_prompt

    cats = ("person", "dog", "umbrella", "car")
    instances = [Instance(instance_id=str(100 + i), category=c, bbox=(40 + 90 * i, 60, 80, 120),
                          expressions=[f"the {c} on the left", f"{c} number {i + 1}"])
                 for i, c in enumerate(cats)]
    for k in range(len(instances), 0, -1):
        base = build_prompt(instances[:k], image_size=image.size)
        if gen.prompt_lengths([(image, base)])[0] <= target:
            break

    def length(words: int) -> int:
        return gen.prompt_lengths([(image, base + " please" * words)])[0]

    lo, hi = 0, max(0, target - length(0))
    while lo < hi:  # the most filler words with length <= target
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if length(mid) <= target else (lo, mid - 1)
    return base + " please" * lo, length(lo)


def scene(n_per_count: int, max_instances: int = 8, seed: int = 0) -> list[tuple[Any, str]]:
    """Requests for 640x480 images with 1..max_instances instances (`n_per_count` of each),
    with the stage's per-image multiview prompt."""
    import numpy as np
    from PIL import Image

    from stages.text.view_prompts import Instance, build_prompt

    rng = np.random.default_rng(seed)
    cats = ("person", "dog", "umbrella", "car", "baseball glove", "cup", "horse", "bench")
    out = []
    for k in range(1, max_instances + 1):
        for r in range(n_per_count):
            image = Image.fromarray(rng.integers(60, 200, (480, 640, 3), dtype=np.uint8))
            instances = [Instance(instance_id=str(1000 * k + 10 * r + j), category=cats[j],
                                  bbox=tuple(float(v) for v in rng.integers(20, 300, 4)),
                                  expressions=[f"the {cats[j]} on the left",
                                               f"{cats[j]} number {j + 1}"])
                         for j in range(k)]
            out.append((image, build_prompt(instances, image_size=image.size)))
    return out


def measure(gen: Any, requests: Sequence[Any], new_tokens: int,
            batch_size: int | None) -> tuple[dict[str, Any], list[str]]:
    """One timed `generate` over `requests`: figures and the answers."""
    torch = _torch()
    cuda = gen.device.type == "cuda"
    stats = gen.stats
    before = (stats.generated_tokens, stats.oom_retries, dict(stats.batch_sizes))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    answers = gen.generate(list(requests), max_new_tokens=new_tokens, batch_size=batch_size)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    sizes = {str(k): v - before[2].get(k, 0) for k, v in sorted(stats.batch_sizes.items())
             if v - before[2].get(k, 0)}
    tokens = stats.generated_tokens - before[0]
    fig: dict[str, Any] = {
        "requests": len(requests), "batch_size": "auto" if batch_size is None else batch_size,
        "batch_sizes": sizes, "oom_retries": stats.oom_retries - before[1],
        "settled_batch": gen.batcher.ceiling, "wall_seconds": round(wall, 2),
        "requests_per_s": round(len(requests) / wall, 3),
        "generated_tokens_per_s": round(tokens / wall, 1),
        "prompt_tokens": gen.prompt_lengths(requests[:1])[0] if requests else None,
        "cache_implementation": gen.cache_implementation,
        "attn_implementation": gen.attn_implementation, "sort_by_length": gen.sort_by_length,
    }
    if cuda:
        fig["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        fig["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return fig, answers


def planned_batch(gen: Any, requests: Sequence[Any], new_tokens: int, cap: int | str) -> int:
    """The batch the generator would run first for these requests under `cap`."""
    from stages.models.generation.batching import AUTO_BATCH_CAP

    limit = AUTO_BATCH_CAP if cap == "auto" else int(cap)
    lengths = sorted(gen.prompt_lengths(requests[:1]) * limit)
    return gen.batcher.size(lengths, [new_tokens] * limit, limit)


def sweep(gen: Any, request: Any, new_tokens: int, caps: Sequence[int | str],
          log: Callable[[str], None]) -> dict[str, Any]:
    """One full batch per cap (the batch the estimate allows under it); a cap whose batch
    equals an earlier one's is reported as the same."""
    out: dict[str, Any] = {}
    done: dict[int, str] = {}
    for cap in caps:
        size = planned_batch(gen, [request], new_tokens, cap)
        if size in done:
            out[str(cap)] = {"same_as": done[size], "batch": size}
            continue
        fig, _ = measure(gen, [request] * size, new_tokens, None if cap == "auto" else int(cap))
        out[str(cap)] = fig
        done[size] = str(cap)
        log(f"  batch_size={cap}: {json.dumps(fig)}")
    return out


def _load(model_dir: Path, device: str, **options: Any) -> Any:
    from stages.models.generation.hf_engine import HFVisionGenerator

    t0 = time.perf_counter()
    gen = HFVisionGenerator(str(model_dir), device=device, **options)
    gen.load_seconds = round(time.perf_counter() - t0, 1)
    gen.model.generation_config.eos_token_id = None  # random weights: never stop early
    gen.generate([(_image(), "warm up")], max_new_tokens=2, batch_size=1)  # CUDA init, kernels
    return gen


def _image() -> Any:
    from PIL import Image

    return Image.new("RGB", (640, 480), (120, 110, 100))


def _free(gen: Any) -> None:
    del gen.model
    gc.collect()
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_llava_bench(out: Path | None = None, *, tiny: bool = False, device: str | None = None,
                    parts: Sequence[str] | None = None, scratch: Path | None = None,
                    prompt_tokens: int | None = None, new_tokens: int | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the parts (all by default) and return their figures; also written to
    ``out/llava_bench.json`` after each part when `out` is given. `tiny`: the tiny model on
    CPU (checks the script); otherwise CUDA is required (`DeviceError` without it).
    `prompt_tokens` / `new_tokens` replace the fixed requests' 1,641 / 160 (e.g. the length
    of a prompt without the worked examples, to see what a shorter prompt would give)."""
    from stages.models.loading import DeviceError

    torch = _torch()
    if not tiny and not torch.cuda.is_available():
        raise DeviceError("benchmarks/llava_bench.py needs a CUDA GPU (torch.cuda.is_available() "
                          "is False here): run it on the GPU machine (README.md, multiview on a "
                          "GPU) or pass --tiny for the CPU check of the script")
    unknown = set(parts or ()) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}: use {', '.join(PARTS)}")
    import transformers

    from benchmarks.gpu_multiview_run import build_model

    cfg = dict(TINY if tiny else FULL)
    cfg.update({k: v for k, v in (("prompt_tokens", prompt_tokens),
                                  ("new_tokens", new_tokens)) if v is not None})
    device = device or ("cpu" if tiny else "cuda")
    scratch = Path(scratch or ("/tmp/llava-bench" if not tiny else
                               (out or Path("/tmp")) / "llava-bench-scratch"))
    model_dir = scratch / f"llava-{'tiny' if tiny else '7b'}-random"
    figures: dict[str, Any] = {
        "size": "tiny" if tiny else "7b", "device": device, **{k: cfg[k] for k in (
            "prompt_tokens", "new_tokens")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    state: dict[str, Any] = {}

    def save() -> None:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "llava_bench.json").write_text(json.dumps(figures, indent=2) + "\n")

    def sdpa() -> Any:
        if "sdpa" not in state:
            state["sdpa"] = _load(model_dir, device, attn_implementation="sdpa",
                                  memory_gib=cfg.get("memory_gib"))
            state["request"] = (_image(), fixed_prompt(state["sdpa"], _image(),
                                                       cfg["prompt_tokens"])[0])
        return state["sdpa"]

    def part_build() -> dict[str, Any]:
        if (model_dir / "config.json").is_file():
            return {"reused": str(model_dir)}
        shutil.rmtree(model_dir, ignore_errors=True)
        return build_model(model_dir, "tiny" if tiny else "7b", device)

    def part_sweep() -> dict[str, Any]:
        gen = sdpa()
        gen.set_runtime(cache_implementation="dynamic", sort_by_length=True)
        return {"load_seconds": gen.load_seconds, "dtype": str(gen.dtype),
                "prompt_tokens": gen.prompt_lengths([state["request"]])[0],
                **sweep(gen, state["request"], cfg["new_tokens"], cfg["sweep"], log)}

    def part_static() -> dict[str, Any]:
        gen = sdpa()
        gen.set_runtime(cache_implementation="static")
        try:
            return sweep(gen, state["request"], cfg["new_tokens"], cfg["static"], log)
        finally:
            gen.set_runtime(cache_implementation="dynamic")

    def part_sort() -> dict[str, Any]:
        gen = sdpa()
        cap, per_count = cfg["sort"]
        requests = scene(per_count)
        res: dict[str, Any] = {"prompt_tokens": {"min": min(gen.prompt_lengths(requests)),
                                                 "max": max(gen.prompt_lengths(requests))}}
        answers = {}
        for on in (True, False):
            gen.set_runtime(sort_by_length=on)
            res[f"sorted={on}"], answers[on] = measure(gen, requests, cfg["new_tokens"], cap)
            log(f"  sort={on}: {json.dumps(res[f'sorted={on}'])}")
        gen.set_runtime(sort_by_length=True)
        res["same_answers"] = sum(a == b for a, b in zip(answers[True], answers[False],
                                                         strict=True)) / len(requests)
        return res

    def part_oom() -> dict[str, Any]:
        if device == "cpu":
            return {"skipped": "needs CUDA (a CPU has no out-of-memory to recover from)"}
        gen = sdpa()
        budget, ceiling = gen.batcher.memory_gib, gen.batcher.ceiling
        gen.batcher.memory_gib, gen.batcher.ceiling = 1e6, None  # the estimate off
        try:
            fig, _ = measure(gen, [state["request"]] * cfg["oom_cap"], cfg["new_tokens"],
                             cfg["oom_cap"])
        finally:
            gen.batcher.memory_gib, gen.batcher.ceiling = budget, ceiling
        return fig

    def part_attn(attn: str) -> dict[str, Any]:
        if attn == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                return {"skipped": "flash-attn is not installed"}
        if "sdpa" in state:
            _free(state.pop("sdpa"))
        gen = _load(model_dir, device, attn_implementation=attn,
                    memory_gib=cfg.get("memory_gib"))
        try:
            request = (_image(), fixed_prompt(gen, _image(), cfg["prompt_tokens"])[0])
            return {"load_seconds": gen.load_seconds,
                    **sweep(gen, request, cfg["new_tokens"], cfg["eager"], log)}
        finally:
            _free(gen)

    steps = {"build": part_build, "sweep": part_sweep, "static": part_static,
             "sort": part_sort, "oom": part_oom, "eager": lambda: part_attn("eager"),
             "flash": lambda: part_attn("flash_attention_2")}
    for name in PARTS:
        if parts is not None and name not in parts:
            continue
        log(f"[llava_bench] {name} ...")
        t0 = time.perf_counter()
        try:
            figures[name] = steps[name]()
        except Exception as exc:  # one failure must not lose the other parts
            figures[name] = {"error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-3000:]}
        figures[name]["part_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"[llava_bench] {name}: {json.dumps(figures[name])[:800]}")
        save()
    figures["best"] = best(figures, target=not tiny)
    save()
    return figures


def best(figures: dict[str, Any], target: bool = True) -> dict[str, Any] | None:
    """The fastest fixed-prompt measurement, and (`target`: at the 7B size) whether it meets
    the issue's target."""
    runs = [(part, cap, fig) for part in ("sweep", "static", "eager", "flash")
            for cap, fig in (figures.get(part) or {}).items()
            if isinstance(fig, dict) and "requests_per_s" in fig]
    if not runs:
        return None
    part, cap, fig = max(runs, key=lambda r: r[2]["requests_per_s"])
    out = {"part": part, "batch_size": cap, "requests_per_s": fig["requests_per_s"],
           "batch": max((int(k) for k in fig["batch_sizes"]), default=None)}
    if target:
        out.update(target_requests_per_s=TARGET_REQUESTS_PER_S,
                   meets_target=fig["requests_per_s"] >= TARGET_REQUESTS_PER_S)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import os

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="figures go here")
    ap.add_argument("--scratch", default=None, help="the saved model (default /tmp/llava-bench)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="fixed prompt length, image included (default 1641; tiny 1000)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 160 (tiny 6)")
    args = ap.parse_args(argv)
    from pipeline.errors import NemoError

    try:
        run_llava_bench(Path(args.out), tiny=args.tiny, device=args.device,
                        parts=[p for p in args.parts.split(",") if p],
                        scratch=Path(args.scratch) if args.scratch else None,
                        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                        log=lambda line: print(line, flush=True))
    except (NemoError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[llava_bench] figures in {Path(args.out) / 'llava_bench.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
