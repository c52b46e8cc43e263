"""The vLLM generator (the optional `vllm` extra; a CUDA GPU): continuous batching, prefix
caching, JSON-schema decoding.

ONE generator, `VLLMGenerator`, builds the requests (`vllm_requests`: greedy sampling, one
``max_tokens`` per request capped by the context minus its prompt, the JSON schema under the
installed vLLM's name, `vllm_sampling_params`), calls ``LLM.generate`` once, reads
``finish_reason`` (`parse_vllm_outputs`: "length" is a truncated `Answer`) and restores request
order. Two thin specialisations say what a request is:

* `VLLMVisionGenerator`: an ``(image, prompt)`` pair; the prompt is the processor's chat
  template rendered as text (without a BOS the template wrote, since vLLM's tokenization adds
  one: `without_leading_bos`), the image padded to a square once per image, and the requests of
  one image sent next to each other so the prefix cache reuses its image tokens;
* `VLLMTextGenerator`: a prompt, sent as token ids (`chat_prompt_ids`: the chat template's
  text encoded once without added special tokens), so a template that writes BOS does not get
  a second one.

Written against vLLM 0.10.2 and later (``structured_outputs``); the older ``guided_decoding``
name is used where only it exists. Request building and output parsing work without vLLM
installed (tests use strict stand-ins, tests/fake_vllm.py).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from PIL import Image

from pipeline.errors import InputError
from stages.models.generation.answers import (
    Answer,
    GenerationStats,
    estimate_tokens,
    per_request,
)
from stages.models.generation.engines import locate_model, model_key
from stages.models.generation.hf_engine import chat_prompt_ids
from stages.models.hub import hf_offline
from stages.models.llava import conversation, image_token_count, llava_prompt, pad_to_square

__all__ = ["VLLMGenerator", "VLLMTextGenerator", "VLLMVisionGenerator", "image_prompts",
           "import_vllm", "parse_vllm_outputs", "vllm_requests", "vllm_sampling_params",
           "without_leading_bos"]

log = logging.getLogger(__name__)

_VLLM_HINT = ("vLLM is not installed: pip install nemo-pipe[vllm] (quoted in zsh: "
              "'nemo-pipe[vllm]'); it needs a CUDA GPU and pins its own torch, so use a separate "
              "environment. Or use the hf backend (multiview.backend=hf)")


def import_vllm() -> Any:
    """The `vllm` module, or an `InputError` naming the extra to install."""
    try:
        import vllm
    except ImportError as exc:
        raise InputError(f"{_VLLM_HINT} [{exc}]") from None
    return vllm


# --------------------------------------------------------------------------------------------
# requests and outputs as plain data (no vLLM needed)


def image_prompts(requests: Sequence[tuple[Image.Image, str]], *,
                  format_prompt: Callable[[str], str] = llava_prompt,
                  image_keys: Sequence[Hashable] | None = None,
                  fill: tuple[int, int, int] | Literal["average"] | None = None,
                  ) -> tuple[list[dict[str, Any]], list[Hashable]]:
    """vLLM ``TextPrompt``s with one image each, and each request's image key.

    Images are identified by `image_keys` (e.g. image ids) or else by object identity, and
    padded to a square once per image (the same padded object for every request of it).
    """
    keys = list(image_keys) if image_keys is not None else [id(img) for img, _ in requests]
    if len(keys) != len(requests):
        raise ValueError(f"{len(keys)} image_keys for {len(requests)} requests")
    padded: dict[Hashable, Image.Image] = {}
    inputs = []
    for (image, text), key in zip(requests, keys, strict=True):
        if key not in padded:
            padded[key] = pad_to_square(image, fill)[0]
        inputs.append({"prompt": format_prompt(text), "multi_modal_data": {"image": padded[key]}})
    return inputs, keys


def vllm_requests(inputs: Sequence[Mapping[str, Any]],
                  schema: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
                  *, max_new_tokens: int | Sequence[int] = 256,
                  group_keys: Sequence[Hashable] | None = None) -> list[dict[str, Any]]:
    """``LLM.generate`` inputs and sampling parameters as plain dicts.

    Each item is ``{"index": i, "inputs": inputs[i], "sampling_params": {...}}``, where
    `index` is the position in `inputs`. Requests of the same group (`group_keys`: their
    image) are made adjacent, in first-appearance order and stable within a group, so vLLM's
    prefix cache reuses what they share; without keys the order is kept. `schema` is one JSON
    schema for all requests or one per request (None: free text); it goes under
    ``"structured_outputs": {"json": schema}`` (vLLM >= 0.10.2 naming; `vllm_sampling_params`
    converts for older versions). `max_new_tokens` is one limit or one per request
    (``max_tokens``); greedy (temperature 0).
    """
    n = len(inputs)
    budgets = per_request(max_new_tokens, n)
    keys = list(group_keys) if group_keys is not None else list(range(n))
    if len(keys) != n:
        raise ValueError(f"{len(keys)} group_keys for {n} requests")
    if schema is None or isinstance(schema, Mapping):
        schemas: list[Mapping[str, Any] | None] = [schema] * n
    else:
        schemas = list(schema)
        if len(schemas) != n:
            raise ValueError(f"{len(schemas)} schemas for {n} requests")
    first_seen: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        first_seen.setdefault(key, i)
    out = []
    for i in sorted(range(n), key=lambda i: (first_seen[keys[i]], i)):
        params: dict[str, Any] = {"temperature": 0.0, "max_tokens": budgets[i]}
        if schemas[i] is not None:
            params["structured_outputs"] = {"json": dict(schemas[i])}  # type: ignore[arg-type]
        out.append({"index": i, "inputs": dict(inputs[i]), "sampling_params": params})
    return out


def parse_vllm_outputs(outputs: Sequence[Any],
                       stats: GenerationStats | None = None) -> list[Answer]:
    """Texts of vLLM ``RequestOutput``-like objects (``.outputs[0].text``), in order, as
    `Answer`s: truncated when ``.outputs[0].finish_reason == "length"`` (the max_tokens limit
    or the model's context was reached before the answer ended).

    Token counts (``.outputs[0].token_ids``, ``.prompt_token_ids``) go into `stats` when given,
    for tokens/s. A request with no completion yields "" (the task's parser then reports it).
    """
    texts = []
    for out in outputs:
        completions = getattr(out, "outputs", None) or []
        first = completions[0] if completions else None
        text = (getattr(first, "text", "") or "").strip() if first is not None else ""
        truncated = getattr(first, "finish_reason", None) == "length"
        texts.append(Answer(text, truncated=truncated))
        if stats is not None:
            stats.requests += 1
            stats.truncated += truncated
            stats.prompt_tokens += len(getattr(out, "prompt_token_ids", None) or [])
            if first is not None:
                stats.generated_tokens += len(getattr(first, "token_ids", None) or [])
    return texts


def without_leading_bos(text: str, tokenizer: Any) -> str:
    """`text` without a BOS its chat template wrote, when the tokenizer adds one itself.

    vLLM tokenizes a text prompt with the tokenizer's special tokens, so a template that writes
    BOS (``{{ bos_token }}...``) would give the model two; LLaVA-1.5's template writes none
    and is unchanged.
    """
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None or not text.startswith(bos):
        return text
    adds_bos = tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos_id]
    return text[len(bos):] if adds_bos else text


def vllm_sampling_params(vllm: Any, params: Mapping[str, Any]) -> Any:
    """vLLM SamplingParams from a plain dict, with the JSON schema under whichever name the
    installed vLLM uses: ``SamplingParams(structured_outputs=StructuredOutputsParams(json=...))``
    from vLLM 0.10.2 (vllm-project/vllm#22772), ``SamplingParams(guided_decoding=
    GuidedDecodingParams(json=...))`` before (that name was deprecated in 0.10.2 and removed in
    0.12.0, vllm-project/vllm#29326)."""
    params = dict(params)
    structured = params.pop("structured_outputs", None)
    sp = vllm.SamplingParams
    if structured is None:
        return sp(**params)
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:  # vLLM < 0.10.2
        from vllm.sampling_params import GuidedDecodingParams

        return sp(**params, guided_decoding=GuidedDecodingParams(**structured))
    return sp(**params, structured_outputs=StructuredOutputsParams(**structured))


def _max_model_len(llm: Any) -> int | None:
    """The engine's context (``LLM.model_config`` in newer vLLM, ``LLM.llm_engine.model_config``
    in 0.10), or None when neither is there."""
    for owner in (llm, getattr(llm, "llm_engine", None)):
        value = getattr(getattr(owner, "model_config", None), "max_model_len", None)
        if value:
            return int(value)
    return None


# --------------------------------------------------------------------------------------------
# the generator


class VLLMGenerator:
    """Greedy generation with vLLM (see the module docstring); `model` as for `HFGenerator`.

    `llm_kwargs` go to ``vllm.LLM`` (with ``enable_prefix_caching=True`` and `seed`).
    """

    supports_schema = True
    images: ClassVar[bool]

    def __init__(self, model: str, *, seed: int = 0, cache_dir: Path | None = None,
                 **llm_kwargs: Any) -> None:
        vllm = import_vllm()  # first: the most likely problem, and the cheapest check
        self.model_name = str(model)
        self.path, self.revision = locate_model(model, self.images, cache_dir=cache_dir,
                                                seed=seed)
        self._seed = seed
        self._vllm = vllm
        with hf_offline():
            self.llm = vllm.LLM(model=str(self.path), seed=seed, enable_prefix_caching=True,
                                **llm_kwargs)
        self.tokenizer: Any = None
        self.context = _max_model_len(self.llm)
        self.stats = GenerationStats()


    @functools.cached_property
    def cache_key(self) -> str:
        """The request cache's model key (`model_key`), computed on first use: for a local
        directory it reads the digest of its files (a stage passes its own key instead)."""
        return model_key("vllm", self.model_name, images=self.images, seed=self._seed)

    def _inputs(self, requests: Sequence[Any],
                ) -> tuple[list[dict[str, Any]], list[Hashable] | None, list[int | None]]:
        """(vLLM prompts, group keys or None, each prompt's length in tokens or None)."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` with the model's tokenizer (answer budgets); an estimate without."""
        if self.tokenizer is None:
            return estimate_tokens(text)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict[str, Any]:
        """JSON-able identity, for manifests and logs."""
        return {"backend": "vllm", "images": self.images, "model": self.model_name,
                "path": str(self.path), "revision": self.revision,
                "vllm": getattr(self._vllm, "__version__", None)}

    def generate(self, requests: list[Any], max_new_tokens: int | Sequence[int] = 256,
                 batch_size: int | None = 8,
                 schema: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
                 ) -> list[Answer]:
        """One greedy answer per request, in order (`batch_size` is vLLM's business: ignored).

        Each request's max_tokens is capped by the engine's context minus its prompt, when the
        prompt's length is known; vLLM also stops a request at its context itself
        (finish_reason "length"). Either way the answer is `truncated`.
        """
        del batch_size
        inputs, keys, lengths = self._inputs(requests)
        n = len(requests)
        budgets = per_request(max_new_tokens, n)
        schemas = (list(schema) if isinstance(schema, Sequence) else [schema] * n)
        # a prompt that fills the context leaves no room for an answer, and vLLM refuses it
        # for the whole call: such a request gets an empty, truncated answer without being
        # sent (a recorded `truncated` failure, as on the transformers path)
        full = {i for i, length in enumerate(lengths)
                if self.context is not None and length is not None and length >= self.context}
        if self.context is not None:
            budgets = [b if length is None else max(1, min(b, self.context - length))
                       for b, length in zip(budgets, lengths, strict=True)]
        result = [Answer("", truncated=i in full) for i in range(n)]
        self.stats.truncated += len(full)
        send = [i for i in range(n) if i not in full]
        if not send:
            return result
        items = vllm_requests([inputs[i] for i in send], [schemas[i] for i in send],
                              max_new_tokens=[budgets[i] for i in send],
                              group_keys=[keys[i] for i in send] if keys is not None else None)
        sampling = [vllm_sampling_params(self._vllm, it["sampling_params"]) for it in items]
        t0 = time.perf_counter()
        outputs = self.llm.generate([it["inputs"] for it in items], sampling, use_tqdm=False)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.batches += 1
        for item, text in zip(items, parse_vllm_outputs(outputs, self.stats), strict=True):
            result[send[item["index"]]] = text
        return result


class VLLMVisionGenerator(VLLMGenerator):
    """`VLLMGenerator` for an image-text model (LLaVA): requests are ``(image, prompt)``."""

    images = True

    def __init__(self, model: str, *, dtype: str = "auto", max_model_len: int = 4096,
                 gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 seed: int = 0, cache_dir: Path | None = None, **llm_kwargs: Any) -> None:
        super().__init__(model, seed=seed, cache_dir=cache_dir, dtype=dtype,
                         max_model_len=max_model_len,
                         gpu_memory_utilization=gpu_memory_utilization,
                         tensor_parallel_size=tensor_parallel_size,
                         limit_mm_per_prompt={"image": 1}, **llm_kwargs)
        self.context = self.context or int(max_model_len)
        self._format: Callable[[str], str] = llava_prompt
        self._image_tokens: int | None = None
        try:
            from transformers import AutoProcessor

            with hf_offline():
                processor = AutoProcessor.from_pretrained(self.path)
            self.tokenizer = getattr(processor, "tokenizer", None)
            self._image_tokens = image_token_count(processor)
            if getattr(processor, "chat_template", None):
                self._format = lambda p: without_leading_bos(processor.apply_chat_template(
                    conversation(None, p), add_generation_prompt=True), self.tokenizer)
        except Exception:  # no processor files: LLaVA-1.5's format is the right default
            log.warning("no processor chat template in %s; using LLaVA-1.5's format", self.path)

    def _inputs(self, requests: Sequence[Any],
                ) -> tuple[list[dict[str, Any]], list[Hashable] | None, list[int | None]]:
        inputs, keys = image_prompts(requests, format_prompt=self._format)
        lengths: list[int | None] = [None] * len(inputs)
        if self.tokenizer is not None and self._image_tokens is not None:
            # the prompt's text tokens, its <image> placeholder expanded to the image's tokens
            lengths = [len(self.tokenizer(it["prompt"])["input_ids"]) - 1 + self._image_tokens
                       for it in inputs]
        return inputs, keys, lengths


class VLLMTextGenerator(VLLMGenerator):
    """`VLLMGenerator` for a causal LM: requests are prompts, sent as token ids."""

    images = False

    def __init__(self, model: str, *, seed: int = 0, cache_dir: Path | None = None,
                 **llm_kwargs: Any) -> None:
        super().__init__(model, seed=seed, cache_dir=cache_dir, **llm_kwargs)
        with hf_offline():
            self.tokenizer = self.llm.get_tokenizer()

    def _inputs(self, requests: Sequence[Any],
                ) -> tuple[list[dict[str, Any]], list[Hashable] | None, list[int | None]]:
        ids = [chat_prompt_ids(self.tokenizer, p) for p in requests]
        return ([{"prompt_token_ids": [int(t) for t in x]} for x in ids], None,
                [len(x) for x in ids])
