"""Where a model is and what it runs on: offline resolution, devices, dtypes, HF loading.

Nothing is ever downloaded: a hub id is used only when it is already in the local Hugging Face
cache, otherwise the user gets an `InputError` telling them to pass a local directory. The
tiny test models are not resolved here: a stage asking for ``model="tiny"`` builds them with
`stages.models.tiny` (explicitly, so the production path never builds a test model).

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError
from stages.models.hub import hf_offline

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceError", "load_local_pretrained", "resolve_device", "resolve_dtype",
           "resolve_model_path"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DeviceError(InputError, ValueError):
    """An unknown or unavailable device (a ValueError for callers, an InputError for the CLI)."""


def resolve_model_path(model: str) -> tuple[Path, str | None]:
    """A local directory for `model` and its hub revision (None when not from the hub cache).

    `model` is a local directory written by ``save_pretrained`` or a hub id already in the
    local Hugging Face cache. Anything else is an `InputError` raised at once: the pipeline runs
    offline and never tries (and waits for) the network. ``"tiny"`` is not special here: the
    stages resolve it with `stages.models.tiny` before they get this far.
    """
    name = str(model).strip()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model directory {str(path)!r} has no config.json: pass a "
                             "directory written by save_pretrained (model + processor)")
        return path.resolve(), None
    if not _HUB_ID.match(name) or path.exists():
        raise InputError(f"model {name!r}: no such directory (pass a local model directory, "
                         "a Hugging Face id already in the local cache, or 'tiny')")
    from huggingface_hub import constants, snapshot_download

    try:
        with hf_offline():
            snapshot = Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, or anything else from a partial cache
        raise InputError(
            f"model {name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "and this offline pipeline cannot download it; pass a local directory instead "
            "(e.g. --set multiview.model=/models/llava-1.5-7b-hf, made with `hf download "
            f"{name} --local-dir /models/llava-1.5-7b-hf` on a machine with network) "
            f"[{type(exc).__name__}]"
        ) from None
    if not (snapshot / "config.json").is_file():
        raise InputError(f"the cached snapshot of {name!r} ({snapshot}) has no config.json: "
                         "the download was incomplete; pass a complete local directory")
    return snapshot, snapshot.name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> the current CUDA device if there is one, else CPU; `cpu`, `cuda`, `cuda:N`.

    Raises DeviceError (a ValueError and an InputError) for anything unknown or unavailable,
    rather than failing later inside torch with a less clear message.
    """
    import torch

    text = str(device).strip().lower()
    if text in ("auto", ""):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise DeviceError(
                f"device {device!r} is not valid: use auto, cpu, cuda or cuda:N "
                "(e.g. --set embed.device=cuda:0)"
            ) from None
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} was requested but CUDA is not available here (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda}); use device 'cpu' or "
                "'auto' (e.g. --set embed.device=auto)"
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise DeviceError(
                f"device {device!r} does not exist: this machine has {count} CUDA device(s), "
                f"cuda:0 .. cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA when supported, else fp16 on CUDA; fp32 on CPU (no fast half there)."""
    import torch

    text = str(dtype).strip().lower()
    if text in ("", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if text not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[text])


def load_local_pretrained(what: str, model: str, path: Path, processor_cls: Any,
                          model_cls: Any, dtype: Any, device: Any,
                          attn_implementation: str | None = None) -> tuple[Any, Any]:
    """(processor or tokenizer, model in eval mode) from a resolved local dir, offline, for
    left-padded batched generation; a load failure is an InputError naming `what` and both
    the model and the dir. `attn_implementation` (``sdpa``, ``eager``, ``flash_attention_2``;
    None: transformers' choice, SDPA where the model supports it) is passed to
    ``from_pretrained``; one this machine cannot run (flash-attn not installed, no GPU) is an
    InputError that says which ones can."""
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        with hf_offline():
            processor = processor_cls.from_pretrained(path)
            # device_map loads the weights straight onto the device (no CPU copy first)
            net = model_cls.from_pretrained(path, dtype=dtype, device_map=str(device), **extra)
    except ImportError as exc:  # flash_attention_2 without the flash-attn package
        raise InputError(
            f"attention implementation {attn_implementation!r} is not available for {what} "
            f"{model!r} here ({exc}); use auto, sdpa or eager, or install flash-attn on a "
            "CUDA machine for flash_attention_2") from exc
    except (OSError, ValueError, KeyError) as exc:
        if attn_implementation is not None and "attn_implementation" in str(exc):
            raise InputError(
                f"{what} {model!r} cannot use attention implementation "
                f"{attn_implementation!r}: {exc} (use auto, sdpa or eager)") from exc
        raise InputError(f"cannot load {what} {model!r} from {path}: {exc}") from exc
    net.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # a decoder continues from each row's last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor, net
