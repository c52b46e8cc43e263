"""stages.models.clip against open_clip used directly (the oracle), with the built-in tiny model.

No weights can be downloaded here: real pretrained tags are only checked for their error path,
and the cached-tag path is exercised with a fake Hugging Face cache holding a tiny checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.errors import InputError
from stages.models import clip as cm

TEXTS = [
    "a dog",
    "the man on the left holding a red umbrella",
    "",
    "zebra",
    "two cats sleeping on a couch next to a remote control",
    "word " * 200,  # longer than the 77-token context: truncated by the tokenizer
    "person in blue",
    "left",
    "the second car from the right",
    "bowl",
]


@pytest.fixture(scope="module")
def tiny() -> cm.ClipBundle:
    return cm.load_clip("tiny", device="cpu")


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(200, 300), (480, 640), (224, 224)]
    ]
    gray = Image.fromarray(rng.integers(0, 256, (150, 90), dtype=np.uint8))  # mode "L"
    return [*rgb, gray]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------- loading


def test_tiny_is_deterministic_and_leaves_caller_rng_alone(tiny: cm.ClipBundle) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    again = cm.load_clip("tiny", device="cpu")
    assert torch.equal(torch.get_rng_state(), before)
    _assert_same_state(_state(tiny.model), _state(again.model))
    assert not again.model.training
    assert all(not p.requires_grad for p in again.model.parameters())


def test_tiny_goes_through_open_clip_registry(tiny: cm.ClipBundle) -> None:
    assert cm.TINY_MODEL in open_clip.list_models()
    cfg = open_clip.get_model_config(cm.TINY_MODEL)
    assert cfg["embed_dim"] == tiny.dim == 64
    assert isinstance(tiny.model, open_clip.CLIP)
    assert isinstance(tiny.tokenizer, open_clip.SimpleTokenizer)
    desc = tiny.describe()
    assert json.loads(json.dumps(desc)) == {
        "model": "nemo-tiny",
        "pretrained": None,
        "weights_sha256": None,
        "dim": 64,
        "device": "cpu",
        "dtype": "float32",
        "image_size": [224, 224],
    }


# ------------------------------------------------------------------------------- encoding


def test_encode_texts_matches_open_clip(tiny: cm.ClipBundle) -> None:
    got = cm.encode_texts(tiny, TEXTS, batch_size=3)  # 10 texts: batches of 3, 3, 3, 1
    assert got.shape == (len(TEXTS), 64) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    tokens = open_clip.get_tokenizer(cm.TINY_MODEL)(TEXTS)
    with torch.no_grad():
        ref = _unit(tiny.model.encode_text(tokens).numpy().astype(np.float64))
    cos = (got.astype(np.float64) * ref).sum(axis=1)
    assert cos.min() > 0.9999
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # rows do not depend on the batch they were encoded in
    np.testing.assert_allclose(cm.encode_texts(tiny, TEXTS, batch_size=256), got, atol=1e-5)


def test_encode_texts_edge_cases(tiny: cm.ClipBundle) -> None:
    assert cm.encode_texts(tiny, []).shape == (0, 64)
    with pytest.raises(TypeError):
        cm.encode_texts(tiny, "a single string")
    with pytest.raises(ValueError):
        cm.encode_texts(tiny, ["a"], batch_size=0)


def test_encode_image_batch_matches_open_clip(tiny: cm.ClipBundle) -> None:
    pixels = torch.stack([tiny.preprocess(im) for im in _images()])
    got = cm.encode_image_batch(tiny, pixels)
    assert got.shape == (4, 64) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = _unit(tiny.model.encode_image(pixels).numpy().astype(np.float64))
    assert (got.astype(np.float64) * ref).sum(axis=1).min() > 0.9999
    np.testing.assert_allclose(got, ref, atol=1e-5)

    with pytest.raises(ValueError, match="preprocess"):
        cm.encode_image_batch(tiny, torch.zeros(2, 3, 32, 32))


def test_preprocess_is_open_clips_eval_transform(tiny: cm.ClipBundle) -> None:
    img = _images()[0]  # 300 wide x 200 high
    _, _, reference = open_clip.create_model_and_transforms(cm.TINY_MODEL)
    out = tiny.preprocess(img)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, reference(img))

    # independent of open_clip: short side -> 224 (bicubic), centre crop, CLIP normalisation
    resized = T.Resize(224, interpolation=T.InterpolationMode.BICUBIC)(img)
    assert resized.size == (336, 224)
    manual = T.Compose(
        [
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
        ]
    )(resized)
    assert torch.allclose(out, manual, atol=1e-6)


# ------------------------------------------------------------------------------- checkpoints


def test_local_checkpoint_is_loaded(tmp_path: Path, tiny: cm.ClipBundle) -> None:
    path = cm.save_tiny_checkpoint(tmp_path / "ckpt" / "tiny.pt")
    assert path.is_file()
    saved = torch.load(path, weights_only=True)
    _assert_same_state(saved, _state(tiny.model))  # seed 0 == the default random init

    bundle = cm.load_clip("tiny", pretrained=str(path), device="cpu")
    _assert_same_state(_state(bundle.model), saved)
    assert bundle.pretrained == str(path)
    assert bundle.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bundle.describe()["weights_sha256"] == bundle.weights_sha256

    # perturbed weights really come from the file
    perturbed = {k: v.clone() for k, v in saved.items()}
    perturbed["text_projection"] += 0.5
    perturbed["visual.proj"] *= -1.0
    other = tmp_path / "perturbed.pt"
    torch.save(perturbed, other)
    loaded = cm.load_clip("tiny", pretrained=other, device="cpu")
    _assert_same_state(_state(loaded.model), perturbed)
    assert loaded.weights_sha256 == hashlib.sha256(other.read_bytes()).hexdigest()
    assert loaded.weights_sha256 != bundle.weights_sha256
    a = cm.encode_texts(bundle, TEXTS[:3])
    b = cm.encode_texts(loaded, TEXTS[:3])
    assert not np.allclose(a, b)


def test_safetensors_checkpoint(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd = torch.load(cm.save_tiny_checkpoint(tmp_path / "t.pt", seed=2), weights_only=True)
    path = tmp_path / "tiny.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    bundle = cm.load_clip("tiny", pretrained=str(path), device="cpu")
    _assert_same_state(_state(bundle.model), sd)
    assert bundle.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_seed_changes_weights(tmp_path: Path) -> None:
    s0 = torch.load(cm.save_tiny_checkpoint(tmp_path / "s0.pt", seed=0), weights_only=True)
    s1 = torch.load(cm.save_tiny_checkpoint(tmp_path / "s1.pt", seed=1), weights_only=True)
    assert not torch.equal(s0["visual.proj"], s1["visual.proj"])


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"):
        cm.load_clip("tiny", pretrained=str(junk), device="cpu")

    sd = torch.load(cm.save_tiny_checkpoint(tmp_path / "ok.pt"), weights_only=True)
    del sd["visual.proj"]
    partial = tmp_path / "partial.pt"
    torch.save(sd, partial)
    with pytest.raises(InputError, match="partial.pt"):
        cm.load_clip("tiny", pretrained=str(partial), device="cpu")


def _fake_hub_tag(monkeypatch: pytest.MonkeyPatch, cache: Path, quick_gelu: bool) -> None:
    """Register a tag `fake` for nemo-tiny pointing at a Hugging Face repo in `cache`."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    tags = {
        "fake": open_clip.pretrained._pcfg(hf_hub="nemo-test/tiny-clip/", quick_gelu=quick_gelu)
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, cm.TINY_MODEL, tags)


def _populate_cache(cache: Path, seed: int) -> Path:
    repo = cache / "models--nemo-test--tiny-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return cm.save_tiny_checkpoint(
        repo / "snapshots" / commit / "open_clip_pytorch_model.bin", seed
    )


def test_cached_tag_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _fake_hub_tag(monkeypatch, cache, quick_gelu=True)
    with pytest.raises(InputError, match="local checkpoint"):
        cm.check_model_spec("tiny", "fake")  # not cached yet

    ckpt = _populate_cache(cache, seed=3)
    offline_before = constants.HF_HUB_OFFLINE
    bundle = cm.load_clip("tiny", pretrained="FAKE", device="cpu")  # tags are case-insensitive
    offline_after = constants.HF_HUB_OFFLINE  # restored after the load
    assert offline_after == offline_before
    assert bundle.pretrained == "fake"
    _assert_same_state(_state(bundle.model), torch.load(ckpt, weights_only=True))
    assert bundle.weights_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # the tag was trained with QuickGELU: the model must use it (open_clip 3.3 only warns)
    acts = [m for m in bundle.model.modules() if isinstance(m, open_clip.transformer.QuickGELU)]
    assert acts


# ------------------------------------------------------------------------------- errors


def test_unknown_model_name_suggests_close_matches() -> None:
    with pytest.raises(InputError, match="ViT-B-16") as exc:
        cm.check_model_spec("ViT-B-166", None)
    assert "list_models" in str(exc.value)
    with pytest.raises(InputError, match="ViT-B-16"):
        cm.load_clip("ViT-B-166")
    cm.check_model_spec("vit-b-16", None)  # unique case-insensitive match is accepted
    cm.check_model_spec("ViT-B/16", None)  # open_clip's own "/" spelling


def test_missing_checkpoint_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(InputError, match="does not exist") as exc:
        cm.check_model_spec("ViT-B-16", str(missing))
    assert str(missing) in str(exc.value)
    with pytest.raises(InputError, match="directory"):
        cm.load_clip("tiny", pretrained=str(tmp_path))


def test_uncached_real_tag_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    start = time.monotonic()
    with pytest.raises(InputError) as exc:
        cm.load_clip("ViT-B-32", pretrained="openai", device="cpu")
    assert time.monotonic() - start < 10
    msg = str(exc.value)
    assert "local checkpoint" in msg and "embed.pretrained=" in msg and "ViT-B-32" in msg
    with pytest.raises(InputError, match="local checkpoint"):
        cm.check_model_spec("ViT-B-32", "openai")


def test_resolve_device() -> None:
    assert cm.resolve_device("cpu") == torch.device("cpu")
    auto = cm.resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ["tpu", "cuda:x"]:
        with pytest.raises(ValueError):
            cm.resolve_device(bad)
    if not torch.cuda.is_available():
        for missing in ["cuda", "cuda:1"]:
            with pytest.raises(InputError, match="CUDA is not available") as exc:
                cm.resolve_device(missing)
            assert isinstance(exc.value, ValueError)
    else:
        with pytest.raises(ValueError, match="does not exist"):
            cm.resolve_device(f"cuda:{torch.cuda.device_count()}")


# ------------------------------------------------------------------------------- memory


def test_check_memory(tiny: cm.ClipBundle) -> None:
    with pytest.raises(InputError, match="embed.batch_size") as exc:
        cm.check_memory(tiny, 64, "image", available_bytes=1000)
    assert isinstance(exc.value, MemoryError)
    assert "nemo-tiny" in str(exc.value) and "64" in str(exc.value)
    cm.check_memory(tiny, 64, "image", available_bytes=1 << 50)
    cm.check_memory(tiny, 1, "text")  # default budget: available RAM (or free CUDA memory)

    budget = cm.estimate_memory_bytes(tiny, 8, "image")
    with pytest.raises(InputError, match=r"e\.g\. to 8"):
        cm.check_memory(tiny, 1024, "image", available_bytes=budget)


def test_estimate_grows_with_batch(tiny: cm.ClipBundle) -> None:
    params = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
    for kind in ("image", "text"):
        sizes = [cm.estimate_memory_bytes(tiny, b, kind) for b in (1, 2, 64, 1024)]
        assert sizes == sorted(set(sizes))
        assert sizes[0] > params


@pytest.mark.parametrize("kind", ["image", "text"])
def test_auto_batch_size(tiny: cm.ClipBundle, kind: str) -> None:
    budget = cm.estimate_memory_bytes(tiny, 16, kind) + 1
    size = cm.auto_batch_size(tiny, kind, available_bytes=budget)
    assert size == 16
    assert cm.estimate_memory_bytes(tiny, size, kind) <= budget
    assert cm.estimate_memory_bytes(tiny, 2 * size, kind) > budget

    assert cm.auto_batch_size(tiny, kind, available_bytes=1 << 50, cap=100) == 64
    assert cm.auto_batch_size(tiny, kind, available_bytes=1 << 50) == 1024
    with pytest.raises(InputError, match="smaller model"):
        cm.auto_batch_size(tiny, kind, available_bytes=1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_matches_cpu(tiny: cm.ClipBundle) -> None:
    gpu = cm.load_clip("tiny", device="cuda")
    assert gpu.dtype == "float16"
    got = cm.encode_texts(gpu, TEXTS)
    assert got.dtype == np.float32
    ref = cm.encode_texts(tiny, TEXTS)
    assert (got * ref).sum(axis=1).min() > 0.99
