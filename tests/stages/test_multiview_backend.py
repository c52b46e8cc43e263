"""The multiview stage's model backends (hf, vllm): cache-first, resumable per image, through
the shared request loop; scripted generators, strict vLLM stand-ins and the tiny LLaVA."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from llm_stand_ins import ScriptedGenerator, schema_of
from llm_stand_ins import view_entry as _entry
from PIL import Image

from pipeline.errors import InputError
from stages import multiview
from stages.models.generation import engines
from stages.models.generation.answers import Answer
from stages.text.view_prompts import views_budget


def _use(monkeypatch: pytest.MonkeyPatch, generator: Any) -> None:
    """Make `generator` the model every backend call gets."""
    monkeypatch.setattr(engines, "get_generator", lambda *args, **kwargs: generator)


def _scene(tmp_path: Path) -> tuple[dict[int, list[dict[str, Any]]], dict[str, Any]]:
    """Two images with referents in the shape stages.multiview passes them."""
    images = tmp_path / "images"
    images.mkdir()
    by_image: dict[int, list[dict[str, Any]]] = {}
    for image_id, (w, h) in ((1, (64, 48)), (2, (40, 40))):
        Image.new("RGB", (w, h), (image_id * 60, 90, 30)).save(images / f"{image_id}.jpg")
        meta = {"image_id": image_id, "file_name": f"{image_id}.jpg", "width": w, "height": h}
        by_image[image_id] = [
            {"ref_id": 10 * image_id + k, "image_id": image_id, "ann_id": 100 * image_id + k,
             "category": "person", "bbox": [1.0, 2.0, 10.0, 20.0], "rle": None,
             "sentences": [f"person {k}", "someone"], "image": meta}
            for k in range(2)
        ]
    payload = {"image_ids": [1, 2], "images_dir": str(images),
               "cache": str(tmp_path / "cache" / "requests.sqlite")}
    return by_image, payload


def _params(**overrides: Any) -> SimpleNamespace:
    base = {"backend": "hf", "model": "tiny", "device": "cpu", "per_instance": False,
            "max_attempts": 2, "max_new_tokens": 8, "batch_size": 8}
    return SimpleNamespace(**{**base, **overrides})


def _answer(ann_ids: list[int], static: bool = False) -> str:
    return json.dumps({str(a): _entry(action=None, alt=f"alt {a}") if static else
                       _entry(appearance=f"look {a}") for a in ann_ids})


def test_run_model_backend_caches_every_finished_image(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    by_image, payload = _scene(tmp_path)
    # image 1 answers at once; image 2 is malformed, then its repair is static (no action)
    gen = ScriptedGenerator([_answer([100, 101]), "nope", _answer([200, 201], static=True)])
    _use(monkeypatch, gen)
    rows, failures, counts = multiview.run_model_backend(_params(), by_image, payload)
    assert counts == {"generated": 2, "cached": 0, "failure_reasons": {}} and failures == []
    assert [len(c["requests"]) for c in gen.calls] == [2, 1]  # both images in one batch
    by_ref = {(r["ref_id"], r["view"]): r for r in rows}
    assert len(rows) == 4 * 3  # three views per referent
    assert by_ref[(10, "appearance")]["text"] == "look 100"
    assert by_ref[(10, "action")]["attempts"] == 1
    assert by_ref[(21, "appearance_alt")]["text"] == "alt 201"
    assert by_ref[(21, "spatial")]["attempts"] == 2 and (21, "action") not in by_ref
    assert {r["model"] for r in rows} == {"tiny"} and {r["backend"] for r in rows} == {"hf"}
    # the prompt names every instance with the merged sentences of its referents
    assert 'instance id "100"' in gen.calls[0]["requests"][0][1]
    # rerun: everything comes from the cache, the generator is not called (nor loaded)
    monkeypatch.setattr(engines, "get_generator", lambda *a, **k: pytest.fail("model loaded"))
    again = multiview.run_model_backend(_params(), by_image, payload)
    assert again[2] == {"generated": 0, "cached": 2, "failure_reasons": {}}
    assert again[0] == rows and again[1] == []
    # a generation parameter that changes the output is part of the key
    _use(monkeypatch, ScriptedGenerator([_answer([100, 101]), _answer([200, 201])]))
    assert multiview.run_model_backend(_params(max_new_tokens=9), by_image, payload)[2] == {
        "generated": 2, "cached": 0, "failure_reasons": {}}


def test_run_model_backend_records_failures(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    by_image, payload = _scene(tmp_path)
    (Path(payload["images_dir"]) / "2.jpg").unlink()
    gen = ScriptedGenerator(["garbage", "still garbage"])
    _use(monkeypatch, gen)
    rows, failures, counts = multiview.run_model_backend(_params(), by_image, payload)
    assert rows == [] and counts["generated"] == 1 and counts["cached"] == 0
    assert counts["failure_reasons"] == {"invalid": 2, "unreadable_image": 2}
    bad_output, bad_image = failures
    assert bad_output["ann_ids"] == [100, 101] and bad_output["attempts"] == 2
    assert bad_output["reason"].startswith("invalid: attempt 2: no JSON object")
    assert bad_image["image_id"] == 2
    assert bad_image["reason"].startswith("unreadable_image: cannot read image")
    # the model failure is cached (not regenerated); the unreadable image is retried
    Image.new("RGB", (40, 40)).save(Path(payload["images_dir"]) / "2.jpg")
    gen2 = ScriptedGenerator([_answer([200, 201])])
    _use(monkeypatch, gen2)
    rows, failures, counts = multiview.run_model_backend(_params(), by_image, payload)
    assert (counts["generated"], counts["cached"]) == (1, 1) and len(gen2.calls) == 1
    assert [f["image_id"] for f in failures] == [1] and {r["image_id"] for r in rows} == {2}


def test_run_model_backend_with_the_tiny_model(tmp_path: Path, tiny_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    by_image, payload = _scene(tmp_path)
    payload["image_ids"] = [2]
    monkeypatch.setenv("NEMO_WORK_DIR", str(tmp_path / "work"))
    rows, failures, counts = multiview.run_model_backend(_params(max_attempts=1), by_image, payload)
    assert counts["generated"] == 1 and rows == []  # random weights write no JSON
    assert failures[0]["attempts"] == 1
    assert re.match(r"(invalid|truncated): attempt 1: ", failures[0]["reason"])
    assert (tmp_path / "work" / ".cache" / "tiny-llava").is_dir()
    assert counts["batch_sizes"] == {"1": 1} and counts["oom_retries"] == 0


def test_run_model_backend_auto_batch_and_hf_options(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`batch_size=auto` lets the generator size its batches (batch_size=None, many jobs per
    call); the hf options reach get_generator; a field the params lack has its default."""
    by_image, payload = _scene(tmp_path)
    gen = ScriptedGenerator([_answer([100, 101]), _answer([200, 201])])
    sizes: list[Any] = []
    real_generate = gen.generate

    def generate(requests: Any, max_new_tokens: Any = 256, batch_size: Any = 8,
                 **kwargs: Any) -> list[str]:
        sizes.append(batch_size)
        return real_generate(requests, max_new_tokens, batch_size, **kwargs)

    gen.generate = generate  # type: ignore[method-assign]
    seen: list[dict[str, Any]] = []

    def get_generator(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return gen

    monkeypatch.setattr(engines, "get_generator", get_generator)
    params = _params(batch_size="auto", cache_implementation="static", memory_gib=12.5)
    rows, failures, counts = multiview.run_model_backend(params, by_image, payload)
    assert counts["generated"] == 2 and len(rows) == 4 * 3
    assert sizes == [None] and [len(c["requests"]) for c in gen.calls] == [2]
    assert seen == [{"options": {"attn_implementation": "auto",
                                 "cache_implementation": "static", "sort_by_length": True,
                                 "memory_gib": 12.5}}]
    assert multiview.MultiviewParams().batch_size == "auto"


def test_run_model_backend_publishes_good_instances_and_counts_truncation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_image, payload = _scene(tmp_path)
    full = _answer([100, 101])
    cut = full[:full.index('"101"') + 15]  # image 1: 100 complete, cut off in 101
    bad = json.loads(_answer([200, 201]))
    bad["201"]["spatial"] = ""  # image 2: 201 invalid
    gen = ScriptedGenerator([Answer(cut, truncated=True), json.dumps(bad)])
    _use(monkeypatch, gen)
    rows, failures, counts = multiview.run_model_backend(_params(max_attempts=1), by_image, payload)
    assert {(r["ann_id"], r["view"]) for r in rows} == {
        (a, v) for a in (100, 200) for v in ("appearance", "action", "spatial")}
    assert [(f["image_id"], f["ann_ids"], f["reason"].split(":")[0]) for f in failures] == [
        (1, [101], "truncated"), (2, [201], "invalid")]
    assert counts["failure_reasons"] == {"truncated": 1, "invalid": 1}


def test_instances_from_refs_merges_referents_of_one_object() -> None:
    refs = [{"ann_id": 5, "category": "dog", "bbox": [0, 0, 1, 1], "sentences": ["dog", "pup"]},
            {"ann_id": 5, "category": "dog", "bbox": [0, 0, 1, 1], "sentences": ["pup", "left"]},
            {"ann_id": 6, "category": "cat", "bbox": [1, 1, 1, 1], "sentences": []}]
    insts = multiview.instances_from_refs(refs)
    assert [(i.instance_id, i.expressions) for i in insts] == [
        ("5", ["dog", "pup", "left"]), ("6", [])]


def test_check_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    multiview.check_backend("template", "anything")
    multiview.check_backend("hf", "tiny")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(InputError, match="cannot download"):
        multiview.check_backend("hf", "llava-hf/llava-1.5-7b-hf")
    with pytest.raises(InputError, match="unknown multiview backend"):
        multiview.check_backend("openai", "tiny")
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(InputError, match=r"nemo-pipe\[vllm\]"):
        multiview.check_backend("vllm", "tiny")
    assert engines.model_key("hf", "tiny") == "hf:tiny-v1-seed0"
    local = tmp_path / "my-llava"
    local.mkdir()
    (local / "config.json").write_text("{}")
    key = engines.model_key("vllm", str(local))  # path and the digest of its files
    assert re.fullmatch(rf"vllm:{re.escape(str(local.resolve()))}#[0-9a-f]{{16}}", key), key


def test_multiview_params_have_what_the_backend_reads() -> None:
    params = multiview.MultiviewParams()
    for name in ("backend", "model", "device", "per_instance", "max_attempts",
                 "max_new_tokens", "batch_size"):
        assert hasattr(params, name), name


def test_multiview_vllm_backend_end_to_end_with_strict_stand_ins(
        strict_vllm: tuple[type, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        fresh_generators: None) -> None:
    """run_model_backend -> get_generator -> VLLMGenerator -> SamplingParams of the installed
    shape; the stand-in answers exactly what the schema asks for, so every view is kept."""
    llm_cls, api = strict_vllm

    def respond(ids: list[int], sp: Any) -> tuple[str, str]:
        wanted = schema_of(sp, api)["required"]
        return _answer([int(i) for i in wanted]), "stop"

    llm_cls.respond = staticmethod(respond)
    monkeypatch.setenv("NEMO_WORK_DIR", str(tmp_path / "work"))
    by_image, payload = _scene(tmp_path)
    rows, failures, counts = multiview.run_model_backend(
        _params(backend="vllm", max_new_tokens=None), by_image, payload)
    assert failures == [] and len(rows) == 4 * 3 and counts["generated"] == 2
    assert [s["params"].max_tokens for s in llm_cls.instances[-1].seen] == [
        views_budget(2, engines.get_generator("vllm", "tiny", "cpu").count_tokens)] * 2

