"""Run every benchmark and write their results, with the machine, to benchmarks/RESULTS.md.

Each benchmark prints ratios against a baseline measured in the same run (never absolute
timings asserted anywhere); this collects their output in one file. `make bench` calls it.

    .venv/bin/python benchmarks/run_all.py [--quick]
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
# (script, arguments for a full run, arguments for --quick)
BENCHES = [
    ("embed_bench.py", [], ["--n", "64"]),
    ("negatives_bench.py", [], ["--queries", "12000"]),
    ("dataset_bench.py", [], []),
    ("multiview_bench.py", [], ["--requests", "8"]),
    ("integrity_bench.py", [], ["--queries", "12000"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not tens)")
    args = ap.parse_args()
    sections = []
    for script, full, quick in BENCHES:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / script), *(quick if args.quick
                                                                     else full)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
        print(f"{script}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
        body = "\n".join(lines) if lines else proc.stderr[-2000:]
        sections.append(f"## {script} ({status})\n\n```\n{body}\n```\n")
    header = (f"# Benchmark results\n\nWritten by `make bench` on "
              f"{datetime.date.today().isoformat()}: {platform.machine()}, {os.cpu_count()} "
              f"cores, Python {platform.python_version()}, "
              f"{'quick sizes' if args.quick else 'full sizes'}. Every figure below is a ratio "
              "or a rate measured against a baseline in the same run.\n")
    (HERE / "RESULTS.md").write_text(header + "\n" + "\n".join(sections))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
