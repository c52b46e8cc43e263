"""Every CPU benchmark still runs against the current code: `run_all.py --smoke` at toy sizes.

The figures at these sizes mean nothing; what is checked is that each script finishes, prints
the lines its section of RESULTS.md is read for, and that a failing one fails the run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# a line each benchmark prints when it ran to the end
EXPECTED = {
    "embed_bench.py": "ratio full / ceiling",
    "negatives_bench.py": "ratio stage / bare",
    "dataset_bench.py": "mosaic/single cost ratio",
    "multiview_bench.py": "ratio batched/1",
    "integrity_bench.py": "worst:",
}


@pytest.mark.slow
def test_every_benchmark_runs_at_smoke_sizes(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert "smoke sizes" in text
    for script, line in EXPECTED.items():
        assert f"## {script} (ok)" in text, text
        section = text.split(f"## {script} (ok)")[1].split("## ")[0]
        assert line in section, section


def test_a_failing_benchmark_fails_the_run(tmp_path, monkeypatch):
    """run_all exits 1 and names the script when one benchmark exits non-zero, and the
    results file keeps that benchmark's error."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    fake = tmp_path / "bench"
    fake.mkdir()
    (fake / "good.py").write_text("print('ratio 1.0')\n")
    (fake / "bad.py").write_text("print('started')\nraise SystemExit('bad bench: broke')\n")
    monkeypatch.setattr(run_all, "HERE", fake)
    monkeypatch.setattr(run_all, "BENCHES", [("good.py", [], [], []), ("bad.py", [], [], [])])
    out = tmp_path / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        run_all.main()
    assert exit_info.value.code == 1
    text = out.read_text()
    assert "## good.py (ok)" in text and "## bad.py (failed (1))" in text
    assert "started" in text and "bad bench: broke" in text
