"""benchmarks/gpu_multiview_run.py without CUDA: it ran every part on no device, wrote a JSON of
tracebacks and exited 0 (after emptying /tmp/gpu-mv); it refuses now, as gpu_bench.py and
llava_bench.py do, with `error: ...`, exit 2, and writes nothing. Its --tiny CPU run is tested
in tests/stages/test_multiview_hf.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_multiview_run import main  # noqa: E402


@pytest.mark.parametrize("extra", [[], ["--tiny", "--device", "cuda"]])
def test_refuses_without_cuda_unless_tiny_on_cpu(tmp_path, capsys, extra):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the run would start")
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    assert main(["--out", str(out), "--scratch", str(scratch), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: benchmarks/gpu_multiview_run.py needs a CUDA GPU")
    assert "--tiny" in err and not out.exists() and not scratch.exists()
