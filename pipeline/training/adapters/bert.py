"""The BERT language side that LAVT and ReLA share: tokenizer loading and their id padding."""

from __future__ import annotations

import os
from typing import Any


def load_hf_tokenizer(spec: Any) -> Any:
    """A Hugging Face tokenizer from an object (returned as is) or a local dir / hub name.

    Strings go to ``AutoTokenizer.from_pretrained`` (any HF tokenizer directory), falling back
    to ``BertTokenizer.from_pretrained`` (what LAVT and ReLA call) for a bare ``vocab.txt`` dir.
    """
    if not isinstance(spec, (str, os.PathLike)):
        if not callable(getattr(spec, "encode", None)):
            raise TypeError(
                f"tokenizer must be a Hugging Face tokenizer (with .encode) or a path/name, "
                f"got {type(spec).__name__}"
            )
        return spec
    from transformers import AutoTokenizer, BertTokenizer

    name = os.fspath(spec)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as auto_exc:  # noqa: BLE001 - retried below, re-raised if that fails too
        try:
            return BertTokenizer.from_pretrained(name)
        except Exception:  # noqa: BLE001
            raise auto_exc from None


def bert_encode_padded(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """LAVT / ReLA language preprocessing (identical in both repositories).

    ``tokenizer.encode(text=..., add_special_tokens=True)`` ([CLS] ... [SEP]), cut to the
    first ``max_tokens`` ids WITHOUT re-appending [SEP] (their plain slice), zero-padded;
    the attention mask is 1 on every kept id (incl. [CLS]/[SEP]) and 0 on padding.
    """
    input_ids = list(tokenizer.encode(text=text, add_special_tokens=True))[:max_tokens]
    padded = [0] * max_tokens
    attention = [0] * max_tokens
    padded[: len(input_ids)] = input_ids
    attention[: len(input_ids)] = [1] * len(input_ids)
    return padded, attention


class LazyHFTokenizer:
    """Lazy Hugging Face tokenizer (loaded on first use, so construction needs no network)."""

    _tokenizer_spec: Any
    _tokenizer: Any

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_hf_tokenizer(self._tokenizer_spec)
        return self._tokenizer

