"""Tiny random test models, built in code: a LLaVA and a causal LM, with their tokenizers.

Same architectures and files as llava-1.5-7b-hf and a Llama chat model, scaled down, saved with
``save_pretrained`` and loaded back with ``from_pretrained`` -- the path real checkpoints take
-- so tests and the demo run the model stages offline in seconds (``model="tiny"``). A stage
asks for them explicitly (`is_tiny` then `tiny_model_dir`): the production resolution
(`stages.models.loading.resolve_model_path`) never builds one.

Built models are kept in ``$NEMO_WORK_DIR/.cache/tiny-llava`` (else a temp dir removed at
exit), built once per name (`build_once`) so concurrent processes never load a half-written
one. Bump a version below when its builder changes: the cached copies are rebuilt and the
request-cache identity (`tiny_identity`) changes with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.process_cache import process_cached
from stages.models.llava import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE

__all__ = ["TINY_CAUSAL_LM_VERSION", "TINY_LLAVA_VERSION", "build_once", "build_tiny_causal_lm",
           "build_tiny_llava", "build_tokenizer", "is_tiny", "tiny_causal_lm_dir",
           "tiny_identity", "tiny_llava_dir", "tiny_model_dir", "tiny_root"]

TINY_LLAVA_VERSION = 1  # bump when build_tiny_llava changes, so cached tiny models are rebuilt
TINY_CAUSAL_LM_VERSION = 1  # the same for build_tiny_causal_lm

_TOKENIZER_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_CAUSAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% else %}{{ message['role'].upper() + ': ' + message['content'] + ' ' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def is_tiny(model: str) -> bool:
    """Does `model` name the tiny test model (``"tiny"``, any case)?"""
    return str(model).strip().lower() == "tiny"


def tiny_identity(images: bool, seed: int = 0) -> str:
    """The tiny model's identity in request-cache keys: ``tiny-v<version>-seed<seed>``."""
    version = TINY_LLAVA_VERSION if images else TINY_CAUSAL_LM_VERSION
    return f"tiny-v{version}-seed{seed}"


def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: the prompt itself, answers and JSON punctuation."""
    from stages.text.view_prompts import EXAMPLES_JSON, Instance, build_prompt

    example = Instance(instance_id="123", category="person", bbox=(1, 2, 3, 4),
                       expressions=["left", "man", "Man"])
    answer = json.dumps({"123": {"appearance": "the man in a white shirt", "action": None,
                                 "spatial": "the man on the left", "appearance_alt": "x"}})
    return [
        build_prompt([example]), build_prompt([example], per_instance=True), answer,
        EXAMPLES_JSON, "USER: ASSISTANT: SYSTEM: {}[]\":,.0123456789 null true false",
        "the man woman person car tree dog cat left right front back middle top bottom",
    ]


def build_tokenizer(image_token: bool) -> Any:
    """A small byte-level BPE (any text encodes; decoding round-trips) with Llama's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _TOKENIZER_SPECIALS + ([IMAGE_TOKEN] if image_token else [])
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer)
    # Like Llama: prepend <s> to every encoded text (the LLaVA template has no bos_token).
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    kwargs: dict[str, Any] = {}
    if image_token:
        # Registers `tokenizer.image_token`, which LlavaProcessor reads.
        kwargs["extra_special_tokens"] = {"image_token": IMAGE_TOKEN}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", **kwargs,
    )


def _tiny_llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for a random init without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_llava(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random LLaVA (model + processor) to `out_dir`; deterministic for a seed.

    Same architecture and files as llava-1.5-7b-hf, scaled down: CLIP vision tower (32 px,
    8 px patches -> 16 image tokens, 2 layers, hidden 32), Llama text model (hidden 64, 2
    layers), a byte-level BPE tokenizer with ``<image>``, a CLIPImageProcessor, LLaVA-1.5's
    chat template, all combined in a LlavaProcessor.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(image_token=True)
    image_size, patch = 32, 8
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )
    n_image_tokens = (image_size // patch) ** 2  # CLS dropped by the "default" strategy
    config = LlavaConfig(
        vision_config=vision, text_config=_tiny_llama_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_image_tokens, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    with _seeded(seed):
        model = LlavaForConditionalGeneration(config)
    model.generation_config.do_sample = False
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_causal_lm(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama causal LM + tokenizer with a chat template to `out_dir`.

    For the text-augmentation stage's tests (attribute substitution, negation, ...), which use
    a text-only model through the same from_pretrained / apply_chat_template path.
    """
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(image_token=False)
    tokenizer.chat_template = _CAUSAL_CHAT_TEMPLATE
    with _seeded(seed):
        model = LlamaForCausalLM(_tiny_llama_config(tokenizer))
    model.generation_config.do_sample = False
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_root(cache_dir: Path | None = None) -> Path:
    """Where tiny models are kept: `cache_dir`, else ``$NEMO_WORK_DIR/.cache/tiny-llava``,
    else a temp dir of this process (removed at exit)."""
    if cache_dir is not None:
        return Path(cache_dir)
    work = os.environ.get("NEMO_WORK_DIR")
    if work:  # `~` expanded, as for the work dir itself
        return Path(work).expanduser() / ".cache" / "tiny-llava"
    scratch = process_cached("tiny.scratch", None,
                             lambda: tempfile.TemporaryDirectory(prefix="nemo-tiny-llava-"))
    return Path(scratch.name)


def build_once(root: Path, name: str, build: Callable[[Path], Any]) -> Path:
    """`root/name` built by `build(dir)` on first use, in a private directory renamed into
    place, so concurrent processes never see (or load) a half-written model."""
    final = root / name
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / f".build-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(scratch)
        try:
            os.rename(scratch, final)
        except OSError:
            if not (final / "config.json").is_file():  # not "someone else won the race"
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def tiny_llava_dir(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny LLaVA's directory (under `tiny_root`), built on first use."""
    return build_once(tiny_root(cache_dir), f"v{TINY_LLAVA_VERSION}-seed{seed}",
                      lambda d: build_tiny_llava(d, seed=seed))


def tiny_causal_lm_dir(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny causal LM's directory: the same place as the tiny LLaVA, its own name."""
    return build_once(tiny_root(cache_dir), f"causal-lm-v{TINY_CAUSAL_LM_VERSION}-seed{seed}",
                      lambda d: build_tiny_causal_lm(d, seed=seed))


def tiny_model_dir(images: bool, cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny model a stage asked for with ``model="tiny"``: the LLaVA when its requests
    carry images, else the causal LM."""
    return (tiny_llava_dir if images else tiny_causal_lm_dir)(cache_dir, seed)
