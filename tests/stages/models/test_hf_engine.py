"""stages.models.generation.hf_engine: the transformers generator on the tiny LLaVA and the
tiny causal LM (batching, left padding, truncation, context caps, one load per process)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from llm_stand_ins import IDS, INSTANCES, MAN
from PIL import Image

from stages.models.generation.answers import is_truncated
from stages.models.generation.engines import get_generator
from stages.models.generation.hf_engine import HFTextGenerator
from stages.text.distractor_prompts import build_kind_prompt
from stages.text.view_prompts import build_prompt, generate_views

IMAGE = Image.new("RGB", (120, 90), (20, 40, 60))


def _requests() -> list[tuple[Image.Image, str]]:
    """Three requests whose prompts differ in length, so a batch needs padding."""
    return [
        (Image.new("RGB", (64, 40), (200, 30, 30)), build_prompt([MAN])),
        (Image.new("RGB", (30, 50), (30, 200, 30)), "Describe the man on the left."),
        (Image.new("RGB", (48, 48), (30, 30, 200)), build_prompt(INSTANCES, per_instance=True)),
    ]


def test_generate_batched_equals_unbatched(tiny: Any) -> None:
    reqs = _requests()
    batched = tiny.generate(reqs, max_new_tokens=6, batch_size=3)
    single = tiny.generate(reqs, max_new_tokens=6, batch_size=1)
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    assert batched == single
    # results come back in request order (batches are formed by prompt length internally)
    assert len(set(batched)) > 1
    assert [tiny.generate([r], max_new_tokens=6)[0] for r in reqs[::2]] == batched[::2]
    assert tiny.stats.generated_tokens > 0 and tiny.stats.tokens_per_second > 0


def test_first_step_logits_batched_match_unbatched(tiny: Any) -> None:
    import torch

    reqs = _requests()
    batched = tiny.first_step_logits(reqs, batch_size=3)
    single = tiny.first_step_logits(reqs, batch_size=1)
    assert batched.shape == (3, tiny.model.config.text_config.vocab_size)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    assert not torch.allclose(single[0], single[2], atol=1e-3)  # rows are distinguishable
    # the check has teeth: with right padding the padded rows continue from a pad token
    tiny.tokenizer.padding_side = "right"
    try:
        wrong = tiny.first_step_logits(reqs, batch_size=3)
    finally:
        tiny.tokenizer.padding_side = "left"
    assert (wrong - single).abs().max() > 1e-2


def test_generate_views_with_tiny_model_never_raises(tiny: Any) -> None:
    views, attempts, errors, failed = generate_views(tiny, IMAGE, INSTANCES, max_attempts=2,
                                                     max_new_tokens=8)
    assert views == {} and attempts == 2 and len(errors) == 2  # random weights: no JSON
    assert list(failed) == IDS
    assert all(re.match(r"(truncated|invalid): attempt 2: ", f) for f in failed.values())


def test_hf_truncation_eos_and_context_cap(tiny: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    req = [(IMAGE, "Describe the man.")]
    config = tiny.model.generation_config
    monkeypatch.setattr(config, "eos_token_id", None)  # never stops: every limit is reached
    before = tiny.stats.generated_tokens
    (a,) = tiny.generate(req, max_new_tokens=5)
    assert is_truncated(a) and tiny.stats.generated_tokens - before == 5
    # per-request limits in one batch: each answer is cut at its own limit
    before = tiny.stats.generated_tokens
    short, long = tiny.generate(req * 2, max_new_tokens=[2, 6], batch_size=2)
    assert tiny.stats.generated_tokens - before == 8 and short.truncated and long.truncated
    assert short == tiny.generate(req, max_new_tokens=2)[0]
    # the context caps the limit: prompt length + 3 positions leave 3 new tokens
    length = int(tiny._encode(req)["attention_mask"].sum())
    monkeypatch.setattr(tiny, "context", length + 3)
    before = tiny.stats.generated_tokens
    (c,) = tiny.generate(req, max_new_tokens=50)
    assert c.truncated and tiny.stats.generated_tokens - before == 3
    monkeypatch.setattr(tiny, "context", length)  # no room at all: empty, truncated
    assert tiny.generate(req, max_new_tokens=50) == [""] and tiny.stats.truncated >= 4
    monkeypatch.setattr(tiny, "context", None)
    # EOS within the limit: not truncated (make the model's first greedy token the EOS)
    import torch

    with torch.inference_mode():
        out = tiny.model.generate(**tiny._encode(req), max_new_tokens=1, do_sample=False,
                                  pad_token_id=tiny.tokenizer.pad_token_id)
    monkeypatch.setattr(config, "eos_token_id", int(out[0, -1]))
    (d,) = tiny.generate(req, max_new_tokens=5)
    assert d == "" and not is_truncated(d)


# --------------------------------------------------------------------------------------------
# the tiny causal LM


def test_tiny_model_loads_through_from_pretrained(tiny_lm: HFTextGenerator,
                                                  tiny_work: Path) -> None:
    from transformers import LlamaForCausalLM

    path = tiny_work / ".cache" / "tiny-llava" / "causal-lm-v1-seed0"
    assert tiny_lm.path == path and (path / "config.json").is_file()
    assert type(tiny_lm.model) is LlamaForCausalLM
    assert Path(tiny_lm.model.name_or_path) == path
    assert tiny_lm.cache_key == "causal-lm:tiny-v1-seed0"
    assert tiny_lm.tokenizer.padding_side == "left" and tiny_lm.has_chat_template
    assert tiny_lm.format_prompt("hi") == "<s>USER: hi ASSISTANT:"
    assert get_generator("hf", "tiny", "cpu", images=False) is tiny_lm  # one load per process


def test_tiny_model_batched_equals_one_by_one(tiny_lm: HFTextGenerator) -> None:
    prompts = [build_kind_prompt("negation", "man holding an umbrella", 2),
               build_kind_prompt("swap_color", "the man in red", 2), "short"]
    batched = tiny_lm.generate(prompts, max_new_tokens=12, batch_size=3)
    single = [tiny_lm.generate([p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single and all(isinstance(t, str) for t in batched)
    assert tiny_lm.generate([], max_new_tokens=4) == []

