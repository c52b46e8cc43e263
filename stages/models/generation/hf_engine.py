"""The transformers generator: greedy, batched with left padding, cut at each request's limit.

ONE generator, `HFGenerator`, holds everything a transformers model needs to answer a batch of
requests -- offline loading, device and dtype, attention and KV-cache implementation, batches
sorted by prompt length (less padding; optional, the answers are the same) and LEFT padded (a
decoder-only model continues from the last position of each row, which must be the prompt's
last token, not a pad), batch sizes from a memory estimate with a retry at half the batch after
an out-of-memory (`stages.models.generation.batching`), one `generate` per batch with each row
cut at its own limit (`greedy_generate`), answers in request order, running stats. Two thin
specialisations say what a request is and how it is encoded:

* `HFVisionGenerator`: an ``(image, prompt)`` pair for an image-text-to-text model (LLaVA);
  the image is padded to a square, the model's own chat template applied through its
  processor;
* `HFTextGenerator`: a prompt for a causal LM; the tokenizer's chat template (one user turn)
  writes the special tokens, so they are not added again.

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.errors import InputError
from stages.models.generation.answers import (
    Answer,
    GenerationStats,
    context_length,
    per_request,
)
from stages.models.generation.batching import AUTO_BATCH_CAP, Batcher
from stages.models.generation.engines import locate_model, model_key
from stages.models.generation.memory import MemoryShape, weight_bytes
from stages.models.llava import (
    CLIP_MEAN_RGB,
    LLAVA_CHAT_TEMPLATE,
    conversation,
    image_token_count,
    pad_to_square,
)
from stages.models.loading import load_local_pretrained, resolve_device, resolve_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["ATTN_IMPLEMENTATIONS", "CACHE_IMPLEMENTATIONS", "HFGenerator", "HFTextGenerator",
           "HFVisionGenerator", "chat_prompt_ids", "chat_text", "greedy_generate"]

# `auto`: transformers' own choice, SDPA wherever the model supports it (else eager).
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
# `static`: the KV cache is allocated once at its final size (no growth, no fragments).
CACHE_IMPLEMENTATIONS = ("dynamic", "static")

log = logging.getLogger(__name__)


def _eos_ids(model: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


def greedy_generate(model: Any, tokenizer: Any, inputs: Any,
                    max_new_tokens: int | Sequence[int], stats: GenerationStats, torch: Any,
                    pad_id: int, context: int | None = None,
                    **generate_kwargs: Any) -> list[Answer]:
    """One greedy `generate` call on a left-padded batch: only the new text, stripped, and the
    call's requests, tokens and seconds added to `stats`.

    `max_new_tokens` is one limit or one per row; each row's limit is also capped by
    `context` minus its prompt length. The call generates up to the largest limit; a row's
    answer is cut at its own limit (greedy decoding: the same tokens as a call with that
    limit) and is `truncated` when no EOS came within it. `generate_kwargs` go to
    ``model.generate`` (``cache_implementation``).
    """
    n = int(inputs["input_ids"].shape[0])
    budgets = per_request(max_new_tokens, n)
    if context is not None:
        lengths = [int(x) for x in inputs["attention_mask"].sum(dim=1).tolist()]
        budgets = [max(0, min(b, context - length)) for b, length in zip(budgets, lengths,
                                                                           strict=True)]
    limit = max(budgets, default=0)
    t0 = time.perf_counter()
    if limit > 0:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=limit, do_sample=False,
                                 num_beams=1, pad_token_id=pad_id, **generate_kwargs)
        rows = out[:, inputs["input_ids"].shape[1]:].tolist()
    else:  # every prompt fills the context: nothing can be generated
        rows = [[] for _ in range(n)]
    stats.seconds += time.perf_counter() - t0
    stats.batches += 1
    stats.requests += n
    stats.prompt_tokens += int(inputs["attention_mask"].sum())
    eos = _eos_ids(model)
    answers = []
    for row, budget in zip(rows, budgets, strict=True):
        row = row[:budget]
        stop = next((k for k, tok in enumerate(row) if tok in eos), None)
        tokens = row if stop is None else row[:stop]
        stats.generated_tokens += len(tokens) + (stop is not None)
        stats.truncated += stop is None
        answers.append(Answer(tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                              truncated=stop is None))
    return answers


def chat_text(tokenizer: Any, prompt: str) -> tuple[str, bool]:
    """``(text, add_special_tokens)`` of one user turn: the chat template's rendering, which
    writes its own special tokens (BOS) and so must be encoded without adding them again, or
    the prompt itself, to be encoded with them, when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt, True
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False), False


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids the model sees for `prompt` (`chat_text`, encoded once): what the HF
    text engine feeds and what the vLLM text engine passes as ``{"prompt_token_ids": ...}``,
    so a template that writes BOS does not get a second one from tokenization."""
    text, specials = chat_text(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=specials)["input_ids"])


class HFGenerator:
    """Greedy batched generation with a transformers model (see the module docstring).

    `model`: ``"tiny"`` (the tiny test model of this kind, built locally and loaded back with
    ``from_pretrained``), a local directory written by ``save_pretrained``, or a hub id already
    in the local Hugging Face cache; anything else is an `InputError` before any loading
    (offline, no network wait). `device`: auto, cpu, cuda, cuda:N; `dtype`: auto (bf16/fp16 on
    CUDA, fp32 on CPU), float32, bfloat16, float16. `attn_implementation`: one of
    `ATTN_IMPLEMENTATIONS`; `cache_implementation`: one of `CACHE_IMPLEMENTATIONS`;
    `sort_by_length`: batch requests of similar prompt length together (less padding, the
    same answers); `memory_gib`: the memory budget batches are sized for (None: the free CUDA
    memory, or the host's available RAM on CPU).
    """

    supports_schema = False  # no structured decoding here: per-item validation + repair
    images: ClassVar[bool]  # requests are (image, prompt) pairs, else prompts
    what: ClassVar[str]  # what is loaded, for the load error
    oom_fix: ClassVar[str]  # what to change when one request does not fit (config names)

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", *,
                 cache_dir: Path | None = None, seed: int = 0,
                 attn_implementation: str = "auto", cache_implementation: str = "dynamic",
                 sort_by_length: bool = True, memory_gib: float | None = None) -> None:
        self.model_name = str(model)
        _check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
        _check_choice("cache_implementation", cache_implementation, CACHE_IMPLEMENTATIONS)
        if memory_gib is not None and not float(memory_gib) > 0:
            raise InputError(f"memory_gib must be > 0 or null (got {memory_gib!r})")
        # a missing model fails here, before torch and transformers are even imported
        self.path, self.revision = locate_model(model, self.images, cache_dir=cache_dir,
                                                seed=seed)
        import torch

        self._seed = seed
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.processor, self.model = load_local_pretrained(
            self.what, model, self.path, *self._auto_classes(), self.dtype, self.device,
            None if attn_implementation == "auto" else attn_implementation)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.stats = GenerationStats()
        self.context = context_length(self.model)
        self.cache_implementation = cache_implementation
        self.sort_by_length = bool(sort_by_length)
        self.batcher = Batcher(
            _memory_shape(self.model, self.dtype), weight_bytes(self.model), self.device,
            memory_gib=memory_gib, attn_implementation=self.attn_implementation,
            cache_implementation=cache_implementation, what=f"{self.what} {model}",
            fix=self.oom_fix)
        self._torch = torch

    # -- what a specialisation says ------------------------------------------------------------

    @functools.cached_property
    def cache_key(self) -> str:
        """The request cache's model key (`model_key`), computed on first use: for a local
        directory it reads the digest of its files (a stage passes its own key instead)."""
        return model_key("hf", self.model_name, images=self.images, seed=self._seed)

    def _auto_classes(self) -> tuple[Any, Any]:
        """(processor or tokenizer class, model class) to load with."""
        raise NotImplementedError

    def prompt_lengths(self, requests: Sequence[Any]) -> list[int]:
        """Each request's prompt length in tokens, as the model sees it (image tokens
        included): to sort batches by and to size them."""
        raise NotImplementedError

    def _encode(self, batch: Sequence[Any]) -> Any:
        """The left-padded model inputs of a batch of requests, on the device."""
        raise NotImplementedError

    def format_prompt(self, prompt: str) -> str:
        """The text the model sees for `prompt` (chat-formatted)."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    @property
    def attn_implementation(self) -> str:
        """The attention implementation the loaded model runs (``sdpa``, ``eager``, ...)."""
        config = getattr(self.model, "config", None)
        text = getattr(config, "text_config", None) or config
        return str(getattr(text, "_attn_implementation", None) or "eager")

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` with this model's tokenizer (no special tokens): answer budgets."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict[str, Any]:
        """JSON-able identity, for manifests and logs."""
        return {"backend": "hf", "images": self.images, "model": self.model_name,
                "path": str(self.path), "revision": self.revision,
                "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "attn_implementation": self.attn_implementation,
                "cache_implementation": self.cache_implementation,
                "sort_by_length": self.sort_by_length, "memory_gib": self.batcher.memory_gib}

    def set_runtime(self, *, cache_implementation: str | None = None,
                    sort_by_length: bool | None = None) -> None:
        """Change the generate-time options of the loaded model (a benchmark compares them
        without loading it again); the attention implementation is fixed at load."""
        if cache_implementation is not None:
            _check_choice("cache_implementation", cache_implementation, CACHE_IMPLEMENTATIONS)
            self.cache_implementation = cache_implementation
            self.batcher.cache_implementation = cache_implementation
        if sort_by_length is not None:
            self.sort_by_length = bool(sort_by_length)

    def _run(self, requests: Sequence[Any], batch_size: int | None, budgets: Sequence[int],
             step: Callable[[Any, list[int]], list[Any]]) -> list[Any]:
        """Apply `step(inputs, request indices)` to consecutive batches (by prompt length when
        `sort_by_length`), sized by `Batcher` for `budgets` new tokens per request, at most
        `batch_size` (None: `AUTO_BATCH_CAP`); results in request order."""
        cap = AUTO_BATCH_CAP if batch_size is None else int(batch_size)
        if cap < 1:
            raise ValueError("batch_size must be >= 1")
        if not requests:
            return []
        lengths = self.prompt_lengths(requests)
        if self.context is not None:  # what greedy_generate will allow each row
            budgets = [max(0, min(b, self.context - n)) for b, n in zip(budgets, lengths,
                                                                         strict=True)]
        order = (sorted(range(len(requests)), key=lengths.__getitem__) if self.sort_by_length
                 else list(range(len(requests))))

        def call(idx: list[int]) -> list[Any]:
            return step(self._encode([requests[i] for i in idx]), idx)

        return self.batcher.run(order, lengths, budgets, cap, call, self.stats)

    def _generate_kwargs(self) -> dict[str, Any]:
        return ({} if self.cache_implementation == "dynamic"
                else {"cache_implementation": self.cache_implementation})

    def generate(self, requests: list[Any], max_new_tokens: int | Sequence[int] = 256,
                 batch_size: int | None = 8) -> list[Answer]:
        """One greedy answer per request, in order; only the new text is returned.

        `max_new_tokens`: one limit or one per request, each capped by the model's context
        minus the request's prompt; an answer that hits its limit is `truncated`.
        `batch_size`: the most requests per `generate` call (None: as many as memory allows,
        up to `AUTO_BATCH_CAP`); fewer when the memory estimate or an out-of-memory says so.
        """
        budgets = per_request(max_new_tokens, len(requests))
        pad_id = self.tokenizer.pad_token_id
        kwargs = self._generate_kwargs()

        def step(inputs: Any, idx: list[int]) -> list[Answer]:
            return greedy_generate(self.model, self.tokenizer, inputs,
                                   [budgets[i] for i in idx], self.stats, self._torch, pad_id,
                                   self.context, **kwargs)

        return self._run(requests, batch_size, budgets, step)

    def first_step_logits(self, requests: list[Any], batch_size: int | None = 8) -> torch.Tensor:
        """Logits of the first generated position, one row per request (float32, CPU).

        Computed by `generate` itself (``output_logits``), i.e. with its own attention mask
        and position ids; used to check that batching (left padding) does not change results.
        """
        torch = self._torch
        kwargs = self._generate_kwargs()

        def step(inputs: Any, idx: list[int]) -> list[torch.Tensor]:
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs, max_new_tokens=1, do_sample=False, num_beams=1,
                    pad_token_id=self.tokenizer.pad_token_id, output_logits=True,
                    return_dict_in_generate=True, **kwargs,
                )
            return list(out.logits[0].float().cpu())

        return torch.stack(self._run(requests, batch_size, [1] * len(requests), step))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}: use {', '.join(choices)}")


def _memory_shape(model: Any, dtype: Any) -> MemoryShape | None:
    """The model's `MemoryShape`, or None (no memory-based sizing) for a config without the
    usual decoder fields."""
    try:
        return MemoryShape.from_config(model.config, dtype.itemsize)
    except (AttributeError, TypeError, ValueError):
        log.warning("cannot read the decoder's shape from %s's config: batches are not "
                    "sized by memory", type(model).__name__)
        return None


class HFVisionGenerator(HFGenerator):
    """`HFGenerator` for an image-text-to-text model (LLaVA): requests are ``(image, prompt)``.

    Images are padded to a square with the processor's own mean (LLaVA-1.5's `expand2square`);
    a processor without a chat template gets LLaVA-1.5's.
    """

    images = True
    what = "model"
    oom_fix = "lower multiview.max_new_tokens or use a smaller model/dtype"

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto",
                 **options: Any) -> None:
        super().__init__(model, device, dtype, **options)
        if getattr(self.processor, "chat_template", None) is None:
            log.warning("%s has no chat template; using LLaVA-1.5's", model)
            self.processor.chat_template = LLAVA_CHAT_TEMPLATE
        mean = getattr(getattr(self.processor, "image_processor", None), "image_mean", None)
        self.fill: tuple[int, int, int] = (
            tuple(int(x * 255) for x in mean[:3]) if mean else CLIP_MEAN_RGB  # type: ignore[assignment]
        )
        # tokens one (square) image takes in a prompt; its placeholder counts 1 when unknown
        self.image_tokens = image_token_count(self.processor) or 1

    def _auto_classes(self) -> tuple[Any, Any]:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        return AutoProcessor, AutoModelForImageTextToText

    def format_prompt(self, prompt: str) -> str:
        """The chat-formatted text for one (image, prompt) request, image placeholder included."""
        return self.processor.apply_chat_template(conversation(None, prompt),
                                                  add_generation_prompt=True)

    def prompt_lengths(self, requests: Sequence[Any]) -> list[int]:
        # the chat text with one <image> placeholder, which the processor expands
        texts = [self.format_prompt(text) for _, text in requests]
        return [len(ids) - 1 + self.image_tokens for ids in self.tokenizer(texts)["input_ids"]]

    def _encode(self, batch: Sequence[Any]) -> Any:
        conversations = [conversation(pad_to_square(img, self.fill)[0], text)
                         for img, text in batch]
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True},
        )
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs


class HFTextGenerator(HFGenerator):
    """`HFGenerator` for a causal LM: requests are prompts, sent as one user turn of the
    tokenizer's chat template when it has one (else as they are)."""

    images = False
    what = "causal LM"
    oom_fix = "use a smaller model (augment.model) or dtype"

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _auto_classes(self) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoTokenizer, AutoModelForCausalLM

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "chat_template": self.has_chat_template}

    def format_prompt(self, prompt: str) -> str:
        """The chat template's user turn + generation prompt, or the prompt itself when the
        tokenizer has no template."""
        return chat_text(self.tokenizer, prompt)[0]

    def prompt_lengths(self, requests: Sequence[Any]) -> list[int]:
        texts = [self.format_prompt(p) for p in requests]
        return [len(ids) for ids in self.tokenizer(
            texts, add_special_tokens=not self.has_chat_template)["input_ids"]]

    def _encode(self, batch: Sequence[Any]) -> Any:
        # A chat template writes its own special tokens (bos); do not add them twice.
        inputs = self.tokenizer([self.format_prompt(p) for p in batch], return_tensors="pt",
                                padding=True, add_special_tokens=not self.has_chat_template)
        return inputs.to(self.device)
