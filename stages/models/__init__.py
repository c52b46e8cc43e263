"""Model loading and generation, shared by the stages.

`hub` (offline access to the Hugging Face cache), `loading` (model ids and local directories,
devices, dtypes, transformers loading), `clip` (open_clip models for the embedding stages),
`llava` (LLaVA-1.5's image padding and chat format), `tiny` (tiny random test models built in
code) and `generation` (the HF and vLLM generators and the one request loop that views and
distractors go through). Importing any of them is cheap: torch, transformers and vLLM are
imported inside the functions that need them (`clip` aside, which only the CLIP stages load).
"""
