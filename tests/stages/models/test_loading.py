"""stages.models.loading: offline model resolution, devices and dtypes; the tiny model is never
built by the production path."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import InputError
from stages.models import tiny as tiny_models
from stages.models.generation.hf_engine import HFTextGenerator, HFVisionGenerator
from stages.models.loading import resolve_model_path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_uncached_hub_id_is_an_input_error_fast(tmp_path: Path, no_network: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers  # noqa: F401 - import cost is not part of "fast"
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    previous = constants.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(InputError, match="cannot download it; pass a local directory"):
        HFVisionGenerator("llava-hf/llava-1.5-7b-hf", device="cpu")
    assert time.monotonic() - start < 5
    assert constants.HF_HUB_OFFLINE is previous  # offline only for the lookup
    with pytest.raises(InputError, match="no such directory"):
        resolve_model_path(str(tmp_path / "missing" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_cached_hub_id_resolves_to_its_snapshot(tmp_path: Path, no_network: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    commit = "a" * 40
    repo = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    previous = constants.HF_HUB_OFFLINE
    path, revision = resolve_model_path("llava-hf/llava-1.5-7b-hf")
    assert path == snapshot and revision == commit
    assert constants.HF_HUB_OFFLINE is previous  # offline only for the lookup


def test_bad_device_and_dtype_are_input_errors(tiny_dir: Path) -> None:
    with pytest.raises(InputError, match="unknown dtype"):
        HFVisionGenerator("tiny", device="cpu", dtype="int3", cache_dir=tiny_dir.parent)
    with pytest.raises(InputError, match="unknown device"):
        HFVisionGenerator("tiny", device="tpu", cache_dir=tiny_dir.parent)


def test_missing_models_are_input_errors_at_once(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="cannot download"):
        HFTextGenerator("nobody-here/no-such-causal-lm")
    with pytest.raises(InputError, match="no such directory"):
        HFTextGenerator(str(tmp_path / "missing-dir"))
    empty = tmp_path / "no-config"
    empty.mkdir()
    with pytest.raises(InputError, match="config.json"):
        HFTextGenerator(str(empty))
    assert time.perf_counter() - t0 < 10



def test_resolve_model_path_never_builds_the_tiny_model(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The production path treats "tiny" like any other name; only a stage's explicit call
    (`locate_model`, which generators use for model="tiny") builds the test model."""
    from stages.models.generation.engines import locate_model

    monkeypatch.setenv("NEMO_WORK_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # and no ./tiny directory to find

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the tiny model was built")

    monkeypatch.setattr(tiny_models, "build_tiny_llava", refuse)
    monkeypatch.setattr(tiny_models, "build_tiny_causal_lm", refuse)
    for name in ("tiny", "TINY", " tiny "):
        with pytest.raises(InputError, match="no such directory"):
            resolve_model_path(name)
    assert not (tmp_path / ".cache").exists()
    for images in (True, False):
        with pytest.raises(AssertionError, match="tiny model was built"):
            locate_model("tiny", images)
