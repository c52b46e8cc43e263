"""CLIP models for the embedding stages: loading, encoding and memory budgeting.

Everything goes through open_clip's own factory (`create_model_and_transforms`,
`get_tokenizer`), so the preprocessing and tokenisation are exactly what the checkpoint was
trained with. The pipeline runs offline: pretrained *tags* are used only when their weights are
already in the local Hugging Face / open_clip cache (nothing is ever downloaded); otherwise the
user passes a local checkpoint file as `embed.pretrained`.

`model="tiny"` is a small randomly initialised CLIP registered with open_clip under the name
`nemo-tiny`, so tests and the demo exercise the same code path as real models without weights.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from pipeline.errors import InputError
from pipeline.process_cache import process_cached
from stages.models.hub import hf_offline
from stages.models.loading import DeviceError, resolve_device

__all__ = [
    "TINY_MODEL",
    "ClipBundle",
    "DeviceError",
    "MemoryBudgetError",
    "auto_batch_size",
    "check_memory",
    "check_model_spec",
    "encode_image_batch",
    "encode_texts",
    "estimate_memory_bytes",
    "load_clip",
    "resolve_device",
    "save_tiny_checkpoint",
]

log = logging.getLogger(__name__)

TINY_MODEL = "nemo-tiny"
_ALIASES = {"tiny": TINY_MODEL}
# Small enough to build in milliseconds; vocab 49408 + context 77 so open_clip's bundled BPE
# SimpleTokenizer (the one real CLIP models use) works unchanged.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_INIT_SEED = 0  # random init is seeded so that `load_clip("tiny")` is reproducible

# Memory model constants (see estimate_memory_bytes).
_ACT_FACTOR = 4  # live activation tensors per (token, channel, layer): residual, qkv/mlp, norms
_SAFETY = 1.25  # multiplicative margin for allocator fragmentation and workspaces
_OVERHEAD_BYTES = 64 * 2**20  # fixed margin (cuBLAS workspace, small buffers)
_GIB = 2**30

class MemoryBudgetError(InputError, MemoryError):
    """The requested batch would not fit in free memory; the message says which batch size does."""


@dataclass
class ClipBundle:
    """A loaded CLIP model plus what is needed to use it and to record it in a manifest."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    model_name: str
    pretrained: str | None
    weights_sha256: str | None
    dim: int
    device: torch.device
    dtype: str
    image_size: tuple[int, int]
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # open_clip model config

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the model, for manifests and stage keys."""
        return {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256,
            "dim": self.dim,
            "device": str(self.device),
            "dtype": self.dtype,
            "image_size": list(self.image_size),
        }


@dataclass(frozen=True)
class _Spec:
    """A validated (model, pretrained) pair: what to pass to open_clip and what it refers to."""

    name: str
    pretrained: str | None  # tag (open_clip-normalised) or file path, as passed to open_clip
    kind: Literal["none", "tag", "file"]
    checkpoint: Path | None  # the local file whose weights are loaded
    quick_gelu: bool  # the tag was trained with QuickGELU


# --------------------------------------------------------------------------------------------
# model spec


def _register_tiny() -> None:
    """Register `nemo-tiny` with open_clip through its public `add_model_config`, once per
    process.

    The JSON lives in a temp dir kept (by the process cache) for the whole process, so later
    rescans by open_clip (any other `add_model_config` call) still find it.
    """
    process_cached("clip.tiny-config", TINY_MODEL, _write_tiny_config)


def _write_tiny_config() -> tempfile.TemporaryDirectory[str]:
    folder = tempfile.TemporaryDirectory(prefix="nemo-clip-configs-")
    path = Path(folder.name) / f"{TINY_MODEL}.json"
    path.write_text(json.dumps(TINY_CONFIG, indent=2))
    open_clip.add_model_config(path)
    return folder


def _canonical_name(model: str) -> str:
    name = model.strip()
    name = _ALIASES.get(name.lower(), name)
    return name.replace("/", "-")  # open_clip accepts "ViT-B/32" the same way


def _hf_hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return os.path.expanduser("~/.cache/huggingface/hub")
    return str(constants.HF_HUB_CACHE)


def _tag_source(cfg: dict[str, Any]) -> tuple[str, str, list[str]]:
    """Where open_clip would fetch a tag's weights: (kind, id, candidate file names).

    Mirrors `open_clip.pretrained.download_pretrained`: the HF hub is preferred when the tag has
    an `hf_hub` entry and huggingface_hub is installed (safetensors alternatives first).
    """
    if "file" in cfg:
        return "file", cfg["file"], []
    hub = cfg.get("hf_hub", "")
    if hub and open_clip.pretrained.has_hf_hub():
        repo, filename = os.path.split(hub)
        names: list[str] = []
        # open_clip looks for .safetensors alternatives first, when it can read them
        if importlib.util.find_spec("safetensors") is not None:
            if filename in ("", HF_WEIGHTS_NAME):
                names.append(HF_SAFE_WEIGHTS_NAME)
            elif filename.endswith((".bin", ".pth")):
                names.append(filename[:-4] + ".safetensors")
        names.append(filename or HF_WEIGHTS_NAME)
        return "hf_hub", repo, names
    url = cfg.get("url", "")
    return "url", url, [os.path.basename(url)] if url else []


def _cached_tag_file(cfg: dict[str, Any]) -> Path | None:
    """The local file a tag's weights are cached in, or None (never touches the network)."""
    kind, ident, names = _tag_source(cfg)
    if kind == "file":
        return Path(ident) if os.path.isfile(ident) else None
    if kind == "hf_hub":
        from huggingface_hub import try_to_load_from_cache

        for name in names:
            hit = try_to_load_from_cache(repo_id=ident, filename=name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
        return None
    if kind == "url" and names:
        target = Path(os.path.expanduser("~/.cache/clip")) / names[0]
        return target if target.is_file() else None
    return None


def _not_cached_error(name: str, tag: str, cfg: dict[str, Any]) -> InputError:
    kind, ident, names = _tag_source(cfg)
    if kind == "hf_hub":
        where = (
            f"Hugging Face repo {ident!r} (file {names[-1]}, https://huggingface.co/{ident}); "
            f"looked in the local cache {_hf_hub_cache_dir()}"
        )
    else:
        where = f"{ident or 'an unknown source'}; looked in ~/.cache/clip"
    return InputError(
        f"model {name!r} with pretrained tag {tag!r}: the weights are not in the local cache and "
        f"cannot be downloaded in this environment (source: {where}). Download the checkpoint "
        "on a machine with network access and pass the local checkpoint file instead: "
        f"--set embed.model={name} --set embed.pretrained=/path/to/file.pt "
        "(or use --set embed.model=tiny for the built-in test model)"
    )


def _model_name(model: str) -> str:
    """open_clip's name of `model` (canonical, or its unique case-insensitive match), or an
    InputError with the close matches."""
    if not isinstance(model, str) or not model.strip():
        raise InputError(
            f"embed.model must be an open_clip model name such as ViT-B-16 (got {model!r}); "
            "see open_clip.list_models()"
        )
    if model.strip().startswith(("hf-hub:", "local-dir:")):
        raise InputError(
            f"embed.model={model!r}: hub/local-dir model schemas are not supported by this "
            "offline pipeline; use a built-in open_clip name (open_clip.list_models()) and pass "
            "the checkpoint as a local file: --set embed.pretrained=/path/to/file.pt"
        )
    _register_tiny()
    name = _canonical_name(model)
    known = open_clip.list_models()
    if name not in known:  # accept a unique case-insensitive match ("vit-b-16")
        same = [k for k in known if k.lower() == name.lower()]
        name = same[0] if len(same) == 1 else name
    if name not in known:
        by_lower = {k.lower(): k for k in [*known, "tiny"]}
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)
        hint = ", ".join(by_lower[c] for c in close) if close else "none"
        raise InputError(
            f"embed.model={model!r} is not an open_clip model name (close matches: {hint}). "
            "The full list is open_clip.list_models(); 'tiny' is the built-in test model. "
            "Fix it with e.g. --set embed.model=ViT-B-16"
        )
    return name


def checkpoint_path(model: str, pretrained: str | os.PathLike[str] | None) -> Path | None:
    """The local checkpoint file `pretrained` names for `model`, decided as `_resolve_spec`
    decides it (not a pretrained tag of the model, an existing file, whatever its name or
    suffix), without touching any weights; None for a tag, random init, or a value the
    preflight will reject. The embedding stages hash this file into their key: a replaced
    checkpoint must never be served from the cache of the old one."""
    if pretrained is None or str(pretrained).strip() == "":
        return None
    try:
        name = _model_name(model)
    except InputError:
        return None
    value = os.fspath(pretrained).strip()
    if open_clip.is_pretrained_cfg(name, value):
        return None
    path = Path(value).expanduser()
    return path if path.is_file() else None


def _resolve_spec(model: str, pretrained: str | os.PathLike[str] | None) -> _Spec:
    name = _model_name(model)
    if pretrained is None or str(pretrained).strip() == "":
        return _Spec(name, None, "none", None, False)

    value = os.fspath(pretrained).strip()
    if open_clip.is_pretrained_cfg(name, value):
        cleaned = value.lower().replace("-", "_")  # how open_clip normalises tags
        tag = cleaned if cleaned in open_clip.list_pretrained_tags_by_model(name) else value
        cfg = open_clip.get_pretrained_cfg(name, value)
        cached = _cached_tag_file(cfg)
        if cached is None:
            raise _not_cached_error(name, tag, cfg)
        quick = bool(cfg.get("quick_gelu", False))
        return _Spec(name, tag, "tag", cached, quick)

    path = Path(value).expanduser()
    if path.is_file():
        return _Spec(name, str(path), "file", path, False)
    tags = open_clip.list_pretrained_tags_by_model(name)
    tag_hint = f"known tags of {name}: {', '.join(tags)}" if tags else f"{name} has no known tags"
    problem = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
    raise InputError(
        f"embed.pretrained={value!r} for model {name!r} is neither a pretrained tag ({tag_hint}) "
        f"nor a checkpoint file: {path.absolute()} {problem}. Pass an existing local checkpoint "
        "(.pt/.bin/.safetensors) with --set embed.pretrained=/path/to/file.pt, or null for "
        "random init"
    )


def check_model_spec(model: str, pretrained: str | os.PathLike[str] | None) -> None:
    """Validate a (model, pretrained) pair cheaply, before any data or weights are touched.

    Checks that the model name exists, that `pretrained` is a known tag of it (whose weights
    are already cached locally) or an existing file. Raises InputError otherwise.
    """
    _resolve_spec(model, pretrained)


# --------------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def _no_root_logging_setup() -> Iterator[None]:
    """Keep open_clip's module-level `logging.warning(...)` calls from configuring the root logger.

    `logging.warning()` calls `basicConfig()` when the root logger has no handler, which would
    change the logging of the whole process as a side effect of loading a model.
    """
    root = logging.getLogger()
    guard = None
    if not root.handlers:
        guard = logging.NullHandler()
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _create(spec: _Spec, device: torch.device, seed: int) -> tuple[torch.nn.Module, Callable]:
    """open_clip's create_model_and_transforms, seeded, leaving the caller's RNG untouched.

    Parameters are initialised on the CPU (open_clip moves the model afterwards), so forking the
    CPU generator is enough.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        stack.enter_context(_no_root_logging_setup())
        if spec.kind == "tag":
            stack.enter_context(hf_offline())
        torch.manual_seed(seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.name,
                pretrained=spec.pretrained,
                precision="fp32",
                device=device,
                force_quick_gelu=spec.quick_gelu,
            )
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            # A bad file can fail anywhere in torch.load's unpickler (UnpicklingError, EOFError,
            # IndexError, ...) or in load_state_dict (RuntimeError): all are the file's fault.
            if spec.kind == "none":
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if spec.kind == "tag":
                raise InputError(
                    f"model {spec.name!r} with pretrained tag {spec.pretrained!r}: loading the "
                    f"cached weights {spec.checkpoint} failed ({first}); pass a local "
                    "checkpoint file with --set embed.pretrained=/path/to/file.pt"
                ) from None
            raise InputError(
                f"checkpoint {spec.checkpoint} could not be loaded into model {spec.name!r} "
                f"({type(e).__name__}: {first[:500]}). Check that embed.model matches the "
                "checkpoint's architecture and that the file is an open_clip/OpenAI CLIP state "
                "dict (.pt/.bin/.safetensors)"
            ) from None
    model.eval()
    model.requires_grad_(False)
    return model, preprocess


def _tokenizer(spec: _Spec) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for the model; HF-backed ones must already be cached."""
    try:
        with hf_offline(), _no_root_logging_setup():
            return open_clip.get_tokenizer(spec.name)
    except (OSError, RuntimeError, ValueError, ImportError) as e:
        raise InputError(
            f"the tokenizer of model {spec.name!r} needs files that are not available offline "
            f"({type(e).__name__}: {str(e).strip()[:300]}); pick a model with the default CLIP "
            "tokenizer (e.g. --set embed.model=ViT-B-16) or pre-populate the Hugging Face cache"
        ) from None


def load_clip(
    model: str = "tiny",
    pretrained: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
) -> ClipBundle:
    """Load a CLIP model, its eval transform and tokenizer, in eval mode on `device`.

    `pretrained` is an open_clip tag whose weights are already cached, a local checkpoint path,
    or None for a seeded random init (the only sensible choice for `tiny` without a file).
    """
    spec = _resolve_spec(model, pretrained)
    dev = resolve_device(device)
    tokenizer = _tokenizer(spec)  # cheap, and fails fast for HF tokenizers not cached
    net, preprocess = _create(spec, dev, _INIT_SEED)
    if spec.kind == "none" and spec.name != TINY_MODEL:
        log.warning("model %s has no pretrained weights: using a seeded random init", spec.name)
    config = open_clip.get_model_config(spec.name) or {}
    size = open_clip.get_model_preprocess_cfg(net)["size"]
    image_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return ClipBundle(
        model=net,
        preprocess=preprocess,
        tokenizer=tokenizer,
        model_name=spec.name,
        pretrained=spec.pretrained,
        weights_sha256=_sha256(spec.checkpoint) if spec.checkpoint is not None else None,
        dim=int(config["embed_dim"]),
        device=dev,
        dtype="float16" if dev.type == "cuda" else "float32",
        image_size=image_size,
        config=config,
    )


def save_tiny_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the state dict of a seeded `tiny` model, to exercise the local-checkpoint path.

    With seed 0 the weights equal those of `load_clip("tiny")`.
    """
    _register_tiny()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = _Spec(TINY_MODEL, None, "none", None, False)
    net, _ = _create(spec, torch.device("cpu"), seed)
    torch.save(net.state_dict(), out)
    return out


# --------------------------------------------------------------------------------------------
# encoding


@contextlib.contextmanager
def _inference(bundle: ClipBundle) -> Iterator[None]:
    """inference_mode everywhere; fp16 autocast on CUDA (weights stay fp32, outputs are cast)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if bundle.device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
        yield


def _normalised_numpy(features: torch.Tensor) -> np.ndarray:
    out = F.normalize(features.float(), dim=-1).cpu().numpy()
    return np.ascontiguousarray(out, dtype=np.float32)


def encode_texts(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Embed texts in batches: (n, dim) float32 rows of unit L2 norm."""
    if isinstance(texts, str):
        raise TypeError("encode_texts expects a sequence of strings, not a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    texts = list(texts)
    if not texts:
        return np.zeros((0, bundle.dim), dtype=np.float32)
    parts = []
    with _inference(bundle):
        for start in range(0, len(texts), batch_size):
            tokens = bundle.tokenizer(texts[start : start + batch_size]).to(bundle.device)
            parts.append(_normalised_numpy(bundle.model.encode_text(tokens)))
    return np.concatenate(parts, axis=0)


def encode_image_batch(bundle: ClipBundle, pixels: torch.Tensor) -> np.ndarray:
    """Embed a batch made with `bundle.preprocess`: (n, dim) float32 rows of unit L2 norm."""
    expected = (3, *bundle.image_size)
    if (
        not isinstance(pixels, torch.Tensor)
        or pixels.ndim != 4
        or tuple(pixels.shape[1:]) != expected
    ):
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(
            f"expected a batch of preprocessed images of shape (n, {expected[0]}, {expected[1]}, "
            f"{expected[2]}) (torch.stack of bundle.preprocess outputs), got {got}"
        )
    if pixels.shape[0] == 0:
        return np.zeros((0, bundle.dim), dtype=np.float32)
    with _inference(bundle):
        x = pixels.to(bundle.device, dtype=torch.float32, non_blocking=True)
        return _normalised_numpy(bundle.model.encode_image(x))


# --------------------------------------------------------------------------------------------
# memory


def _param_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _tower_shape(bundle: ClipBundle, kind: str) -> tuple[int, int, int, int]:
    """(tokens, width, layers, heads) of a tower, with conservative fallbacks for
    timm / ResNet / HF towers whose config does not spell out a plain transformer."""
    cfg = bundle.config
    if kind == "image":
        vcfg = cfg.get("vision_cfg", {})
        height, width_px = bundle.image_size
        layers = vcfg.get("layers", 24)
        if isinstance(layers, (list, tuple)):  # ModifiedResNet: stride-4 feature maps, 4x width
            tokens = (height // 4) * (width_px // 4)
            width = 4 * int(vcfg.get("width", 64))
            return tokens, width, int(sum(layers)), 1
        patch = vcfg.get("patch_size", 16)
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        tokens = (height // int(patch)) * (width_px // int(patch)) + 1
        width = int(vcfg.get("width", 1024))
        heads = max(1, width // int(vcfg.get("head_width", 64)))
        return tokens, width, int(layers), heads
    tcfg = cfg.get("text_cfg", {})
    tokens = int(tcfg.get("context_length", 77))
    if "hf_model_name" in tcfg:
        return tokens, 1024, 24, 16
    return (
        tokens,
        int(tcfg.get("width", 512)),
        int(tcfg.get("layers", 12)),
        int(tcfg.get("heads", 8)),
    )


def estimate_memory_bytes(
    bundle: ClipBundle, batch_size: int, kind: Literal["image", "text"]
) -> int:
    """Rough upper bound of the memory one encode call needs, model weights included.

    params (+ autocast's fp16 weight copies on CUDA) + activations
    (batch x tokens x width x layers x a factor, plus one layer's attention scores) + inputs and
    outputs, times a safety margin plus a fixed overhead. Deliberately conservative: under
    inference_mode most activations are freed layer by layer.
    """
    if kind not in ("image", "text"):
        raise ValueError(f"kind must be 'image' or 'text' (got {kind!r})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    elem = 2 if bundle.dtype == "float16" else 4
    params = _param_bytes(bundle.model)
    weights = params + (params // 2 if bundle.dtype == "float16" else 0)
    tokens, width, layers, heads = _tower_shape(bundle, kind)
    acts = batch_size * tokens * width * layers * _ACT_FACTOR * elem
    acts += 2 * batch_size * heads * tokens * tokens * elem
    if kind == "image":
        io = batch_size * 3 * bundle.image_size[0] * bundle.image_size[1] * 4
    else:
        io = batch_size * tokens * 8
    io += batch_size * bundle.dim * 4
    return int((weights + acts + io) * _SAFETY) + _OVERHEAD_BYTES


def _available_bytes(bundle: ClipBundle) -> int:
    """Memory an encode call may use: free memory plus what the loaded model already holds
    (it is part of every estimate but no longer counted as free)."""
    resident = _param_bytes(bundle.model)
    if bundle.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(bundle.device)
        return int(free) + resident
    import psutil

    return int(psutil.virtual_memory().available) + resident


def _largest_fitting(bundle: ClipBundle, kind: str, budget: int, cap: int) -> int:
    size = 1 << (max(1, cap).bit_length() - 1)  # largest power of two <= cap
    while size >= 1:
        if estimate_memory_bytes(bundle, size, kind) <= budget:  # type: ignore[arg-type]
            return size
        size //= 2
    return 0


def check_memory(
    bundle: ClipBundle,
    batch_size: int,
    kind: Literal["image", "text"],
    available_bytes: int | None = None,
) -> None:
    """Fail before a run starts (not with an OOM mid-run) when the batch cannot fit.

    `available_bytes` defaults to free CUDA memory on GPU or available RAM on CPU, plus the
    memory the loaded model already occupies.
    """
    need = estimate_memory_bytes(bundle, batch_size, kind)
    budget = _available_bytes(bundle) if available_bytes is None else int(available_bytes)
    if need <= budget:
        return
    fits = _largest_fitting(bundle, kind, budget, batch_size)
    head = (
        f"model {bundle.model_name} with batch size {batch_size} ({kind} encoding on "
        f"{bundle.device}, {bundle.dtype}) needs about {need / _GIB:.2f} GiB but only "
        f"{budget / _GIB:.2f} GiB are free"
    )
    if fits:
        raise MemoryBudgetError(
            f"{head}; lower embed.batch_size (e.g. to {fits}: --set embed.batch_size={fits}) or "
            "free memory"
        )
    raise MemoryBudgetError(
        f"{head}; even embed.batch_size=1 does not fit: free memory, use a smaller model "
        "(--set embed.model=...) or another device"
    )


def auto_batch_size(
    bundle: ClipBundle,
    kind: Literal["image", "text"],
    available_bytes: int | None = None,
    cap: int = 1024,
) -> int:
    """The largest power of two <= cap whose estimate fits in the available memory."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1 (got {cap})")
    budget = _available_bytes(bundle) if available_bytes is None else int(available_bytes)
    size = _largest_fitting(bundle, kind, budget, cap)
    if size == 0:
        need = estimate_memory_bytes(bundle, 1, kind)
        raise MemoryBudgetError(
            f"model {bundle.model_name} needs about {need / _GIB:.2f} GiB for a single {kind} "
            f"on {bundle.device} but only {budget / _GIB:.2f} GiB are free: free memory, use a "
            "smaller model (--set embed.model=...) or another device"
        )
    return size
