"""benchmarks/scale_run.sh at toy size (40 images, local executor, no LLaVA): every stage of
the DAG runs in its own process, the audit finds nothing, and the table has a row per stage,
so the script's stage list stays in step with the registry."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.registry import load_registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "nemo-pipe").exists(),
                    reason="the script runs .venv/bin/nemo-pipe (made by `make setup`)")
def test_scale_run_covers_every_stage_and_audits_clean(tmp_path):
    env = {**os.environ, "EXECUTORS": "local", "SKIP_LLAVA": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "scale_run.sh"), "40",
                           str(tmp_path / "scale")], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no findings" in proc.stdout
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}
    stages = load_registry().topological()
    assert sorted(set(rows) - {"**total**"}) == sorted(stages)
    for stage in stages:
        assert int(rows[stage].split("|")[2]) > 0, rows[stage]  # every stage wrote rows
