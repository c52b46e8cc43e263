"""A model's identity in the stage keys and the request cache follows its files.

A local model directory was named by its path only, and the multiview and augment keys held
only the model's name: weights replaced in place (or a newer hub snapshot) served the old
model's views and edits from cache. The oracle is what changed on disk, by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.api import open_pipeline
from stages.models.generation.engines import model_key


def _model_dir(root: Path) -> Path:
    d = root / "my-llava"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llava"}')
    (d / "model.safetensors").write_bytes(b"\x00" * 4096)
    (d / "tokenizer.json").write_text("{}")
    return d


def _rewrite(path: Path, data: bytes, mtime_ns: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_local_model_is_named_by_its_files(tmp_path):
    d = _model_dir(tmp_path)
    first = model_key("hf", str(d))
    assert first.startswith(f"hf:{d.resolve()}#") and model_key("hf", str(d)) == first
    (d / ".cache").mkdir()
    (d / ".cache" / "lock").write_text("huggingface's download bookkeeping")
    assert model_key("hf", str(d)) == first  # dot-files are not the model
    weights = d / "model.safetensors"
    _rewrite(weights, b"\x01" + b"\x00" * 4095, weights.stat().st_mtime_ns + 10**9)  # same size
    replaced = model_key("hf", str(d))
    assert replaced != first
    (d / "chat_template.jinja").write_text("{{ messages }}")  # the template is the model too
    assert model_key("hf", str(d)) not in (first, replaced)
    assert model_key("hf", str(d), images=False).startswith("causal-lm:")


@pytest.mark.parametrize("stage, sets", [
    ("multiview", ["multiview.backend=hf"]),
    ("augment", ["augment.backend=llm", "augment.llm_engine=hf"]),
])
def test_replaced_weights_rebuild_the_stage(demo, tmp_path, stage, sets):
    d = _model_dir(tmp_path)
    section = stage
    base = [*sets, f"{section}.model={d}", "embed.model=tiny"]

    def key() -> str:
        pipe = open_pipeline("refcoco", tmp_path / "work", sets=base,
                             data_root=demo.refer_root, images=demo.images_dir, progress=False)
        return pipe.resolve(stage).key

    before = key()
    assert key() == before
    weights = d / "model.safetensors"
    _rewrite(weights, b"\x02" * 4096, weights.stat().st_mtime_ns + 10**9)
    assert key() != before


def test_an_unreadable_model_file_is_an_input_error(tmp_path, monkeypatch):
    """An OSError while hashing (no permission) was a traceback from `status`."""
    import pipeline.filehash as filehash
    from pipeline.errors import InputError

    d = _model_dir(tmp_path)

    def no_permission(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(filehash, "hash_file", no_permission)
    monkeypatch.setattr(filehash, "_PROCESS_DIGESTS", {})
    with pytest.raises(InputError, match=r"model directory .*cannot read .*Permission denied"):
        model_key("hf", str(d))
