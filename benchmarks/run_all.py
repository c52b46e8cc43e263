"""Run every benchmark and write their results, with the machine, to benchmarks/RESULTS.md.

Each benchmark prints ratios against a baseline measured in the same run (never absolute
timings asserted anywhere); this collects their output in one file. `make bench` calls it.
Exits 1 when any benchmark failed (the file still says which, with its error).

    .venv/bin/python benchmarks/run_all.py [--quick | --smoke] [--out PATH]

`--smoke` runs each at toy sizes, in under a minute: not figures to read, a check that every
benchmark still runs against the current code (the test suite calls it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, arguments for a full run, for --quick, for --smoke)
BENCHES = [
    ("embed_bench.py", [], ["--n", "64"], ["--n", "16", "--batch", "8"]),
    ("negatives_bench.py", [], ["--queries", "12000"],
     ["--queries", "2000", "--pool", "400", "--dim", "32", "--m", "64", "--block", "256"]),
    ("dataset_bench.py", [], [], ["--repeats", "1", "--in-process-samples", "32"]),
    ("multiview_bench.py", [], ["--requests", "8"], ["--requests", "2", "--tokens", "4"]),
    ("integrity_bench.py", [], ["--queries", "12000"],
     ["--queries", "3000", "--pool", "500", "--m", "64", "--k", "16", "--repeats", "1"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not tens)")
    size.add_argument("--smoke", action="store_true",
                      help="toy sizes: checks that every benchmark runs, no figures to keep")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="results file")
    args = ap.parse_args()
    sections, failed = [], []
    for script, full, quick, smoke in BENCHES:
        started = time.perf_counter()
        argv = smoke if args.smoke else quick if args.quick else full
        proc = subprocess.run([sys.executable, str(HERE / script), *argv],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
        if proc.returncode:
            failed.append(script)
        print(f"{script}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
        body = "\n".join(lines) if lines else proc.stderr[-2000:]
        if proc.returncode and lines:  # the output so far, then why it stopped
            body += "\n" + proc.stderr[-2000:]
        sections.append(f"## {script} ({status})\n\n```\n{body}\n```\n")
    sizes = "smoke sizes" if args.smoke else "quick sizes" if args.quick else "full sizes"
    header = (f"# Benchmark results\n\nWritten by `make bench` on "
              f"{datetime.date.today().isoformat()}: {platform.machine()}, {os.cpu_count()} "
              f"cores, Python {platform.python_version()}, {sizes}. Every figure below is a "
              "ratio or a rate measured against a baseline in the same run.\n")
    args.out.write_text(header + "\n" + "\n".join(sections))
    print(f"wrote {args.out}")
    if failed:
        print(f"error: {len(failed)} benchmark(s) failed: {', '.join(failed)}; their errors "
              f"are in {args.out}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
