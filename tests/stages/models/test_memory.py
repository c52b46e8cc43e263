"""stages.models.generation.memory: the batch memory estimate, checked against hand-computed
figures for a LLaVA-1.5-7B-shaped config and the tiny LLaVA, and its fitting against brute
force."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from pipeline.errors import InputError
from stages.models.generation import memory
from stages.models.generation.memory import (
    FIXED_OVERHEAD,
    GenerationMemoryError,
    MemoryShape,
    available_bytes,
    estimate_bytes,
    fit_batch,
    is_out_of_memory,
    row_bytes,
)

GIB = 2**30


def llava_7b_config() -> object:
    """llava-hf/llava-1.5-7b-hf's text side (Llama-2-7B) inside a LlavaConfig."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096)
    return LlavaConfig(vision_config=CLIPVisionConfig(), text_config=text)


@pytest.fixture(scope="module")
def shape_7b() -> MemoryShape:
    return MemoryShape.from_config(llava_7b_config(), dtype_bytes=2)


def test_llava_7b_kv_cache_by_hand(shape_7b: MemoryShape) -> None:
    assert (shape_7b.layers, shape_7b.kv_heads, shape_7b.head_dim) == (32, 32, 128)
    # K and V x 32 layers x 4096 (= 32 heads x 128) x 2 bytes (fp16)
    assert shape_7b.kv_bytes_per_token == 2 * 32 * 4096 * 2 == 524_288
    parts = row_bytes(shape_7b, 1641, 160, "sdpa", "static")
    assert parts["kv"] == 1801 * 524_288 == 944_242_688
    assert parts["kv_growth"] == 0  # a static cache does not grow
    # one layer's prefill: 1641 tokens x (6 x 4096 + 3 x 11008) x 2 bytes
    assert parts["activations"] == 1641 * (6 * 4096 + 3 * 11008) * 2 == 189_043_200
    assert parts["attention"] == 0  # SDPA never holds the score matrices
    assert parts["mask"] == 1641 * 1801
    assert parts["logits"] == 32064 * 4
    dynamic = row_bytes(shape_7b, 1641, 160, "sdpa", "dynamic")
    assert dynamic["kv_growth"] == 944_242_688 // 2
    # eager attention: 32 heads x 1641^2 scores, fp16 and again fp32 for the softmax
    eager = row_bytes(shape_7b, 1641, 160, "eager", "static")
    assert eager["attention"] == 32 * 1641 * 1641 * (2 + 4) == 517_033_152


def test_estimate_adds_weights_rows_with_margin_and_overhead(shape_7b: MemoryShape) -> None:
    per_row = 944_242_688 + 189_043_200 + 1641 * 1801 + 32064 * 4
    weights = 7_063_427_072 * 2  # LLaVA-1.5-7B's parameters in fp16
    assert estimate_bytes(shape_7b, 48, 1641, 160, weights, "sdpa", "static") == (
        weights + -(-48 * per_row * 12 // 10) + 512 * 2**20)
    with pytest.raises(ValueError):
        estimate_bytes(shape_7b, 0, 10, 10)


def test_h200_figures(shape_7b: MemoryShape) -> None:
    """The measured H200 case (benchmarks/RESULTS-gpu-baseline.md): batch 48 ran, 96 ran out
    of memory with the default dynamic cache. The estimate keeps the batch between the two."""
    available, weights = int(139.5 * GIB), int(13.5 * GIB)
    dynamic = fit_batch(shape_7b, available, 1641, 160, 512, weights)
    assert 48 <= dynamic < 96
    static = fit_batch(shape_7b, available, 1641, 160, 512, weights, "sdpa", "static")
    eager = fit_batch(shape_7b, available, 1641, 160, 512, weights, "eager", "dynamic")
    assert eager < dynamic < static  # eager holds the scores; static has no fragments


def test_tiny_llava_shape_by_hand(tiny_dir) -> None:
    from transformers import AutoConfig

    shape = MemoryShape.from_config(AutoConfig.from_pretrained(tiny_dir), dtype_bytes=4)
    # tiny Llama: 2 layers, 2 KV heads (grouped-query) of 64 / 4 = 16 dims, fp32
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.heads) == (2, 2, 16, 4)
    assert shape.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4 == 512
    parts = row_bytes(shape, 100, 20, "eager", "dynamic")
    assert parts == {"kv": 120 * 512, "kv_growth": 60 * 512,
                     "activations": 100 * (6 * 64 + 3 * 128) * 4,
                     "attention": 4 * 100 * 100 * 8, "mask": 100 * 120, "logits": 640 * 4}


@pytest.mark.parametrize("attn,cache", [("sdpa", "dynamic"), ("eager", "static")])
def test_fit_batch_is_the_largest_fitting_batch(shape_7b: MemoryShape, attn: str,
                                                cache: str) -> None:
    weights = 14 * GIB
    for available in (weights, weights + GIB, 40 * GIB, 80 * GIB, int(139.5 * GIB)):
        brute = max((b for b in range(1, 300) if estimate_bytes(
            shape_7b, b, 1641, 160, weights, attn, cache) <= available), default=0)
        assert fit_batch(shape_7b, available, 1641, 160, 299, weights, attn, cache) == brute
    assert fit_batch(shape_7b, None, 1641, 160, 17, weights) == 17  # no limit: the cap
    assert fit_batch(shape_7b, 10**15, 1641, 160, 17, weights) == 17
    assert fit_batch(shape_7b, weights + FIXED_OVERHEAD, 1641, 160, 8, weights) == 0
    with pytest.raises(ValueError):
        fit_batch(shape_7b, GIB, 1, 1, 0)


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not torch's
    error = GenerationMemoryError("x")
    assert isinstance(error, InputError) and error.exit_code == 2


def test_available_bytes_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert available_bytes(cpu, 1.5, resident=123) == int(1.5 * GIB)  # a budget is the budget
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=5 * GIB))
    assert available_bytes(cpu, None, resident=GIB) == 6 * GIB
    monkeypatch.setitem(sys.modules, "psutil", None)  # no psutil: no limit
    assert available_bytes(cpu, None) is None
    assert available_bytes(cpu, 2) == 2 * GIB


def test_available_bytes_on_cuda_counts_the_allocators_unused_blocks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * GIB, 140 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 14 * GIB)
    assert available_bytes(cuda, None, resident=14 * GIB) == (10 + 16 + 14) * GIB
    assert available_bytes(cuda, 20, resident=14 * GIB) == 20 * GIB  # at most the budget
    assert memory.release_memory() is None  # no CUDA here: only a garbage collection
