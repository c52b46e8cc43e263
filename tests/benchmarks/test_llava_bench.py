"""benchmarks/llava_bench.py (issue 16 item 3's GPU measurement) at tiny size on CPU: every
part runs and reports; sorting, static cache and eager attention give the same answers in
fp32; without CUDA and without --tiny it refuses with `error: ...`, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.llava_bench import PARTS, run_llava_bench  # noqa: E402


def test_tiny_bench_runs_every_part(tmp_path: Path) -> None:
    lines: list[str] = []
    figures = run_llava_bench(tmp_path / "out", tiny=True, scratch=tmp_path / "scratch",
                              log=lines.append)
    assert json.loads((tmp_path / "out" / "llava_bench.json").read_text()) == figures
    assert all("error" not in figures[part] for part in PARTS), figures
    sweep = figures["sweep"]
    for cap in ("2", "4"):
        assert sweep[cap]["batch_sizes"] == {cap: 1} and sweep[cap]["requests"] == int(cap)
    auto = sweep["auto"]  # the tiny budget (0.55 GiB) lets the estimate choose a few rows
    assert auto["batch_size"] == "auto" and auto["oom_retries"] == 0
    assert 4 < int(next(iter(auto["batch_sizes"]))) < 256
    assert sweep["prompt_tokens"] <= 1000 and auto["generated_tokens_per_s"] > 0
    assert figures["static"]["auto"]["cache_implementation"] == "static"
    assert figures["sort"]["same_answers"] == 1.0  # fp32: batch composition changes nothing
    assert figures["sort"]["prompt_tokens"]["min"] < figures["sort"]["prompt_tokens"]["max"]
    assert figures["eager"]["2"]["attn_implementation"] == "eager"
    assert "skipped" in figures["oom"]  # CPU: nothing to recover from
    assert figures["best"]["requests_per_s"] > 0 and "meets_target" not in figures["best"]
    assert any(line.startswith("[llava_bench] sweep") for line in lines)


def test_refuses_without_cuda_unless_tiny(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the bench would run")
    res = subprocess.run([sys.executable, "benchmarks/llava_bench.py", "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr.startswith("error: benchmarks/llava_bench.py needs a CUDA GPU")
    assert "--tiny" in res.stderr and not (tmp_path / "out").exists()
    bad = subprocess.run([sys.executable, "benchmarks/llava_bench.py", "--tiny", "--parts",
                          "sweep,fast", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown parts ['fast']" in bad.stderr
