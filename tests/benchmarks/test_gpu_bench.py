"""benchmarks/gpu_bench.py on a CPU-only machine: a clean refusal, and every section's code
path at smoke size (the figures themselves come from the GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_bench.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_refuses_without_a_cuda_device(tmp_path):
    res = run("--results", str(tmp_path / "r.md"))
    assert res.returncode == 2
    assert res.stderr.startswith("error: no CUDA device")
    assert "--smoke --allow-cpu" in res.stderr
    assert not (tmp_path / "r.md").exists()
    assert run("--smoke").returncode == 2  # --smoke alone still needs the GPU


def test_smoke_runs_every_section_on_cpu(tmp_path):
    res = run("--smoke", "--allow-cpu", "--out", str(tmp_path), "--results",
              str(tmp_path / "RESULTS-gpu.md"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu_bench.json").read_text())
    (tiny,) = figures["embed"]["models"]
    assert tiny["model"] == "tiny" and tiny["images"] == 12
    for key in ("forward_img_s", "pil_decode_img_s", "gpu_decode_img_s", "stage_pil_img_s",
                "stage_gpu_img_s"):
        assert tiny[key] > 0, key
    assert tiny["stage_gpu_failed"] == tiny["stage_pil_failed"] == 0
    assert tiny["stage_gpu_pil_fallbacks"] == 0  # every generated JPEG took the tensor path
    neg = figures["negatives"]
    assert neg["table_bytes"] > 0 and neg["files"] >= 1 and neg["stage_s"] > 0
    mv = figures["multiview"]  # llava_bench's tiny check: every part ran, something was timed
    assert "error" not in mv, mv
    assert mv["best"]["requests_per_s"] > 0 and "meets_target" not in mv["best"]
    report = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "**CPU (" in report  # the device's name, here the CPU's
    for heading in ("## embed_images", "## negatives", "## multiview"):
        assert heading in report
