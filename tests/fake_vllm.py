"""A strict stand-in for the `vllm` package, in the two API shapes nemo-pipe supports.

The real classes' argument names, copied from the vLLM source (vllm/sampling_params.py and
vllm/entrypoints/llm.py of vllm-project/vllm):

* ``api="new"`` (vLLM >= 0.10.2, vllm-project/vllm#22772): ``StructuredOutputsParams(json=,
  regex=, choice=, grammar=, json_object=, disable_any_whitespace=,
  disable_additional_properties=, whitespace_pattern=, structural_tag=)`` and
  ``SamplingParams(..., structured_outputs=)``; no ``GuidedDecodingParams`` (removed in 0.12.0,
  vllm-project/vllm#29326) and no ``guided_decoding``.
* ``api="old"`` (vLLM < 0.10.2): ``GuidedDecodingParams(json=, regex=, choice=, grammar=,
  json_object=, backend=, backend_was_auto=, disable_fallback=, disable_any_whitespace=,
  disable_additional_properties=, whitespace_pattern=, structural_tag=)`` and
  ``SamplingParams(..., guided_decoding=)``; no ``StructuredOutputsParams``.

Every class has an explicit signature, so an argument name the real class does not have is a
``TypeError`` here too (the old stand-ins took ``**kwargs`` and would not have caught the
``guided_decoding`` -> ``structured_outputs`` rename). `LLM` takes the named parameters of
``LLM.__init__`` plus the ``EngineArgs`` fields nemo-pipe passes through its ``**kwargs``
(``max_model_len``, ``enable_prefix_caching``, ``limit_mm_per_prompt``), and nothing else.

`LLM.generate` accepts only ``TextPrompt`` / ``TokensPrompt`` dicts and this module's
``SamplingParams``, tokenizes a text prompt WITH special tokens (as vLLM does) and records
the token ids the model would see in ``LLM.seen``; the answers come from ``LLM.respond``
(``(prompt ids, params) -> (text, finish_reason)``), by default an echo of the prompt's last
words with finish_reason "stop".
"""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

_TEXT_PROMPT_KEYS = {"prompt", "multi_modal_data", "mm_processor_kwargs", "cache_salt"}
_TOKENS_PROMPT_KEYS = {"prompt_token_ids", "token_type_ids", "multi_modal_data",
                       "mm_processor_kwargs", "cache_salt"}


@dataclasses.dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        set_ = [self.json, self.regex, self.choice, self.grammar, self.json_object,
                self.structural_tag]
        if sum(v is not None for v in set_) != 1:
            raise ValueError("exactly one kind of structured outputs constraint is needed")


@dataclasses.dataclass
class GuidedDecodingParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    backend_was_auto: bool = False
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


class _SamplingBase:
    def __init__(self, *, n: int = 1, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, seed: int | None = None,
                 stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False, max_tokens: int | None = 16, min_tokens: int = 0,
                 logprobs: int | None = None, prompt_logprobs: int | None = None,
                 detokenize: bool = True, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False,
                 logit_bias: dict[int, float] | None = None,
                 allowed_token_ids: list[int] | None = None,
                 extra_args: dict[str, Any] | None = None,
                 bad_words: list[str] | None = None) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed
        self.stop, self.stop_token_ids = stop, stop_token_ids


class NewSamplingParams(_SamplingBase):
    def __init__(self, *, structured_outputs: StructuredOutputsParams | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)  # explicit names only: _SamplingBase rejects the rest
        if structured_outputs is not None and not isinstance(structured_outputs,
                                                             StructuredOutputsParams):
            raise TypeError("structured_outputs must be a StructuredOutputsParams")
        self.structured_outputs = structured_outputs


class OldSamplingParams(_SamplingBase):
    def __init__(self, *, guided_decoding: GuidedDecodingParams | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if guided_decoding is not None and not isinstance(guided_decoding,
                                                          GuidedDecodingParams):
            raise TypeError("guided_decoding must be a GuidedDecodingParams")
        self.guided_decoding = guided_decoding


def _default_respond(ids: list[int], params: Any) -> tuple[str, str]:
    return f"echo of {len(ids)} tokens", "stop"


class FakeLLM:
    """vLLM's offline `LLM`, strict about its arguments; generation is scripted."""

    sampling_cls: type = NewSamplingParams
    respond: Callable[[list[int], Any], tuple[str, str]] = staticmethod(_default_respond)
    instances: list[FakeLLM] = []

    def __init__(self, model: str, *, runner: str = "auto", convert: str = "auto",
                 tokenizer: str | None = None, tokenizer_mode: str = "auto",
                 skip_tokenizer_init: bool = False, trust_remote_code: bool = False,
                 allowed_local_media_path: str = "", tensor_parallel_size: int = 1,
                 dtype: str = "auto", quantization: str | None = None,
                 revision: str | None = None, tokenizer_revision: str | None = None,
                 seed: int | None = 0, gpu_memory_utilization: float = 0.9,
                 swap_space: float = 4, cpu_offload_gb: float = 0,
                 enforce_eager: bool = False, hf_token: bool | str | None = None,
                 hf_overrides: dict[str, Any] | None = None,
                 mm_processor_kwargs: dict[str, Any] | None = None,
                 # EngineArgs fields nemo-pipe passes through LLM(**kwargs):
                 max_model_len: int | None = None, enable_prefix_caching: bool | None = None,
                 limit_mm_per_prompt: dict[str, int] | None = None) -> None:
        from transformers import AutoTokenizer

        self.model = model
        self.kwargs = {"seed": seed, "dtype": dtype, "max_model_len": max_model_len,
                       "enable_prefix_caching": enable_prefix_caching,
                       "limit_mm_per_prompt": limit_mm_per_prompt}
        self._tokenizer = AutoTokenizer.from_pretrained(model)
        # the real LLM: .llm_engine.model_config.max_model_len (and .model_config in newer ones)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(
            max_model_len=max_model_len or 2048))
        self.seen: list[dict[str, Any]] = []
        type(self).instances.append(self)

    def get_tokenizer(self) -> Any:
        return self._tokenizer

    def generate(self, prompts: Sequence[dict[str, Any]],
                 sampling_params: Any = None, *, use_tqdm: bool = True,
                 lora_request: Any = None, priority: list[int] | None = None,
                 ) -> list[SimpleNamespace]:
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError("one SamplingParams per prompt")
        outputs = []
        for prompt, sp in zip(prompts, params, strict=True):
            if not isinstance(sp, self.sampling_cls):
                raise TypeError(f"sampling_params must be {self.sampling_cls.__name__}, "
                                f"got {type(sp).__name__}")
            if "prompt_token_ids" in prompt:
                if set(prompt) - _TOKENS_PROMPT_KEYS or "prompt" in prompt:
                    raise TypeError(f"not a TokensPrompt: {sorted(prompt)}")
                ids = list(prompt["prompt_token_ids"])
            else:
                if set(prompt) - _TEXT_PROMPT_KEYS:
                    raise TypeError(f"not a TextPrompt: {sorted(prompt)}")
                ids = self._tokenizer(prompt["prompt"], add_special_tokens=True)["input_ids"]
            limit = self.llm_engine.model_config.max_model_len
            if len(ids) > limit:  # vLLM refuses the whole call, not only this request
                raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the "
                                 f"maximum model length of {limit}.")
            self.seen.append({"ids": ids, "params": sp, "prompt": prompt})
            text, finish = type(self).respond(ids, sp)
            n_new = len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
            outputs.append(SimpleNamespace(prompt_token_ids=ids, outputs=[SimpleNamespace(
                text=text, token_ids=list(range(n_new)), finish_reason=finish)]))
        return outputs


def install(monkeypatch: pytest.MonkeyPatch, api: str) -> type[FakeLLM]:
    """Put a fake `vllm` (and `vllm.sampling_params`) of API shape `api` in sys.modules;
    returns its `LLM` class (a fresh subclass: set ``respond`` on it, read ``instances``)."""
    if api not in ("new", "old"):
        raise ValueError(api)
    sampling_cls = NewSamplingParams if api == "new" else OldSamplingParams
    llm_cls = type("LLM", (FakeLLM,), {"sampling_cls": sampling_cls, "instances": []})
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.11.0" if api == "new" else "0.10.1"  # type: ignore[attr-defined]
    vllm.LLM = llm_cls  # type: ignore[attr-defined]
    vllm.SamplingParams = sampling_cls  # type: ignore[attr-defined]
    sp_module = types.ModuleType("vllm.sampling_params")
    sp_module.SamplingParams = sampling_cls  # type: ignore[attr-defined]
    if api == "new":
        sp_module.StructuredOutputsParams = StructuredOutputsParams  # type: ignore[attr-defined]
    else:
        sp_module.GuidedDecodingParams = GuidedDecodingParams  # type: ignore[attr-defined]
    vllm.sampling_params = sp_module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp_module)
    return llm_cls
