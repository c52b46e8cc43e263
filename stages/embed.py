"""embed_images / embed_texts: CLIP embeddings of every image and every sentence.

Images are decoded by a pool of threads that runs ahead of the model (PIL releases the GIL while
decoding and resizing), so decode overlaps inference; the read / infer / write split and the
share of time the model was busy go into the manifest, so a decode bottleneck is visible.
On a GPU that pool cannot feed the model: `embed.decode=gpu` (the default there, through
`auto`) has the threads only read the files and decodes the JPEGs in batches on the device
(stages.ops.gpu_images), every other file still through PIL. Embeddings are stored
L2-normalised as float16.

`encode_sentences` is the shared text encoder: later stages (clusters, hard negatives) embed
their own texts with the same model and code, without `embed_texts` depending on them.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from pipeline.errors import InputError
from pipeline.filehash import FileHashCache
from pipeline.stage import (
    Count,
    Device,
    Name,
    NonNegInt,
    Params,
    RunEnv,
    ShardTask,
    ShardWriter,
    Stage,
    StageContext,
    runtime_field,
)
from stages.ingest import data_locations
from stages.refer.manifests import load_data_manifest

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from stages.models.clip import ClipBundle

log = logging.getLogger(__name__)


class EmbedParams(Params):
    model: Name = Field("ViT-B-16", description="open_clip model name, or `tiny`")
    pretrained: Name | None = Field(
        "auto", description="open_clip pretrained tag (weights already cached) or a local "
                            "checkpoint file; null for a seeded random init; auto: `openai` "
                            "for an open_clip model, null for `tiny` (it has no weights)")
    batch_size: NonNegInt = runtime_field(0, "images/texts per forward pass (0: largest that "
                                             "fits)")
    device: Device = runtime_field("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    fast_decode: bool = Field(False, description="decode JPEGs at reduced size with PIL draft() "
                                                 "before the model's resize (changes output)")
    decode: Literal["auto", "pil", "gpu"] = Field(
        "auto", description="image decode and preprocessing: pil (open_clip's exact PIL "
                            "transform), gpu (JPEGs decoded in batches on the model's device, "
                            "nvjpeg on CUDA, and preprocessed there; the same tensor code on "
                            "CPU), auto: gpu on CUDA, pil otherwise (and with fast_decode)")
    workers: NonNegInt = runtime_field(0, "image decode threads (0: one per core)")
    strict: bool = runtime_field(False, "an undecodable image is fatal instead of recorded")
    images_per_shard: Count = Field(1024, description="images per resumable shard")
    texts_per_shard: Count = Field(16384, description="sentences per resumable shard")

    @model_validator(mode="before")
    @classmethod
    def _weights_for_the_model(cls, data: Any) -> Any:
        """`auto` weights become what the model has: `--set embed.model=tiny` alone must not go
        looking for OpenAI weights of a model that has none. Resolved here, so the key and the
        manifest hold the weights actually used."""
        if isinstance(data, dict) and data.get("pretrained", "auto") == "auto":
            tiny = str(data.get("model", "ViT-B-16")).strip().lower() == "tiny"
            data = {**data, "pretrained": None if tiny else "openai"}
        return data


# -- model cache: each process (driver or dask worker) loads a model once --------------------
def get_bundle(model: str, pretrained: str | None, device: str = "auto") -> ClipBundle:
    from pipeline.process_cache import process_cached
    from stages.models.clip import load_clip

    return process_cached("clip", (model, pretrained, device),
                          lambda: load_clip(model, pretrained, device))


def encode_sentences(params: EmbedParams, texts: Sequence[str]) -> np.ndarray:
    """The shared text encoder: (n, d) float32, L2-normalised, same model as `embed_texts`."""
    from stages.models.clip import auto_batch_size, encode_texts

    bundle = get_bundle(params.model, params.pretrained, params.device)
    batch = params.batch_size or auto_batch_size(bundle, "text", cap=512)
    return encode_texts(bundle, texts, batch_size=batch)


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """float16 fixed_size_list<d> column from (n, d) vectors."""
    import numpy as np
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    flat = pa.array(vectors.reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def embeddings_matrix(column: pa.ChunkedArray | pa.Array, dtype: Any = None) -> np.ndarray:
    """(n, d) numpy matrix from an embedding column (float32 unless `dtype` says otherwise).

    Chunk by chunk into one preallocated matrix: combining the chunks first would copy the
    stored column once more (120k x 512 float16 is 120 MiB) before the cast copies it again.
    `flatten` (not `.values`) honours a sliced chunk's offset."""
    import numpy as np
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    d = column.type.list_size
    out = np.empty((len(column), d), dtype or np.float32)
    row = 0
    for chunk in chunks:
        if chunk.null_count:  # the embed stages never write one: a damaged or foreign table
            raise ValueError(f"embedding column has {chunk.null_count} null rows; every row "
                             "needs a vector (rebuild the embedding stage's artifact)")
        out[row:row + len(chunk)] = chunk.flatten().to_numpy(
            zero_copy_only=False).reshape(-1, d)
        row += len(chunk)
    return out


def resolve_decode(params: EmbedParams, bundle: ClipBundle) -> str:
    """`pil` or `gpu`: what `embed.decode` means for this model on this device.

    `auto` is gpu on CUDA and pil elsewhere, like the device itself (which, with its fp16
    autocast, already changes the embeddings outside the key): one config gives one output per
    kind of device, and the manifest records which path ran. It stays pil with fast_decode (a
    PIL feature), without torchvision, or when the model's transform has a step the tensor
    path does not reproduce; an explicit `gpu` fails on those instead.
    """
    from stages.ops.gpu_images import TensorPreprocess, UnsupportedPreprocess, torchvision_missing

    if params.decode == "pil" or (params.decode == "auto" and (
            bundle.device.type != "cuda" or params.fast_decode
            or torchvision_missing() is not None)):
        return "pil"
    try:
        TensorPreprocess.from_transform(bundle.preprocess)
    except UnsupportedPreprocess as exc:
        if params.decode == "gpu":
            raise
        log.info("embed.decode=auto: %s; decoding with PIL", exc)
        return "pil"
    return "gpu"


TEXT_ENCODER_FIELDS = ("model", "pretrained")
"""The `embed` fields that decide a text embedding: the key fields of every stage that encodes
text with the shared encoder (`encode_sentences`); image decode and sharding are not."""


class _EmbedStage(Stage[EmbedParams]):
    section = "embed"
    inputs = ("ingest",)
    tables = ("embeddings",)
    libraries = ("pyarrow", "torch", "open_clip_torch", "pillow")

    def fingerprint(self, env: RunEnv, params: EmbedParams) -> dict[str, Any]:
        p = params
        value = (p.pretrained or "").strip()
        if not value or not Path(value).expanduser().is_file():
            return {}  # random init, a tag (fixed by name), or what the preflight refuses
        from stages.models.clip import checkpoint_path  # a file: is it also a tag? (loads
        # open_clip, so only here: `status` on the usual configs stays light)

        path = checkpoint_path(p.model, p.pretrained)
        if path is None:  # a tag of the model that happens to name a file too: the tag wins
            return {}
        digest = FileHashCache.for_work_dir(env.work_dir).digests([path])
        found = digest[path.absolute()]
        if found is None:
            raise InputError(f"embed.pretrained={p.pretrained}: the checkpoint file went away "
                             "while its key was computed; give an existing local file")
        return {"weights_xxh3": found.digest}

    def preflight(self, env: RunEnv, params: EmbedParams) -> None:
        from stages.models.clip import check_memory, check_model_spec

        p = params
        check_model_spec(p.model, p.pretrained)
        if self.name == "embed_images" and p.decode == "gpu":
            if p.fast_decode:
                raise InputError("embed.fast_decode=true is PIL's reduced-size JPEG decode and "
                                 "embed.decode=gpu decodes on the device: set one of them "
                                 "(--set embed.decode=pil or --set embed.fast_decode=false)")
            from stages.ops.gpu_images import torchvision_missing

            if (problem := torchvision_missing()) is not None:
                raise InputError(problem)
        if p.batch_size:
            bundle = get_bundle(p.model, p.pretrained, p.device)
            check_memory(bundle, p.batch_size, "image" if self.name == "embed_images" else "text")

    def _describe_model(self, ctx: StageContext, bundle: ClipBundle, batch: int) -> None:
        ctx.extra["model"] = bundle.describe()
        ctx.extra["device"] = str(bundle.device)
        ctx.extra["dtype"] = "float16"  # stored dtype; compute dtype is in model.dtype
        ctx.record(batch_size=batch, dim=bundle.dim)


class EmbedImages(_EmbedStage):
    """CLIP image embeddings of every ingested image (open_clip's own preprocessing)."""

    name = "embed_images"
    version = "1"
    tables = ("embeddings", "errors")
    key_fields = {"embed": (*TEXT_ENCODER_FIELDS, "fast_decode", "decode", "images_per_shard")}

    def run(self, ctx: StageContext[EmbedParams]) -> None:
        from stages.models.clip import auto_batch_size

        p = ctx.params
        manifest = load_data_manifest(ctx.env.dataset)
        _, images_dir = data_locations(ctx.env, manifest)
        images = ctx.read_table("ingest", "images").select(["image_id", "file_name"])
        bundle = get_bundle(p.model, p.pretrained, p.device)
        batch = p.batch_size or auto_batch_size(bundle, "image", cap=256)
        self._describe_model(ctx, bundle, batch)
        decode = resolve_decode(p, bundle)
        ctx.extra["decode"] = decode
        ids = images.column("image_id").to_pylist()
        names = images.column("file_name").to_pylist()
        order = sorted(range(len(ids)), key=ids.__getitem__)
        tasks = []
        for n, start in enumerate(range(0, len(order), p.images_per_shard)):
            chunk = order[start:start + p.images_per_shard]
            tasks.append(ShardTask(n, {
                "items": [(ids[i], str(images_dir / names[i])) for i in chunk],
                "batch": batch, "decode": decode,
            }))
        stats = ctx.run_shards(_embed_images_shard, tasks, desc="embed images")
        failed = [f for s in stats for f in s["failed"]]
        if failed and p.strict:
            raise InputError(f"{len(failed)} images could not be decoded (embed.strict=true); "
                             f"first: {failed[0][1]}: {failed[0][2]}")
        if failed:
            log.warning("%d images could not be decoded and were skipped; see the errors table",
                        len(failed))
        _write_errors(ctx, failed)
        timing = {k: round(sum(s[k] for s in stats), 3) for k in ("read_s", "infer_s", "write_s")}
        wall = sum(s["wall_s"] for s in stats)
        ctx.record(images=sum(s["rows"] for s in stats), failed=len(failed), decode=decode,
                   pil_fallbacks=sum(s.get("pil_fallbacks", 0) for s in stats), **timing,
                   model_busy_share=round(timing["infer_s"] / wall, 3) if wall else None,
                   images_per_s=round(sum(s["rows"] for s in stats) / wall, 1) if wall else None)


class EmbedTexts(_EmbedStage):
    """CLIP text embeddings of every sentence of every split."""

    name = "embed_texts"
    version = "1"
    key_fields = {"embed": (*TEXT_ENCODER_FIELDS, "texts_per_shard")}

    def run(self, ctx: StageContext[EmbedParams]) -> None:
        from stages.models.clip import auto_batch_size

        p = ctx.params
        sents = ctx.read_table("ingest", "sentences").select(["sent_id", "ref_id", "sent"])
        sents = sents.sort_by("sent_id")
        bundle = get_bundle(p.model, p.pretrained, p.device)
        batch = p.batch_size or auto_batch_size(bundle, "text", cap=512)
        self._describe_model(ctx, bundle, batch)
        sid = sents.column("sent_id").to_pylist()
        rid = sents.column("ref_id").to_pylist()
        text = sents.column("sent").to_pylist()
        tasks = [
            ShardTask(n, {"sent_id": sid[s:s + p.texts_per_shard],
                          "ref_id": rid[s:s + p.texts_per_shard],
                          "text": text[s:s + p.texts_per_shard],
                          "batch": batch})
            for n, s in enumerate(range(0, len(sid), p.texts_per_shard))
        ]
        stats = ctx.run_shards(_embed_texts_shard, tasks, desc="embed texts")
        ctx.record(sentences=len(sid), infer_s=round(sum(s["infer_s"] for s in stats), 3))


def _write_errors(ctx: StageContext, failed: list[tuple[int, str, str]]) -> None:
    import pyarrow as pa

    ctx.write_table("errors", pa.table({
        "stage": pa.array([ctx.stage.name] * len(failed), pa.string()),
        "item_id": pa.array([f[0] for f in failed], pa.int64()),
        "path": pa.array([f[1] for f in failed], pa.string()),
        "error": pa.array([f[2] for f in failed], pa.string()),
    }))


def load_pixels(path: str, preprocess: Callable[[Any], Any], fast_decode: bool,
                size: tuple[int, int]) -> Any:
    """Decode and preprocess one image exactly as open_clip would (PIL -> model transform)."""
    from PIL import Image

    with Image.open(path) as im:
        if fast_decode:
            im.draft("RGB", size)  # JPEG DCT scaling to the smallest scale >= size
        return preprocess(im.convert("RGB"))


def decoded_batches(items: Iterable[Any], decode: Callable[[Any], Any], batch_size: int,
                    threads: int, timing: dict[str, float]) -> Iterator[list[tuple[Any, Any]]]:
    """Batches of (item, decoded or exception), in input order, decoded ahead in threads.

    Time spent waiting for a decode is added to timing["read_s"].
    """
    def safe(item: Any) -> Any:
        try:
            return decode(item)
        except Exception as exc:  # reported per item, not fatal here
            return exc

    it = iter(items)
    with ThreadPoolExecutor(threads) as pool:
        pending = deque((x, pool.submit(safe, x)) for x in islice(it, 2 * batch_size + threads))
        batch: list[tuple[Any, Any]] = []
        while pending:
            item, fut = pending.popleft()
            t0 = time.perf_counter()
            result = fut.result()
            timing["read_s"] += time.perf_counter() - t0
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(safe, nxt)))
            batch.append((item, result))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def _embed_images_shard(payload: dict[str, Any],
                        writer: ShardWriter[EmbedParams]) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa

    started = time.perf_counter()
    p = writer.params
    bundle = get_bundle(p.model, p.pretrained, p.device)
    threads = p.workers or (os.cpu_count() or 1)
    timing = {"read_s": 0.0, "infer_s": 0.0, "write_s": 0.0}
    ids: list[int] = []
    vectors: list[np.ndarray] = []
    failed: list[tuple[int, str, str]] = []

    def decode(item: tuple[int, str]) -> Any:
        return load_pixels(item[1], bundle.preprocess, p.fast_decode, bundle.image_size)

    if payload.get("decode") == "gpu":
        fallbacks = _embed_on_device(payload["items"], bundle, decode, payload["batch"],
                                     threads, timing, ids, vectors, failed)
    else:
        fallbacks = 0
        _embed_with_pil(payload["items"], bundle, decode, payload["batch"], threads, timing,
                        ids, vectors, failed)

    t0 = time.perf_counter()
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, bundle.dim), np.float32)
    writer.write_table("embeddings", pa.table({
        "image_id": pa.array(ids, pa.int64()),
        "embedding": embedding_array(matrix),
    }))
    timing["write_s"] += time.perf_counter() - t0
    return {"rows": len(ids), "failed": failed, "wall_s": time.perf_counter() - started,
            "pil_fallbacks": fallbacks, **timing}


def _undecodable(item: tuple[int, str], exc: BaseException) -> tuple[int, str, str]:
    return (item[0], item[1], f"undecodable: {type(exc).__name__}: {exc}")


def _embed_with_pil(items: list[tuple[int, str]], bundle: ClipBundle, decode: Callable,
                    batch_size: int, threads: int, timing: dict[str, float], ids: list[int],
                    vectors: list[np.ndarray], failed: list[tuple[int, str, str]]) -> None:
    """The exact path: open_clip's PIL transform in a thread pool, batches to the model."""
    import torch

    from stages.models.clip import encode_image_batch

    pin = bundle.device.type == "cuda"
    for batch in decoded_batches(items, decode, batch_size, threads, timing):
        good = [(item, px) for item, px in batch if not isinstance(px, Exception)]
        failed.extend(_undecodable(item, px) for item, px in batch if isinstance(px, Exception))
        if not good:
            continue
        pixels = torch.stack([px for _, px in good])
        if pin:
            pixels = pixels.pin_memory()
        t0 = time.perf_counter()
        vectors.append(encode_image_batch(bundle, pixels))
        timing["infer_s"] += time.perf_counter() - t0
        ids.extend(item[0] for item, _ in good)


def _embed_on_device(items: list[tuple[int, str]], bundle: ClipBundle, decode: Callable,
                     batch_size: int, threads: int, timing: dict[str, float], ids: list[int],
                     vectors: list[np.ndarray], failed: list[tuple[int, str, str]]) -> int:
    """decode=gpu: JPEGs decoded and preprocessed in batches on the model's device, ahead of
    the model (stages.ops.gpu_images); other files through `decode` (the PIL path), so their
    pixels and errors are the PIL path's. Returns how many images took the PIL path."""
    from PIL import Image

    from stages.models.clip import encode_image_batch
    from stages.ops.gpu_images import TensorPreprocess, device_batches

    prep = TensorPreprocess.from_transform(bundle.preprocess)
    fallbacks = 0
    for batch in device_batches(items, prep, decode, batch_size, threads, bundle.device,
                                timing, max_pixels=Image.MAX_IMAGE_PIXELS):
        fallbacks += batch.fallbacks
        failed.extend(_undecodable(item, exc) for item, exc in batch.failed)
        if not batch.good:
            continue
        t0 = time.perf_counter()
        vectors.append(encode_image_batch(bundle, batch.pixels))
        timing["infer_s"] += time.perf_counter() - t0
        ids.extend(item[0] for item in batch.good)
    return fallbacks


def _embed_texts_shard(payload: dict[str, Any], writer: ShardWriter[EmbedParams]) -> dict[str, Any]:
    import pyarrow as pa

    p = writer.params
    t0 = time.perf_counter()
    p = p.model_copy(update={"batch_size": payload["batch"]})
    vectors = encode_sentences(p, payload["text"])
    infer = time.perf_counter() - t0
    writer.write_table("embeddings", pa.table({
        "sent_id": pa.array(payload["sent_id"], pa.int64()),
        "ref_id": pa.array(payload["ref_id"], pa.int64()),
        "embedding": embedding_array(vectors),
    }))
    return {"rows": len(payload["sent_id"]), "infer_s": infer}
