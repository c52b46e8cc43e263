"""Multi-view generation throughput: batch 1 against batched, tiny LLaVA on CPU, one run.

Each request is one synthetic image with 3 instances and the full multi-view prompt; the tiny
model writes `--tokens` new tokens per request. The ratio batched / batch-1 shows that
batching works (left padding, one generate call per batch); absolute numbers say nothing about
LLaVA-1.5-7B on a GPU (see the README's estimate).

    .venv/bin/python benchmarks/multiview_bench.py [--requests 16] [--batch 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.models.generation.hf_engine import HFVisionGenerator  # noqa: E402
from stages.text.view_prompts import Instance, build_prompt  # noqa: E402


def requests(n: int) -> list[tuple[Image.Image, str]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
        insts = [Instance(instance_id=str(100 * i + k), category=c, bbox=[10.0 * k, 5, 40, 60],
                          expressions=[f"{c} on the left", f"the {c}"])
                 for k, c in enumerate(("person", "dog", "umbrella"))]
        out.append((img, build_prompt(insts)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    gen = HFVisionGenerator("tiny", device="cpu")
    reqs = requests(args.requests)
    gen.generate(reqs[:2], max_new_tokens=4, batch_size=2)  # warm-up
    timings = {}
    for batch in (1, args.batch):
        t0 = time.perf_counter()
        gen.generate(reqs, max_new_tokens=args.tokens, batch_size=batch)
        timings[batch] = args.requests / (time.perf_counter() - t0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; tiny LLaVA, {args.requests} requests x 3 instances, "
          f"{args.tokens} new tokens")
    print(f"batch 1          : {timings[1]:6.2f} requests/s ({3 * timings[1]:.2f} instances/s)")
    print(f"batch {args.batch:<2}         : {timings[args.batch]:6.2f} requests/s "
          f"({3 * timings[args.batch]:.2f} instances/s)")
    print(f"ratio batched/1  : {timings[args.batch] / timings[1]:6.2f}")


if __name__ == "__main__":
    main()
