from __future__ import annotations

from pathlib import Path

import pytest

# Fixtures of the LLM tests (tiny models, strict vLLM stand-ins): tests/llm_stand_ins.py.
pytest_plugins = ["llm_stand_ins"]

DATASETS = ["refcoco", "refcoco+", "refcocog-umd", "refcocog-google", "grefcoco"]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The synthetic REFER-format data, written once per test session (read-only for tests)."""
    from stages.refer.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", n_images=40, seed=0)


@pytest.fixture
def work(tmp_path) -> Path:
    return tmp_path / "work"


@pytest.fixture
def toy_log(tmp_path, monkeypatch):
    """The file the toy stages (tests/toy_stages.py) append one line per shard call to."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("TOY_LOG", str(log))
    return log
