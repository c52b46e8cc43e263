"""Which generator answers a stage's requests, and how the request cache names its model.

`get_generator(backend, model, device, images=...)` is the process's generator for that
model, loaded on first use through `pipeline.process_cache` (shards run in worker processes;
each loads the model once and reuses it for every shard it gets, nothing large is pickled).
`model_key` is the model's identity in the request cache, computed without loading anything,
so a stage whose requests are all cached loads no model. `check_engine` fails a stage's
preflight at once when the engine or the model is not available here.

The tiny test model is resolved here, explicitly (`locate_model`): ``model="tiny"`` builds it
with `stages.models.tiny`; every other name goes through `resolve_model_path`, which never does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.filehash import FileHashCache
from pipeline.process_cache import process_cached
from stages.models.loading import resolve_model_path
from stages.models.tiny import is_tiny, tiny_identity, tiny_model_dir

__all__ = ["ENGINES", "cache_model_key", "check_engine", "get_generator", "local_model_digest",
           "locate_model", "model_identity", "model_key"]

ENGINES = ("hf", "vllm")


def locate_model(model: str, images: bool, *, cache_dir: Path | None = None,
                 seed: int = 0) -> tuple[Path, str | None]:
    """(local directory, hub revision or None) of `model`: the tiny test model of that kind
    (image-text when `images`, else text) for ``"tiny"``, else `resolve_model_path`."""
    if is_tiny(model):
        return tiny_model_dir(images, cache_dir, seed), None
    return resolve_model_path(model)


def local_model_digest(path: Path, hashes: FileHashCache | None = None) -> str:
    """A digest of every file of a local model directory (weights, config, tokenizer, chat
    template; dot-files and dot-dirs left out), so replacing the weights in place is a new
    model. Each file is read once per (size, mtime): `hashes` (the work dir's input-hash cache)
    keeps its digest across runs, the file-hash layer within a process, so 14 GB of LLaVA
    weights are not re-read on every status."""
    import xxhash

    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        digests = (hashes or FileHashCache(Path("unused"), persist=False)).digests(files)
    except OSError as exc:  # an unreadable file, one removed while listed
        raise InputError(f"model directory {path}: cannot read {exc.filename or path} "
                         f"({exc.strerror or exc}); fix its permissions or pass a complete "
                         "model directory") from None
    h = xxhash.xxh3_128()
    for p in files:
        rel = p.relative_to(path).as_posix()
        found = digests[p.absolute()]
        if found is None:
            raise InputError(f"model directory {path}: {rel} went away while it was read; "
                             "rerun once the directory is complete")
        h.update(f"{rel}\0{found.digest}\n".encode())
    return h.hexdigest()[:16]


def model_identity(backend: str, model: str, *, images: bool, work_dir: Path) -> str:
    """`model_key` for a stage's key (`fingerprint`), through the work dir's input-hash cache.

    A model that is not here yet has no identity but its name: the key still resolves (for
    `status`, and for stages that do not read this one), and `run` stops at the preflight,
    which names the missing model."""
    try:
        return model_key(backend, model, images=images,
                         hashes=FileHashCache.for_work_dir(work_dir))
    except InputError:
        return f"unavailable:{model}"


def cache_model_key(from_stage: str | None, compute: Callable[[], str]) -> str:
    """The request cache's model key in a shard: the stage's (`model_identity`, computed once
    in the driver through the work dir's hash cache) unless it had none, else `compute()`."""
    if from_stage and not from_stage.startswith("unavailable:"):
        return from_stage
    return compute()


def model_key(backend: str, model: str, *, images: bool = True, seed: int = 0,
              hashes: FileHashCache | None = None) -> str:
    """The model's identity in the request cache and the stage's key: namespace + hub
    revision, or local path + a digest of its files.

    The namespace is the backend for image-text models (``hf``, ``vllm``) and ``causal-lm``
    (``vllm:causal-lm`` under vLLM) for text models. A hub snapshot is pinned by its commit,
    so a re-downloaded newer revision is a new key; a local directory by the digest of its
    files (`local_model_digest`), so weights replaced in place are too.
    """
    namespace = backend if images else ("causal-lm" if backend == "hf" else
                                         f"{backend}:causal-lm")
    name = str(model).strip()
    if is_tiny(name):
        return f"{namespace}:{tiny_identity(images, seed)}"
    path, revision = resolve_model_path(name)
    if revision:
        return f"{namespace}:{name}@{revision}"
    return f"{namespace}:{path}#{local_model_digest(path, hashes)}"


def check_engine(engine: str, model: str) -> None:
    """Fail before any work when `engine` cannot run `model` here; loads nothing heavy.

    vLLM missing, an unknown engine, a model that is neither a local directory nor in the
    local Hugging Face cache: all `InputError`s at preflight, not after hours of other stages.
    """
    if engine not in ENGINES:
        raise InputError(f"unknown generation engine {engine!r}: use hf or vllm")
    if engine == "vllm":
        from stages.models.generation.vllm_engine import import_vllm

        import_vllm()
    if not is_tiny(model):
        resolve_model_path(model)


def get_generator(backend: str, model: str, device: str = "auto", *, images: bool = True,
                  options: Mapping[str, Any] | None = None) -> Any:
    """The process's generator for (backend, model, device, images, options), loaded on first
    use.

    `images`: requests are ``(image, prompt)`` pairs for an image-text model (multiview),
    else prompts for a causal LM (augment). `options`: keyword arguments of the transformers
    generator (``attn_implementation``, ``cache_implementation``, ``sort_by_length``,
    ``memory_gib``; see `HFGenerator`); vLLM sizes its own batches and ignores them. vLLM
    places itself on the GPUs (`device` unused).
    """
    if backend not in ENGINES:
        raise InputError(f"unknown generation engine {backend!r}: use hf or vllm")
    opts = dict(options or {})

    def load() -> Any:
        if backend == "hf":
            from stages.models.generation.hf_engine import HFTextGenerator, HFVisionGenerator

            return (HFVisionGenerator if images else HFTextGenerator)(model, device=device,
                                                                     **opts)
        from stages.models.generation.vllm_engine import VLLMTextGenerator, VLLMVisionGenerator

        return (VLLMVisionGenerator if images else VLLMTextGenerator)(model)

    key = (backend, str(model), str(device), images,
           tuple(sorted(opts.items())) if backend == "hf" else ())
    return process_cached("generator", key, load)
