"""Text generation for the model stages: generators and the one request loop.

* `answers`: what a generator returns (`Answer`: text + whether it was cut off at its token
  limit), its running `GenerationStats`, and the token budget rule shared by every task
  (`budget_for`);
* `hf_engine`: ONE transformers generator (`HFGenerator`: left-padded greedy batches), with two
  thin specialisations, `HFVisionGenerator` (LLaVA: image + text) and `HFTextGenerator`
  (causal LM: text only);
* `memory` / `batching`: how many requests fit in one transformers `generate` call (KV cache
  per row for the prompt and the answer budget, on the free memory) and the retry at half the
  batch after a CUDA out-of-memory, which the HF generator runs its batches through;
* `vllm_engine`: ONE vLLM generator (`VLLMGenerator`: request building, context caps, JSON-schema
  decoding under either vLLM API name), likewise `VLLMVisionGenerator` and `VLLMTextGenerator`;
* `engines`: `get_generator` (one per process, through `pipeline.process_cache`),
  `model_key` (a model's identity in the request cache) and `check_engine` (preflight);
* `loop`: the request loop both multiview (views) and augment (distractors) go through -- ask,
  validate each answer per item, repair only the items still missing with one repair prompt,
  record what stays unusable with its reason -- and `run_cached`, the same loop behind the
  request cache (resumable per job, a test kill hook); the task-specific parts (prompts,
  parsing, budget, schema) come in as a small `Task` object.

Nothing here imports torch, transformers or vLLM at module level.
"""
