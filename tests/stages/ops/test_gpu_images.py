"""embed.decode=gpu (stages.ops.gpu_images) on CPU tensors against the PIL path.

The oracle is open_clip's own PIL transform (`load_pixels`, the `pil` path). The JPEGs are
photo-like (smooth gradients, shapes, sensor noise, JPEG artefacts) in several sizes, aspects,
chroma subsamplings and a progressive one; the fallback cases (PNG, CMYK, greyscale, corrupt,
missing) must come out exactly as on the PIL path, errors included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from pipeline.api import open_pipeline
from pipeline.errors import InputError
from pipeline.stage import ShardWriter
from stages.embed import EmbedParams, _embed_images_shard, embeddings_matrix, load_pixels
from stages.models.clip import encode_image_batch, load_clip
from stages.ops.gpu_images import (
    TensorPreprocess,
    UnsupportedPreprocess,
    decode_jpegs,
    device_batches,
    jpeg_fallback_reason,
)

# torchvision 0.29 deprecates its image io (TorchCodec replaces it); it still works
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")

# (width, height, quality, subsampling (0: 4:4:4, 1: 4:2:2, 2: 4:2:0), progressive)
JPEGS = [(640, 480, 90, 2, False), (480, 640, 85, 2, False), (500, 333, 95, 0, False),
         (1024, 768, 80, 1, False), (224, 224, 90, 2, False), (100, 80, 90, 2, False),
         (641, 479, 75, 2, True), (333, 500, 92, 0, False), (1280, 400, 88, 2, False)]
# measured on these images (README "GPU image pipeline"): resized pixels differ by at most 1
# grey level, 14% of them by 1 (rounding); the asserts keep a margin
MAX_LEVELS, MEAN_LEVELS = 2, 0.3


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: smooth gradients, blurred shapes, fine texture, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        128 + 90 * np.sin(x / rng.uniform(40, 140) + rng.uniform(0, 6)),
        128 + 90 * np.cos(y / rng.uniform(40, 140) + rng.uniform(0, 6)),
        128 + 60 * np.sin((x + y) / rng.uniform(60, 200))], axis=-1)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(10, max(11, width // 3)), rng.integers(10, max(11, height // 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h],
                                                                  fill=color)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, 6, arr.shape)  # sensor noise and texture
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for n, (w, h, q, sub, prog) in enumerate(JPEGS):
        path = folder / f"photo_{n}.jpg"
        photo(w, h, n).save(path, quality=q, subsampling=sub, progressive=prog)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory, images) -> dict[str, Path]:
    """Files the tensor path must leave to PIL, and one corrupt JPEG it decodes as PIL does."""
    folder = tmp_path_factory.mktemp("odd")
    src = photo(320, 240, 99)
    out = {name: folder / name for name in (
        "rgb.png", "palette.png", "cmyk.jpg", "grey.jpg", "truncated.jpg", "garbage.jpg",
        "cut_with_end_marker.jpg", "missing.jpg")}
    src.save(out["rgb.png"])
    src.convert("P").save(out["palette.png"])
    src.convert("CMYK").save(out["cmyk.jpg"], quality=90)
    src.convert("L").save(out["grey.jpg"], quality=90)
    data = images[0].read_bytes()
    out["truncated.jpg"].write_bytes(data[:len(data) // 2])
    # passes the header checks; libjpeg on both paths fills the missing data with grey
    out["cut_with_end_marker.jpg"].write_bytes(data[:len(data) // 2] + b"\xff\xd9")
    out["garbage.jpg"].write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 20 + b"\xff\xd9")
    return out


@pytest.fixture(scope="module")
def bundle():
    return load_clip("tiny", None, "cpu")


def shard(tmp: Path, items: list[tuple[int, str]], decode: str, batch: int = 4):
    params = EmbedParams(model="tiny", pretrained=None, batch_size=batch, workers=2)
    writer = ShardWriter(tmp / decode, 0, "1", params)
    stats = _embed_images_shard({"items": items, "batch": batch, "decode": decode}, writer)
    table = pq.read_table(tmp / decode / "embeddings" / "part-00000.parquet")
    return stats, table


def test_pixels_and_embeddings_match_pil(images, bundle):
    prep = TensorPreprocess.from_transform(bundle.preprocess)
    from torchvision.io import decode_jpeg

    pil, ours = [], []
    for path in images:
        pil.append(load_pixels(str(path), bundle.preprocess, False, bundle.image_size))
        raw = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        # decoding alone is bit-identical (libjpeg-turbo on both sides)
        rgb = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(decode_jpeg(raw).permute(1, 2, 0).numpy(), rgb), path.name
        ours.append(prep(decode_jpegs([raw], torch.device("cpu"))))
    a, b = torch.stack(pil), torch.cat(ours)
    assert a.shape == b.shape == (len(images), 3, 224, 224)
    levels = (a - b).abs() * torch.tensor(prep.std).view(1, 3, 1, 1) * 255  # grey levels
    assert levels.max() <= MAX_LEVELS + 1e-3
    assert levels.mean() < MEAN_LEVELS
    ea, eb = encode_image_batch(bundle, a), encode_image_batch(bundle, b)
    cos = (ea * eb).sum(1)
    assert cos.min() >= 0.999


def test_batches_of_mixed_sizes_equal_one_by_one(images, bundle):
    prep = TensorPreprocess.from_transform(bundle.preprocess)
    raws = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in images]
    together = prep(decode_jpegs(raws * 2, torch.device("cpu")))  # repeated sizes: grouped
    alone = torch.cat([prep(decode_jpegs([r], torch.device("cpu"))) for r in raws * 2])
    assert torch.equal(together, alone)


def test_stage_shard_gpu_path_on_cpu_equals_pil(tmp_path, images, odd_files):
    items = [(i, str(p)) for i, p in enumerate([*images, *odd_files.values()])]
    s_pil, t_pil = shard(tmp_path, items, "pil")
    s_gpu, t_gpu = shard(tmp_path, items, "gpu")
    assert t_gpu.column("image_id").to_pylist() == t_pil.column("image_id").to_pylist()
    # the same images fail, with the same records (PIL's own errors)
    assert s_gpu["failed"] == s_pil["failed"]
    assert {f[1].rsplit("/", 1)[1] for f in s_pil["failed"]} == {
        "truncated.jpg", "garbage.jpg", "missing.jpg"}
    # every odd file but the decodable corrupt one, none of the photos
    assert s_gpu["pil_fallbacks"] == len(odd_files) - 1
    a = embeddings_matrix(t_pil.column("embedding"))
    b = embeddings_matrix(t_gpu.column("embedding"))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999
    # the fallback images went through PIL: bit-identical stored embeddings
    n = len(images)
    ok_odd = [k for k, i in enumerate(t_pil.column("image_id").to_pylist()) if n <= i < n + 4]
    assert len(ok_odd) == 4 and np.array_equal(a[ok_odd], b[ok_odd])


def test_fallback_reasons():
    def jpeg(img: Image.Image, **kw) -> bytes:
        import io

        buf = io.BytesIO()
        img.save(buf, "JPEG", **kw)
        return buf.getvalue()

    rgb = photo(64, 48, 1)
    assert jpeg_fallback_reason(jpeg(rgb)) is None
    assert jpeg_fallback_reason(jpeg(rgb, progressive=True)) is None
    assert jpeg_fallback_reason(jpeg(rgb.convert("L"))) == "greyscale"
    assert jpeg_fallback_reason(jpeg(rgb.convert("CMYK"))) in (
        "CMYK/YCCK", "Adobe colour-transform marker")
    assert jpeg_fallback_reason(jpeg(rgb)[:300]).startswith("no end-of-image")
    assert jpeg_fallback_reason(b"\x89PNG\r\n\x1a\n") == "not a JPEG"
    assert jpeg_fallback_reason(b"") == "not a JPEG"
    assert jpeg_fallback_reason(jpeg(rgb), max_pixels=64 * 48 - 1).startswith("larger")


def test_a_bad_image_in_a_batch_does_not_lose_the_others(images):
    good = torch.frombuffer(bytearray(images[0].read_bytes()), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0" + b"\x00" * 50 + b"\xff\xd9"),
                           dtype=torch.uint8)
    out = decode_jpegs([good, bad, good], torch.device("cpu"))
    assert isinstance(out[1], Exception)
    assert torch.equal(out[0], out[2]) and out[0].shape == (3, 480, 640)


def test_preprocessing_is_read_from_the_transform(images):
    """Another size, interpolation, mean and std: read from the transform, and still PIL's."""
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(160, interpolation=T.InterpolationMode.BILINEAR),
                           T.CenterCrop(144), T.ToTensor(),
                           T.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.25))])
    prep = TensorPreprocess.from_transform(transform)
    assert (prep.size, prep.crop, prep.mean, prep.std) == (160, (144, 144), (0.5, 0.4, 0.3),
                                                           (0.2, 0.3, 0.25))
    raw = torch.frombuffer(bytearray(images[2].read_bytes()), dtype=torch.uint8)
    ours = prep(decode_jpegs([raw], torch.device("cpu")))[0]
    want = transform(Image.open(images[2]).convert("RGB"))
    levels = (ours - want).abs() * torch.tensor(prep.std).view(3, 1, 1) * 255
    assert levels.max() <= MAX_LEVELS + 1e-3


def test_unsupported_preprocessing_is_refused():
    import open_clip

    transform = open_clip.image_transform(224, is_train=False, resize_mode="longest")
    with pytest.raises(UnsupportedPreprocess, match="embed.decode=pil"):
        TensorPreprocess.from_transform(transform)


def test_batched_decode_equals_per_image_decode(images, odd_files, bundle):
    """The producer's batched decode (nvjpeg's mode on CUDA), run on CPU: the same pixels,
    the same PIL fallbacks and errors as decoding one by one in the reading threads."""
    prep = TensorPreprocess.from_transform(bundle.preprocess)

    def pil(item):
        return load_pixels(item[1], bundle.preprocess, False, bundle.image_size)

    items = [(i, str(p)) for i, p in enumerate([*images, *odd_files.values()])]
    runs = []
    for batched in (False, True):
        batches = list(device_batches(items, prep, pil, 5, 2, torch.device("cpu"),
                                      {"read_s": 0.0}, batched=batched))
        runs.append((
            [i for b in batches for i, _ in b.good],
            torch.cat([b.pixels for b in batches]),
            [(i, type(e).__name__, str(e)) for b in batches for (i, _), e in b.failed],
            sum(b.fallbacks for b in batches)))
    (ids_a, px_a, fail_a, fb_a), (ids_b, px_b, fail_b, fb_b) = runs
    assert ids_a == ids_b and fail_a == fail_b and fb_a == fb_b == len(odd_files) - 1
    assert torch.equal(px_a, px_b)
    assert len(fail_a) == 3


def test_consumer_stopping_early_stops_the_producer(images, bundle):
    prep = TensorPreprocess.from_transform(bundle.preprocess)
    timing = {"read_s": 0.0}

    def pil(item):
        return load_pixels(item[1], bundle.preprocess, False, bundle.image_size)

    items = [(i, str(p)) for i, p in enumerate(images * 4)]
    batches = device_batches(items, prep, pil, 2, 2, torch.device("cpu"), timing)
    first = next(batches)
    assert [i for i, _ in first.good] == [0, 1] and first.pixels.shape == (2, 3, 224, 224)
    batches.close()  # must return, not hang on the producer


def run_pipe(demo, work, *sets):
    pipe = open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=["embed.model=tiny", "embed.pretrained=null",
                               "embed.batch_size=8", *sets], progress=False)
    pipe.run("embed_images")
    manifest = json.loads((pipe.artifact_dir("embed_images") / "_manifest.json").read_text())
    return pipe, manifest


def test_decode_in_the_key_auto_is_pil_on_cpu(demo, tmp_path):
    pipe, auto = run_pipe(demo, tmp_path / "w")
    assert auto["decode"] == "pil" and auto["stats"]["decode"] == "pil"
    gpu_pipe, gpu = run_pipe(demo, tmp_path / "w", "embed.decode=gpu")
    assert gpu["decode"] == "gpu"
    pil_pipe = open_pipeline("refcoco", tmp_path / "w", data_root=demo.refer_root,
                             images=demo.images_dir, sets=["embed.model=tiny",
                                                           "embed.decode=pil"])
    keys = {pipe.resolve("embed_images").key, gpu_pipe.resolve("embed_images").key,
            pil_pipe.resolve("embed_images").key}
    assert len(keys) == 3  # auto, gpu and pil: three keys (auto follows the device)
    a = embeddings_matrix(pq.read_table(pipe.artifact_dir("embed_images") / "embeddings")
                          .column("embedding"))
    b = embeddings_matrix(pq.read_table(gpu_pipe.artifact_dir("embed_images") / "embeddings")
                          .column("embedding"))
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.999


def test_gpu_decode_refuses_fast_decode_and_missing_torchvision(demo, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="fast_decode"):
        run_pipe(demo, tmp_path / "a", "embed.decode=gpu", "embed.fast_decode=true")
    import stages.ops.gpu_images as gi

    monkeypatch.setattr(gi, "torchvision_missing",
                        lambda: "embed.decode=gpu needs torchvision (ImportError: test)")
    with pytest.raises(InputError, match="needs torchvision"):
        run_pipe(demo, tmp_path / "b", "embed.decode=gpu")
    assert not (tmp_path / "b" / "refcoco" / "ingest").exists()  # refused before any work
