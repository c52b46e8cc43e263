"""JPEG decode and CLIP preprocessing as batched tensor ops on the model's device.

On a GPU the PIL path of `embed_images` (decode, resize, crop, normalise in a thread pool) is
the bottleneck: one H200 runs ViT-B-16 at 4,300 images/s but 16 PIL threads feed it 650. Here
CPU threads only read the files; JPEGs are decoded in batches by nvjpeg
(`torchvision.io.decode_jpeg(list, device="cuda")`), then resized, cropped and normalised on the
device by the steps of the model's own open_clip transform (its Resize size, interpolation and
antialias, CenterCrop size, Normalize mean and std, read from the transform, never assumed).
A producer thread prepares batch k+1 on its own CUDA stream while the model runs batch k.

Everything that is not a plain 8-bit 3-component JPEG (PNG, greyscale, CMYK, 12-bit,
arithmetic-coded, RGB-coded, truncated, huge, unreadable) goes to the caller's PIL path per
image, so such files give exactly the PIL result or the PIL error. The same code runs on CPU
tensors (libjpeg-turbo through torchvision, decoded and resized in the reading threads), which
is how CI tests it.

Parity with PIL: JPEG decoding is bit-identical on CPU (both libjpeg-turbo, same IDCT); the
resize differs in rounding (torch's antialiased bicubic uses PIL's kernel in floating point,
PIL in fixed point): pixels within 1-2 of 255, embeddings within a cosine of 0.9999 (README).
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import InputError

# torchvision 0.29 deprecates its image io in favour of TorchCodec (the functions still work,
# and the device machines run 0.26): say it once in the README, not once per call
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of "
                        "TorchVision are deprecated", category=DeprecationWarning)

_SOF_SUPPORTED = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_SOF_ALL = {m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)}
_EOI_TAIL = 64  # bytes at the end of a file searched for the end-of-image marker
PREFETCH = 2  # batches prepared ahead of the model


class UnsupportedPreprocess(InputError):
    """The model's transform has a step the tensor path does not reproduce."""


def torchvision_missing() -> str | None:
    """Why decode=gpu cannot run here (None when it can)."""
    try:
        import torchvision.io  # noqa: F401
        import torchvision.transforms.functional  # noqa: F401
    except ImportError as exc:
        return (f"embed.decode=gpu needs torchvision ({type(exc).__name__}: {exc}); install the "
                "torchvision release that matches torch (pip install torchvision) or use "
                "--set embed.decode=pil")
    return None


# -- the model's transform as tensor ops ------------------------------------------------------
@dataclass(frozen=True)
class TensorPreprocess:
    """open_clip's eval transform (Resize, CenterCrop, to RGB, to tensor, Normalize) on uint8
    (3, H, W) tensors of any device; batches of equal-sized images are resized together."""

    size: int | tuple[int, int]  # torchvision Resize's size: the shorter side, or (h, w)
    interpolation: Any  # torchvision InterpolationMode
    max_size: int | None
    antialias: bool
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, transform: Any) -> TensorPreprocess:
        """Read the steps of a torchvision Compose as open_clip builds it for evaluation;
        UnsupportedPreprocess for any other step (e.g. resize_mode `longest`)."""
        from torchvision import transforms as T

        steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
        names = [type(s).__name__ for s in steps]
        resize = crop = norm = None
        for step in steps:
            if isinstance(step, T.Resize) and resize is None and crop is None:
                resize = step
            elif isinstance(step, T.CenterCrop) and resize is not None and crop is None:
                crop = step
            elif _implied(step) and norm is None:
                continue
            elif isinstance(step, T.Normalize) and norm is None:
                norm = step
            else:
                raise UnsupportedPreprocess(
                    f"embed.decode=gpu cannot reproduce the model's preprocessing step {step!r} "
                    f"(steps: {', '.join(names)}); use --set embed.decode=pil")
        if resize is None or crop is None or norm is None:
            raise UnsupportedPreprocess(
                f"embed.decode=gpu needs Resize, CenterCrop and Normalize in the model's "
                f"preprocessing (found {', '.join(names)}); use --set embed.decode=pil")
        size = resize.size
        if isinstance(size, (list, tuple)):
            size = int(size[0]) if len(size) == 1 else (int(size[0]), int(size[1]))
        h_w = crop.size
        return cls(size=size, interpolation=resize.interpolation, max_size=resize.max_size,
                   antialias=resize.antialias is not False,
                   crop=(int(h_w[0]), int(h_w[1])),
                   mean=tuple(float(x) for x in norm.mean),
                   std=tuple(float(x) for x in norm.std))

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) uint8 -> (n, 3, h, w) uint8: Resize then CenterCrop."""
        import torchvision.transforms.functional as F

        size = [self.size] if isinstance(self.size, int) else list(self.size)
        out = F.resize(images, size, interpolation=self.interpolation,
                       max_size=self.max_size, antialias=self.antialias)
        return F.center_crop(out, list(self.crop))

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(n, 3, h, w) float32 pixels, on the images' device, in input order."""
        import torchvision.transforms.functional as F

        if not images:
            return torch.zeros((0, 3, *self.crop), dtype=torch.float32)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        out = torch.empty((len(images), 3, *self.crop), dtype=torch.uint8,
                          device=images[0].device)
        for rows in by_shape.values():
            out[rows] = self._resized(torch.stack([images[i] for i in rows]))
        # ToTensor's uint8 -> float (x / 255) and Normalize's (x - mean) / std, op for op
        return F.normalize(out.to(torch.float32).div(255), list(self.mean), list(self.std),
                           inplace=True)


def _implied(step: Any) -> bool:
    """Steps the tensor path does by construction: conversion to RGB (decoded as RGB; other
    modes go to PIL) and to a float tensor (done with the normalisation)."""
    from torchvision import transforms as T

    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", "RGB") == "RGB"
    return (isinstance(step, T.ToTensor)
            or getattr(step, "__name__", "") == "_convert_to_rgb")  # open_clip < 2.24


# -- which files the tensor path takes ----------------------------------------------------------
def jpeg_fallback_reason(data: bytes, max_pixels: int | None = None) -> str | None:
    """None for a JPEG the tensor path decodes like PIL (8-bit, 3 components, Huffman-coded,
    complete); otherwise why it goes to PIL. Reads the markers up to the frame header only."""
    if data[:3] != b"\xff\xd8\xff":
        return "not a JPEG"
    if b"\xff\xd9" not in data[-_EOI_TAIL:]:
        return "no end-of-image marker (truncated?)"
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return "malformed marker segment"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xEE and data[i + 4:i + 9] == b"Adobe":
            return "Adobe colour-transform marker"  # RGB-coded or CMYK: libjpeg's rules
        if marker in _SOF_ALL:
            if marker not in _SOF_SUPPORTED:
                return f"frame type SOF{marker - 0xC0} (arithmetic, lossless or hierarchical)"
            if i + 10 > n:
                return "truncated frame header"
            precision, comps = data[i + 4], data[i + 9]
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            if precision != 8:
                return f"{precision}-bit samples"
            if comps == 1:
                return "greyscale"
            if comps == 4:
                return "CMYK/YCCK"
            if comps != 3:
                return f"{comps} components"
            ids = bytes(data[i + 10 + 3 * k] for k in range(3) if i + 10 + 3 * k < n)
            if ids == b"RGB":
                return "RGB-coded components"
            if max_pixels is not None and width * height > max_pixels:
                return "larger than PIL's decompression-bomb limit"
            if width == 0 or height == 0:
                return "no size in the frame header"
            return None
        if marker == 0xDA:
            return "scan before the frame header"
        i += 2 + length
    return "no frame header"


def decode_jpegs(datas: Sequence[torch.Tensor], device: torch.device) -> list[Any]:
    """uint8 (3, H, W) RGB tensors on `device` from 1-D uint8 CPU tensors of JPEG bytes, or
    the exception per image. A batch that fails as a whole is retried image by image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        out = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
        return list(out)
    except Exception:  # one bad image fails the batch: find it
        if len(datas) == 1:
            try:
                return [decode_jpeg(datas[0], mode=ImageReadMode.RGB, device=device)]
            except Exception as exc:  # reported per image, then taken by PIL
                return [exc]
        return [r for d in datas for r in decode_jpegs([d], device)]


# -- the prefetching pipeline -----------------------------------------------------------------
@dataclass
class DeviceBatch:
    """A batch ready for the model: `pixels` (n_good, 3, h, w) float32 on the device, in the
    order of `good`; `failed` holds (item, exception) of the images PIL could not read."""

    good: list[Any]
    pixels: torch.Tensor
    failed: list[tuple[Any, BaseException]]
    fallbacks: int = 0  # images that went through PIL


@dataclass
class _Loaded:
    kind: str  # bytes (JPEG to decode in the producer) | pixels (preprocessed) | error
    value: Any
    fallback: bool = False


@dataclass
class _Work:
    chunk: list[Any]
    futures: list[Future[_Loaded]] = field(default_factory=list)


def device_batches(items: Sequence[tuple[Any, str]], preprocess: TensorPreprocess,
                   pil_pixels: Callable[[tuple[Any, str]], torch.Tensor], batch_size: int,
                   threads: int, device: torch.device, timing: dict[str, float],
                   max_pixels: int | None = None,
                   batched: bool | None = None) -> Iterator[DeviceBatch]:
    """DeviceBatches of `items` ((id, path) pairs) in input order, prepared ahead by a
    producer thread (its own CUDA stream on a GPU). `pil_pixels(item)` is the exact PIL path:
    it is used per image for every file the tensor path does not take, and its exception is
    the image's error. Time the consumer waits for a batch goes to timing["read_s"].
    `batched`: decode a batch's JPEGs in one call in the producer (default on CUDA: nvjpeg's
    batched decode) rather than one by one in the reading threads (default on CPU, where a
    batch call is a loop); either way on CPU, so tests cover both."""
    on_cuda = device.type == "cuda"
    batched = on_cuda if batched is None else batched

    def pil(item: tuple[Any, str]) -> _Loaded:
        try:
            return _Loaded("pixels", pil_pixels(item), fallback=True)
        except Exception as exc:  # recorded by the caller, as on the PIL path
            return _Loaded("error", exc, fallback=True)

    def load(item: tuple[Any, str]) -> _Loaded:
        try:
            data = Path(item[1]).read_bytes()
        except Exception:  # PIL reports it as it always has
            return pil(item)
        if jpeg_fallback_reason(data, max_pixels) is not None:
            return pil(item)
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if batched:
            return _Loaded("bytes", raw)
        (image,) = decode_jpegs([raw], device)
        if isinstance(image, Exception):
            return pil(item)
        return _Loaded("pixels", preprocess([image])[0])

    def assemble(work: _Work, pool: ThreadPoolExecutor) -> DeviceBatch:
        loaded = [f.result() for f in work.futures]
        if batched:
            todo = [i for i, x in enumerate(loaded) if x.kind == "bytes"]
            images = decode_jpegs([loaded[i].value for i in todo], device)
            bad = [i for i, img in zip(todo, images, strict=True) if isinstance(img, Exception)]
            for i, x in zip(bad, pool.map(pil, [work.chunk[i] for i in bad]), strict=True):
                loaded[i] = x
            ok = [(i, img) for i, img in zip(todo, images, strict=True)
                  if not isinstance(img, Exception)]
            if ok:
                pixels = preprocess([img for _, img in ok])
                for (i, _), px in zip(ok, pixels, strict=True):
                    loaded[i] = _Loaded("pixels", px)
        good = [(item, x.value) for item, x in zip(work.chunk, loaded, strict=True)
                if x.kind == "pixels"]
        failed = [(item, x.value) for item, x in zip(work.chunk, loaded, strict=True)
                  if x.kind == "error"]
        if good:
            pixels = torch.stack([px.to(device, non_blocking=True) for _, px in good])
        else:
            pixels = torch.zeros((0, 3, *preprocess.crop), dtype=torch.float32, device=device)
        return DeviceBatch([item for item, _ in good], pixels, failed,
                           sum(x.fallback for x in loaded))

    out: queue.Queue[tuple[DeviceBatch | BaseException | None, Any]] = queue.Queue(PREFETCH)
    stop = threading.Event()

    def put(entry: tuple[DeviceBatch | BaseException | None, Any]) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        stream = torch.cuda.Stream(device) if on_cuda else None
        pool = ThreadPoolExecutor(threads)
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                chunks = [list(items[s:s + batch_size])
                          for s in range(0, len(items), batch_size)]
                ahead: deque[_Work] = deque()
                for n in range(len(chunks)):
                    while len(ahead) < PREFETCH + 1 and n + len(ahead) < len(chunks):
                        work = _Work(chunks[n + len(ahead)])
                        work.futures = [pool.submit(load, item) for item in work.chunk]
                        ahead.append(work)
                    batch = assemble(ahead.popleft(), pool)
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put((batch, event)) or stop.is_set():
                        return
            put((None, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((exc, None))
        finally:  # a consumer that stopped early wants no more reads
            pool.shutdown(wait=True, cancel_futures=True)

    producer = threading.Thread(target=produce, name="device-batches", daemon=True)
    producer.start()
    try:
        while True:
            t0 = time.perf_counter()
            batch, event = out.get()
            timing["read_s"] += time.perf_counter() - t0
            if batch is None:
                return
            if isinstance(batch, BaseException):
                raise batch
            if event is not None:  # the model's stream waits for the producer's work
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                batch.pixels.record_stream(current)
            yield batch
    finally:
        stop.set()
        producer.join()

