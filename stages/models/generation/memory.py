"""How many requests fit in one `generate` call, and what to do when a guess was wrong.

Batched greedy decoding of a decoder-only model holds, beyond its weights, a KV cache per row
for the batch's longest prompt plus its largest answer budget (left padding makes every row as
long as the longest), and, during the prefill, one layer's activations for the whole prompt.
`MemoryShape` reads what that costs from the model's config; `estimate_bytes` adds it up and
`fit_batch` picks the largest batch whose estimate fits in the memory available
(`available_bytes`: free CUDA memory plus what PyTorch's allocator holds unused, or a configured
budget, or the host's available RAM on CPU).

The estimate is a first guess, not a promise: kernels, fragmentation and the allocator's
rounding differ between cards and versions. The generator catches CUDA out-of-memory
(`is_out_of_memory`), empties the cache, halves the batch and retries the same requests; at batch
1 it gives up with `GenerationMemoryError`, which names what to change.

Worked example (LLaVA-1.5-7B, float16: 32 layers, 32 KV heads of 128 dims): the KV cache takes
2 (K and V) x 32 x 32 x 128 x 2 bytes = 524,288 bytes per token, so a 1,641-token prompt with
160 new tokens takes 1,801 x 524,288 = 944,242,688 bytes (0.88 GiB) per row. With the prefill's
activations, the margins below and 13.5 GiB of weights, `fit_batch` puts 69 rows (dynamic cache,
SDPA) or 98 (static cache) in 139.5 GiB; an H200 ran batch 48 and ran out of memory at 96 with
the dynamic cache, which is what `KV_GROWTH` accounts for.

torch is imported inside functions only.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError

__all__ = ["ACTIVATION_WIDTH", "FIXED_OVERHEAD", "ROW_SAFETY", "GenerationMemoryError",
           "MemoryShape", "available_bytes", "estimate_bytes", "fit_batch", "is_out_of_memory",
           "release_memory", "row_bytes", "weight_bytes"]

# Live activations of one decoder layer during the prefill, per prompt token, in units of the
# hidden size (residual, norm output, q, k, v, attention output) plus three intermediate-size
# tensors of a gated MLP (gate, up, their product). One layer at a time: the others are freed.
ACTIVATION_WIDTH = 6
MLP_TENSORS = 3
# A dynamic cache grows every layer's K and V by one token per step (a new, slightly larger
# block each time): the caching allocator cannot reuse the freed smaller blocks for the larger
# ones, and the fragments add up. Half the cache again is the margin for that; a static cache
# is allocated once, at its final size.
KV_GROWTH = {"dynamic": 0.5, "static": 0.0}
ROW_SAFETY = 1.2  # x per-row bytes: allocator rounding, temporaries
FIXED_OVERHEAD = 512 * 2**20  # cuBLAS/cuDNN workspaces, the vision tower's batch, small buffers
LOGIT_BYTES = 4  # the last position's logits are kept in float32 by `generate`
_GIB = 2**30


class GenerationMemoryError(InputError, MemoryError):
    """Even one request at a time runs out of memory: the message says what to lower."""


@dataclass(frozen=True)
class MemoryShape:
    """What one token costs a decoder-only model (or a VLM's text model) in memory."""

    layers: int
    kv_heads: int
    head_dim: int
    heads: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def from_config(cls, config: Any, dtype_bytes: int) -> MemoryShape:
        """From a transformers config (a VLM's `text_config` when it has one)."""
        text = getattr(config, "text_config", None) or config
        hidden = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        return cls(layers=int(text.num_hidden_layers),
                   kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                   head_dim=int(head_dim), heads=heads, hidden=hidden,
                   intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
                   vocab=int(text.vocab_size), dtype_bytes=int(dtype_bytes))

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def row_bytes(shape: MemoryShape, prompt_tokens: int, new_tokens: int,
              attn_implementation: str = "sdpa",
              cache_implementation: str = "dynamic") -> dict[str, int]:
    """What one row of a batch costs, by part (bytes, before `ROW_SAFETY`).

    ``kv``: the cache for the padded prompt and the answer budget; ``kv_growth``: the
    fragments a growing dynamic cache leaves (`KV_GROWTH`, 0 for a static one); ``activations``: one
    layer's prefill activations; ``attention``: eager attention's score matrices (heads x
    prompt^2, in the model's dtype and again in float32 for the softmax; 0 for SDPA and flash
    attention, which never materialise them); ``mask``: the 4-D attention mask (one byte per
    query-key pair); ``logits``: the last position's logits.
    """
    if prompt_tokens < 0 or new_tokens < 0:
        raise ValueError("token counts must be >= 0")
    total = prompt_tokens + new_tokens
    eager = attn_implementation == "eager"
    kv = shape.kv_bytes_per_token * total
    return {
        "kv": kv,
        "kv_growth": math.ceil(kv * KV_GROWTH[cache_implementation]),
        "activations": prompt_tokens * (ACTIVATION_WIDTH * shape.hidden
                                        + MLP_TENSORS * shape.intermediate) * shape.dtype_bytes,
        "attention": (shape.heads * prompt_tokens * prompt_tokens * (shape.dtype_bytes + 4)
                      if eager else 0),
        "mask": prompt_tokens * total,
        "logits": shape.vocab * LOGIT_BYTES,
    }


def estimate_bytes(shape: MemoryShape, batch: int, prompt_tokens: int, new_tokens: int,
                   weights: int = 0, attn_implementation: str = "sdpa",
                   cache_implementation: str = "dynamic") -> int:
    """Bytes a `generate` call of `batch` rows needs: `weights` + rows x `row_bytes` x
    `ROW_SAFETY` + `FIXED_OVERHEAD`."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    per_row = sum(row_bytes(shape, prompt_tokens, new_tokens, attn_implementation,
                            cache_implementation).values())
    return int(weights) + math.ceil(batch * per_row * ROW_SAFETY) + FIXED_OVERHEAD


def fit_batch(shape: MemoryShape, available: int | None, prompt_tokens: int, new_tokens: int,
              cap: int, weights: int = 0, attn_implementation: str = "sdpa",
              cache_implementation: str = "dynamic") -> int:
    """The largest batch <= `cap` whose `estimate_bytes` fits in `available` bytes (which
    include the resident `weights`); `cap` when `available` is None (no limit); 0 when not even
    one row fits."""
    if cap < 1:
        raise ValueError("cap must be >= 1")
    if available is None:
        return cap
    per_row = sum(row_bytes(shape, prompt_tokens, new_tokens, attn_implementation,
                            cache_implementation).values())
    room = int(available) - int(weights) - FIXED_OVERHEAD
    if room <= 0:
        return 0
    rows = int(room // (per_row * ROW_SAFETY)) if per_row else cap
    # the float division may land one row above the exact bound: step back to a fitting batch
    while rows > 0 and estimate_bytes(shape, rows, prompt_tokens, new_tokens, weights,
                                      attn_implementation, cache_implementation) > available:
        rows -= 1
    return max(0, min(cap, rows))


def weight_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers (what it keeps resident)."""
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def available_bytes(device: Any, budget_gib: float | None = None,
                    resident: int = 0) -> int | None:
    """Memory a `generate` call may use, counting the `resident` weights as usable (they are
    part of every estimate).

    CUDA: the driver's free memory plus what PyTorch's caching allocator reserved but does not
    use, plus `resident`; at most `budget_gib` when set. CPU: `budget_gib` when set, else the
    host's available RAM (psutil) plus `resident`, else None (no limit).
    """
    budget = None if budget_gib is None else int(float(budget_gib) * _GIB)
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        usable = int(free) + max(0, int(unused)) + int(resident)
        return usable if budget is None else min(budget, usable)
    if budget is not None:
        return budget
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available) + int(resident)


def is_out_of_memory(exc: BaseException) -> bool:
    """Is `exc` CUDA running out of memory (``torch.cuda.OutOfMemoryError``, or an older
    torch's RuntimeError saying "out of memory")?"""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory() -> None:
    """After an out-of-memory: drop the failed call's tensors and return the cached blocks, so
    the retry starts from the weights alone."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
