"""stages.models.tiny: the tiny test models, built in code and loaded back through the real
save_pretrained / from_pretrained path; built only when asked for explicitly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from stages.models import tiny as tiny_models
from stages.models.llava import CLIP_MEAN_RGB, llava_prompt


def _saved_to_loaded_key(key: str) -> str:
    """transformers 5 saves LLaVA in the original hub layout; the module tree is different."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    return "model." + key  # vision_tower.*, multi_modal_projector.*


def test_tiny_llava_files_and_loaded_weights(tiny_dir: Path, tiny: Any) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    assert type(tiny.model) is LlavaForConditionalGeneration
    assert type(tiny.model.config) is LlavaConfig
    assert isinstance(tiny.processor, LlavaProcessor)
    assert tiny.path == tiny_dir and tiny.dtype == torch.float32
    # the loaded parameters are exactly the saved ones (not a fresh random init)
    raw = load_file(tiny_dir / "model.safetensors")
    saved = {_saved_to_loaded_key(k): v for k, v in raw.items()}
    loaded = tiny.model.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # the processor wiring: 16 image tokens = (32 / 8)^2 patches, CLS dropped
    assert tiny.model.config.image_seq_length == 16
    ids = tiny.processor(images=[Image.new("RGB", (32, 32))], text=["USER: <image>\nhi"])
    assert ids["input_ids"][0].count(tiny.model.config.image_token_id) == 16
    assert tiny.tokenizer.padding_side == "left"
    assert tiny.fill == CLIP_MEAN_RGB  # from the processor's image_mean
    expected = "USER: <image>\nhello ASSISTANT:"
    assert tiny.format_prompt("hello") == llava_prompt("hello") == expected


def test_tiny_llava_is_deterministic_per_seed(tmp_path: Path, tiny_dir: Path) -> None:
    from safetensors.torch import load_file

    again = tiny_models.build_tiny_llava(tmp_path / "again", seed=0)
    other = tiny_models.build_tiny_llava(tmp_path / "other", seed=1)
    ref = load_file(tiny_dir / "model.safetensors")
    same, diff = load_file(again / "model.safetensors"), load_file(other / "model.safetensors")
    assert all(ref[k].equal(same[k]) for k in ref)
    assert not all(ref[k].equal(diff[k]) for k in ref)
    assert (again / "tokenizer.json").read_text() == (tiny_dir / "tokenizer.json").read_text()
    # and the cache reuses the built directory
    assert tiny_models.tiny_llava_dir(tiny_dir.parent, seed=0) == tiny_dir


def test_tiny_causal_lm_loads_back_and_generates(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = tiny_models.build_tiny_causal_lm(tmp_path / "lm", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model) is LlamaForCausalLM
    messages = [{"role": "user", "content": 'Negate: "the man holding an umbrella"'}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == '<s>USER: Negate: "the man holding an umbrella" ASSISTANT:'
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert inputs["input_ids"][0].tolist().count(tokenizer.bos_token_id) == 1
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert len(new) == 5 and isinstance(tokenizer.decode(new, skip_special_tokens=True), str)


def test_tiny_cache_goes_under_nemo_work_dir(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("NEMO_WORK_DIR", str(tmp_path))
    assert tiny_models.tiny_root(None) == tmp_path / ".cache" / "tiny-llava"
    assert tiny_models.tiny_root(tmp_path / "x") == tmp_path / "x"

