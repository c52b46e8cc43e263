"""Trainer adapters: turn a :class:`pipeline.dataset.NemoDataset` sample into exactly what a
given referring-segmentation trainer's own dataset returns, so NeMo data can be swapped in
without touching the model or training-loop code.

Input: the NemoDataset sample dict::

    image      PIL.Image (RGB, W x H)          mask      np.uint8 (H, W) in {0, 1}
    sentence   str                             meta      {sent_id, ref_id, image_id, split,
    hard_negatives / hard_negative_kinds              no_target, index, epoch, is_mosaic, ...}

Adapters (``get_adapter(name, **options)``; ``ADAPTERS`` maps each name to its class)::

    generic  (image, mask, text) namedtuple          -> :class:`GenericAdapter`
    cris     CRIS   utils/dataset.py RefDataset       -> :class:`CrisAdapter`
    lavt     LAVT   data/dataset_refer_bert.py         -> :class:`LavtAdapter`
    rela     ReLA   RefCOCOMapper (gRefCOCO, GRES)     -> :class:`RelaAdapter`

Every adapter is a plain picklable callable (DataLoader workers), deterministic (the trainers'
own randomness is only *which* sentence of a ref to use; NeMo already picked it), and ignores
``hard_negatives`` (none of these trainers reads them). Tokenizers are loaded lazily on the first
call, so building an adapter never touches the network. Heavy imports (open_clip, transformers,
torchvision) happen inside functions only. Each class docstring names the upstream file and
commit it reproduces and lists every known deviation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from pipeline.errors import ConfigError, InputError

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdaptedDataset",
    "CrisAdapter",
    "GenericAdapter",
    "GenericSample",
    "LavtAdapter",
    "RelaAdapter",
    "UnknownAdapterError",
    "bert_encode_padded",
    "clip_tokenize",
    "cris_transform_mat",
    "cv2_warp_affine",
    "get_adapter",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@runtime_checkable
class Adapter(Protocol):
    """Anything that maps one NemoDataset sample dict to a trainer's native sample."""

    def __call__(self, sample: dict) -> Any: ...


class UnknownAdapterError(ConfigError, ValueError):
    """``get_adapter`` was given a name that is not in :data:`ADAPTERS`."""


class AdapterInputError(InputError, ValueError):
    """A sample dict that does not look like a NemoDataset sample."""


# --------------------------------------------------------------------------------------------
# shared helpers


def _unpack(sample: Mapping[str, Any]) -> tuple[Image.Image, np.ndarray, str, dict]:
    """Validate a NemoDataset sample; returns (RGB PIL image, uint8 {0,1} mask, text, meta)."""
    try:
        image, mask, text = sample["image"], sample["mask"], sample["sentence"]
    except (KeyError, TypeError) as exc:
        raise AdapterInputError(
            f"adapter input must be a NemoDataset sample dict with 'image', 'mask' and "
            f"'sentence' keys (got {type(sample).__name__} missing {exc}). Adapters need the "
            "dataset's PIL output: do not combine them with NemoDataset(transform=...)."
        ) from None
    if not isinstance(image, Image.Image):
        raise AdapterInputError(
            f"sample['image'] must be a PIL.Image, got {type(image).__name__} (adapters do "
            "their trainer's own resizing/normalisation: build NemoDataset without transform=)."
        )
    if image.mode != "RGB":
        image = image.convert("RGB")
    mask = np.asarray(mask)
    if mask.shape != (image.height, image.width):
        raise AdapterInputError(
            f"sample['mask'] has shape {mask.shape}, expected (H, W) = "
            f"{(image.height, image.width)} of sample['image']"
        )
    if not isinstance(text, str):
        raise AdapterInputError(f"sample['sentence'] must be a str, got {type(text).__name__}")
    return image, binary_mask(mask), text, dict(sample.get("meta") or {})


def binary_mask(mask: np.ndarray) -> np.ndarray:
    """A user's mask as uint8 {0, 1}, whatever form it comes in.

    Masks reach adapters as NemoDataset's {0, 1} uint8, but also as 0/255 PNG arrays, bool
    arrays or float probabilities; every trainer's own code expects a hard {0, 1} target (CRIS
    scales a 0/255 mask by 1/255 itself, so a {0, 1} mask left as 0/255 would peak at 0.0039).
    bool and integer masks: nonzero is foreground. Float masks must lie in [0, 1] (a soft mask):
    >= 0.5 is foreground; anything else (NaN, 0..255 floats) is refused rather than guessed.
    """
    if mask.dtype.kind == "f":
        if not np.isfinite(mask).all() or mask.min(initial=0.0) < 0 or mask.max(initial=0.0) > 1:
            raise AdapterInputError(
                "sample['mask'] is a float array outside [0, 1] (or not finite): pass a {0, 1} "
                "or 0/255 integer mask, a bool mask, or float probabilities in [0, 1]")
        return (mask >= 0.5).astype(np.uint8)
    if mask.dtype.kind not in "biu":
        raise AdapterInputError(f"sample['mask'] has dtype {mask.dtype}: pass a bool, integer or "
                                "float mask")
    return (mask != 0).astype(np.uint8)


def _is_no_target(meta: Mapping[str, Any], mask01: np.ndarray) -> bool:
    flag = meta.get("no_target")
    return (not mask01.any()) if flag is None else bool(flag)


def _load_hf_tokenizer(spec: Any) -> Any:
    """A Hugging Face tokenizer from an object (returned as is) or a local dir / hub name.

    Strings go to ``AutoTokenizer.from_pretrained`` (any HF tokenizer directory), falling back
    to ``BertTokenizer.from_pretrained`` (what LAVT and ReLA call) for a bare ``vocab.txt`` dir.
    """
    if not isinstance(spec, (str, os.PathLike)):
        if not callable(getattr(spec, "encode", None)):
            raise TypeError(
                f"tokenizer must be a Hugging Face tokenizer (with .encode) or a path/name, "
                f"got {type(spec).__name__}"
            )
        return spec
    from transformers import AutoTokenizer, BertTokenizer

    name = os.fspath(spec)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as auto_exc:  # noqa: BLE001 - retried below, re-raised if that fails too
        try:
            return BertTokenizer.from_pretrained(name)
        except Exception:  # noqa: BLE001
            raise auto_exc from None


def bert_encode_padded(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """LAVT / ReLA language preprocessing (identical in both repositories).

    ``tokenizer.encode(text=..., add_special_tokens=True)`` ([CLS] ... [SEP]), cut to the
    first ``max_tokens`` ids WITHOUT re-appending [SEP] (their plain slice), zero-padded;
    the attention mask is 1 on every kept id (incl. [CLS]/[SEP]) and 0 on padding.
    """
    input_ids = list(tokenizer.encode(text=text, add_special_tokens=True))[:max_tokens]
    padded = [0] * max_tokens
    attention = [0] * max_tokens
    padded[: len(input_ids)] = input_ids
    attention[: len(input_ids)] = [1] * len(input_ids)
    return padded, attention


# --------------------------------------------------------------------------------------------
# generic


class GenericSample(NamedTuple):
    image: Image.Image  # RGB, W x H
    mask: np.ndarray  # uint8 (H, W) in {0, 1}
    text: str  # the referring expression, untouched


class GenericAdapter:
    """Framework-free triple: ``GenericSample(image, mask, text)`` (a namedtuple, so it unpacks
    as ``image, mask, text = adapter(sample)``).

    ``as_dict=True`` returns ``{"image", "mask", "text", "meta"}`` instead (meta copied from the
    sample). Images and masks are passed through unchanged (RGB PIL, uint8 {0,1} H x W).
    """

    def __init__(self, as_dict: bool = False) -> None:
        self.as_dict = bool(as_dict)

    def __call__(self, sample: dict) -> GenericSample | dict[str, Any]:
        image, mask, text, meta = _unpack(sample)
        if self.as_dict:
            return {"image": image, "mask": mask, "text": text, "meta": meta}
        return GenericSample(image, mask, text)

    def __repr__(self) -> str:
        return f"GenericAdapter(as_dict={self.as_dict})"


# --------------------------------------------------------------------------------------------
# CRIS: cv2-compatible affine warp (no cv2 here) and CLIP tokenization

_INTER_BITS = 5  # OpenCV: sub-pixel positions are quantised to 1/32 px
_INTER_TAB_SIZE = 1 << _INTER_BITS
_AB_BITS = 10
_AB_SCALE = 1 << _AB_BITS
_ROUND_DELTA = _AB_SCALE // _INTER_TAB_SIZE // 2  # non-NEAREST interpolation


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``cv2.getAffineTransform``: the 2x3 float64 M with dst = M @ [src, 1] for 3 point pairs."""
    a = np.zeros((6, 6))
    b = np.zeros(6)
    for i in range(3):
        x, y = float(src[i, 0]), float(src[i, 1])
        a[2 * i, :3] = (x, y, 1.0)
        a[2 * i + 1, 3:] = (x, y, 1.0)
        b[2 * i], b[2 * i + 1] = float(dst[i, 0]), float(dst[i, 1])
    return np.linalg.solve(a, b).reshape(2, 3)


def _invert_affine(m: np.ndarray) -> np.ndarray:
    """``cv2.invertAffineTransform`` (what ``warpAffine`` does to M without WARP_INVERSE_MAP)."""
    m0, m1, m2, m3, m4, m5 = (float(v) for v in m.reshape(-1))
    d = m0 * m4 - m1 * m3
    d = 1.0 / d if d != 0 else 0.0
    a11, a22, a12, a21 = m4 * d, m0 * d, -m1 * d, -m3 * d
    b1 = -a11 * m2 - a12 * m5
    b2 = -a21 * m2 - a22 * m5
    return np.array([[a11, a12, b1], [a21, a22, b2]])


def cris_transform_mat(img_hw: tuple[int, int], input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """CRIS ``RefDataset.getTransformMat(img_size, inverse=True)``: ``(mat, mat_inv)``, 2x3 f64.

    Letterbox: ``scale = min(S / h, S / w)``, the scaled image centred with
    ``bias = ((S - w * scale) / 2, (S - h * scale) / 2)``; the three anchor points are float32
    as in the original, so the matrices match ``cv2.getAffineTransform`` on them.
    """
    ori_h, ori_w = img_hw
    inp_h = inp_w = int(input_size)
    scale = min(inp_h / ori_h, inp_w / ori_w)
    new_h, new_w = ori_h * scale, ori_w * scale
    bias_x, bias_y = (inp_w - new_w) / 2.0, (inp_h - new_h) / 2.0
    src = np.array([[0, 0], [ori_w, 0], [0, ori_h]], np.float32)
    dst = np.array(
        [[bias_x, bias_y], [new_w + bias_x, bias_y], [bias_x, new_h + bias_y]], np.float32
    )
    return _affine_from_points(src, dst), _affine_from_points(dst, src)


def _cubic_coeffs(t: np.ndarray) -> np.ndarray:
    """OpenCV ``interpolateCubic`` (Keys, A = -0.75), in float32 like OpenCV; (n, 4)."""
    a = np.float32(-0.75)
    x = t.astype(np.float32)
    c0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
    c1 = ((a + 2) * x - (a + 3)) * x * x + 1
    c2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
    c3 = 1 - c0 - c1 - c2
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.float64)


def _axis_taps(
    pos_q: np.ndarray, n_src: int, pad: int, interpolation: str
) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices into the padded source and their weights, (n_out, k) each, for 1/32-px
    source positions ``pos_q`` along one axis."""
    base = pos_q >> _INTER_BITS
    frac = (pos_q & (_INTER_TAB_SIZE - 1)).astype(np.float64) / _INTER_TAB_SIZE
    if interpolation == "cubic":
        coeffs, offsets = _cubic_coeffs(frac), np.arange(-1, 3)
    else:  # linear
        coeffs, offsets = np.stack([1.0 - frac, frac], axis=1), np.arange(0, 2)
    # Taps outside the source read the border constant; the padded margin holds it, so a tap
    # beyond the margin is clamped onto it (equivalent for BORDER_CONSTANT).
    taps = np.clip(base[:, None] + offsets[None, :] + pad, 0, n_src + 2 * pad - 1)
    return taps, coeffs


def cv2_warp_affine(
    src: np.ndarray,
    mat: np.ndarray,
    dsize: tuple[int, int],
    interpolation: str = "linear",
    border_value: float | tuple[float, ...] = 0.0,
) -> np.ndarray:
    """``cv2.warpAffine(src, mat, dsize, flags=INTER_LINEAR|INTER_CUBIC, borderValue=...)`` for
    uint8 images and axis-aligned (scale + translation) matrices, without OpenCV.

    Reproduced: the inversion of ``mat`` (no WARP_INVERSE_MAP), OpenCV's pixel convention
    (dst pixel ``x`` samples src at ``M_inv @ (x, y, 1)``, integer = pixel centre), its
    fixed-point source positions (AB_BITS=10 accumulation, rounded to 1/32 px), its kernels
    (bilinear; bicubic Keys A=-0.75), BORDER_CONSTANT semantics (every tap outside the source
    reads ``border_value``, itself saturated to uint8 first), and round-half-up + saturation to
    uint8. Deviation: OpenCV's classic remap sums 15-bit fixed-point weights
    (``INTER_REMAP_COEF_SCALE``); this sums float64 weights at the same 1/32-px positions. Against
    an emulation of those fixed-point tables (initInterTab2D) on random images, bicubic outputs
    differ by 1 grey level on ~0.2% of values and bilinear 0/255 masks not at all; OpenCV >= 4.11
    has new SIMD warp kernels that are not bit-exact with its own older versions either, and no
    cv2 is installed here to compare against. Rotations/shears (off-diagonal terms) are not
    supported (CRIS never uses them).
    """
    if src.dtype != np.uint8:
        raise TypeError(f"cv2_warp_affine supports uint8 images, got {src.dtype}")
    if interpolation not in ("linear", "cubic"):
        raise ValueError(f"interpolation must be 'linear' or 'cubic', got {interpolation!r}")
    inv = _invert_affine(np.asarray(mat, dtype=np.float64))
    if abs(inv[0, 1]) > 1e-12 or abs(inv[1, 0]) > 1e-12:
        raise ValueError("cv2_warp_affine only supports axis-aligned (scale/translate) matrices")
    out_w, out_h = int(dsize[0]), int(dsize[1])
    squeeze = src.ndim == 2
    img = src[:, :, None] if squeeze else src
    h, w, cn = img.shape
    cval = np.broadcast_to(np.asarray(border_value, dtype=np.float64), (cn,))
    cval = np.clip(np.rint(cval), 0, 255)  # saturate_cast<uchar>(borderValue)

    # WarpAffineInvoker: X = (round((M1*y + M2) * 1024) + 16 + round(M0 * x * 1024)) >> 5;
    # Y = (round((M4*y + M5) * 1024) + 16 + round(M3 * x * 1024)) >> 5 (M1 = M3 = 0 here).
    xs, ys = np.arange(out_w, dtype=np.float64), np.arange(out_h, dtype=np.float64)
    x_q = (np.rint(inv[0, 0] * xs * _AB_SCALE).astype(np.int64)
           + int(np.rint(inv[0, 2] * _AB_SCALE)) + _ROUND_DELTA) >> (_AB_BITS - _INTER_BITS)
    y_q = (np.rint((inv[1, 1] * ys + inv[1, 2]) * _AB_SCALE).astype(np.int64)
           + _ROUND_DELTA) >> (_AB_BITS - _INTER_BITS)

    pad = 2
    tx, cx = _axis_taps(x_q, w, pad, interpolation)  # (out_w, k)
    ty, cy = _axis_taps(y_q, h, pad, interpolation)  # (out_h, k)
    padded = np.empty((h + 2 * pad, w + 2 * pad, cn), dtype=np.float64)
    padded[...] = cval
    padded[pad:pad + h, pad:pad + w] = img
    # The 2-D kernel is the outer product of the 1-D ones: filter rows, then columns.
    rows = sum(cy[:, k, None, None] * padded[ty[:, k]] for k in range(cy.shape[1]))
    val = sum(cx[None, :, k, None] * rows[:, tx[:, k]] for k in range(cx.shape[1]))
    out = np.clip(np.floor(val + 0.5), 0, 255).astype(np.uint8)
    return out[:, :, 0] if squeeze else out


_CLIP_TOKENIZER: Any = None


def _clip_tokenizer() -> Any:
    global _CLIP_TOKENIZER
    if _CLIP_TOKENIZER is None:
        from open_clip.tokenizer import SimpleTokenizer

        _CLIP_TOKENIZER = SimpleTokenizer()  # bundled bpe_simple_vocab_16e6.txt.gz, no network
    return _CLIP_TOKENIZER


def clip_tokenize(text: str, context_length: int, truncate: bool = True) -> torch.Tensor:
    """CRIS ``utils/dataset.py tokenize(text, context_length, truncate)[0]``: LongTensor [L].

    ``[sot] + bpe(text) + [eot]`` zero-padded to ``context_length``; if longer and ``truncate``,
    cut to ``context_length`` and the LAST position overwritten with eot (as theirs).
    """
    tok = _clip_tokenizer()
    tokens = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
    if len(tokens) > context_length:
        if not truncate:
            raise RuntimeError(f"Input {text} is too long for context length {context_length}")
        tokens = tokens[:context_length]
        tokens[-1] = tok.eot_token_id
    result = torch.zeros(context_length, dtype=torch.long)
    result[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return result


class CrisAdapter:
    """CRIS ``RefDataset.__getitem__`` outputs.

    Source read: DerrickWang005/CRIS.pytorch @ e596332f8f5929a907ad66d2889e434d18f5eee7
    (``utils/dataset.py``: tokenize, RefDataset.__getitem__/getTransformMat/convert;
    ``utils/simple_tokenizer.py``; ``config/*/cris_r50.yaml`` for input_size 416 and word_len
    17 RefCOCO/+ vs 22 RefCOCOg; ``engine/engine.py`` for how val/test params are consumed;
    ``tools/data_process.py`` for masks stored as 0/255 PNGs).

    mode="train" -> ``(img, word_vec, mask)``:
      img       float32 [3, S, S]: letterbox ``warpAffine`` (INTER_CUBIC, border = CLIP mean * 255
                saturated to uint8 = (123, 117, 104)) then ``/255, -mean, /std`` (CLIP mean/std)
      word_vec  int64 [word_length]: CLIP BPE, sot 49406 ... eot 49407, zeros after
      mask      float32 [S, S]: the 0/255 mask warped with INTER_LINEAR, border 0, then ``/255.``
                (so values are k/255 with soft edges, NOT binarised: theirs is not either)
    mode="val"  -> ``(img, word_vec, {"mask_dir", "inverse", "ori_size"})``
    mode="test" -> ``(img, {"ori_img", "seg_id", "mask_dir", "inverse", "ori_size", "sents"})``
      Their validate/inference re-read the ground truth with ``cv2.imread(mask_dir)``, so these
      modes need ``mask_dir=`` (a directory): the original-size mask is written there as a 0/255
      PNG named ``ref<ref_id>_sent<sent_id>_idx<index>_ep<epoch>.png`` (once; atomic).

    Options: ``input_size`` (416), ``word_length`` (None -> 22 if ``dataset`` starts with
    "refcocog" else 17), ``mode``, ``mask_dir``, ``mask_interpolation`` ("linear" as theirs, or
    "nearest" for a hard {0,1} mask -- a deviation, off by default).

    Geometry note: OpenCV maps pixel INDICES, ``x_dst = scale * x_src + bias`` (pixel centres at
    integers), so source pixel 0 lands on ``bias``, not on ``bias + (scale - 1) / 2`` as a
    centre-aligned resize would put it: the content sits ``(scale - 1) / 2`` px up/left of an
    "ideal" letterbox and the image band spans about ``[bias - scale / 2, bias + new - scale / 2]``.
    This is CRIS's real behaviour and is reproduced, not corrected.

    Deviations: the warp is a numpy re-implementation of cv2.warpAffine (see
    :func:`cv2_warp_affine`: same geometry/positions/border; pixel values may differ by 1/255).
    The image comes from the PIL RGB sample instead of ``cv2.imdecode`` of the JPEG (same pixels
    up to JPEG decoder differences). The tokenizer is open_clip's SimpleTokenizer with the same
    BPE file (identical md5) and cleaning; only its special-token regex spells sot/eot
    ``<start_of_text>`` instead of ``<|startoftext|>`` (matters only if a sentence contains
    those literal strings). Theirs picks a random sentence of the ref; NeMo picked it already.
    In val/test, ``sents`` holds only this sample's sentence (theirs: all sentences of the ref);
    ``seg_id`` is ``meta["seg_id"]`` if present else ``meta["ref_id"]``; ``ori_img`` is BGR.
    """

    MODES = ("train", "val", "test")

    def __init__(
        self,
        input_size: int = 416,
        word_length: int | None = None,
        mode: str = "train",
        dataset: str | None = None,
        mask_dir: str | os.PathLike | None = None,
        mask_interpolation: str = "linear",
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"CRIS mode must be one of {self.MODES}, got {mode!r}")
        if mode != "train" and mask_dir is None:
            raise ValueError(
                f"CRIS mode={mode!r} returns params['mask_dir'] (their validate/inference read "
                "the ground-truth PNG from it): pass mask_dir=<directory to write masks into>"
            )
        if mask_interpolation not in ("linear", "nearest"):
            raise ValueError("mask_interpolation must be 'linear' (CRIS) or 'nearest'")
        if word_length is None:
            word_length = 22 if (dataset or "").lower().startswith("refcocog") else 17
        self.input_size = int(input_size)
        self.word_length = int(word_length)
        self.mode = mode
        self.mask_dir = None if mask_dir is None else Path(mask_dir)
        self.mask_interpolation = mask_interpolation
        self.mean = torch.tensor(CLIP_MEAN).reshape(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).reshape(3, 1, 1)

    def __repr__(self) -> str:
        return (f"CrisAdapter(input_size={self.input_size}, word_length={self.word_length}, "
                f"mode={self.mode!r})")

    def convert(
        self, img: np.ndarray, mask: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Their ``convert``: HWC uint8 -> CHW float ``/255 - mean / std``; mask -> float32."""
        img_t = torch.from_numpy(img.transpose((2, 0, 1))).float()
        img_t.div_(255.0).sub_(self.mean).div_(self.std)
        mask_t = None if mask is None else torch.from_numpy(mask).float()
        return img_t, mask_t

    def _warp_mask(self, mask255: np.ndarray, mat: np.ndarray) -> np.ndarray:
        size = (self.input_size, self.input_size)
        if self.mask_interpolation == "linear":
            return cv2_warp_affine(mask255, mat, size, "linear", 0.0)
        # cv2 INTER_NEAREST positions: (round(M * 1024) + 512) >> 10 (floor of x + 0.5)
        inv = _invert_affine(mat)
        n = np.arange(self.input_size, dtype=np.float64)
        xs = (np.rint(inv[0, 0] * n * _AB_SCALE).astype(np.int64)
              + int(np.rint(inv[0, 2] * _AB_SCALE)) + _AB_SCALE // 2) >> _AB_BITS
        ys = (np.rint((inv[1, 1] * n + inv[1, 2]) * _AB_SCALE).astype(np.int64)
              + _AB_SCALE // 2) >> _AB_BITS
        h, w = mask255.shape
        ok = (ys[:, None] >= 0) & (ys[:, None] < h) & (xs[None, :] >= 0) & (xs[None, :] < w)
        out = mask255[np.clip(ys, 0, h - 1)[:, None], np.clip(xs, 0, w - 1)[None, :]]
        return np.where(ok, out, 0).astype(np.uint8)

    def _write_mask(self, mask01: np.ndarray, meta: Mapping[str, Any]) -> str:
        assert self.mask_dir is not None
        self.mask_dir.mkdir(parents=True, exist_ok=True)
        name = (f"ref{meta.get('ref_id')}_sent{meta.get('sent_id')}"
                f"_idx{meta.get('index')}_ep{meta.get('epoch')}.png")
        path = self.mask_dir / name
        if not path.exists():
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            Image.fromarray(mask01 * 255).save(tmp, format="PNG")
            os.replace(tmp, path)
        return str(path)

    def __call__(self, sample: dict) -> tuple:
        image, mask01, text, meta = _unpack(sample)
        rgb = np.asarray(image)
        img_size = rgb.shape[:2]
        mat, mat_inv = cris_transform_mat(img_size, self.input_size)
        size = (self.input_size, self.input_size)
        warped = cv2_warp_affine(rgb, mat, size, "cubic", tuple(m * 255 for m in CLIP_MEAN))
        if self.mode == "train":
            mask = self._warp_mask(mask01 * np.uint8(255), mat) / 255.0
            word_vec = clip_tokenize(text, self.word_length, True)
            img_t, mask_t = self.convert(warped, mask)
            return img_t, word_vec, mask_t
        mask_path = self._write_mask(mask01, meta)
        img_t = self.convert(warped)[0]
        if self.mode == "val":
            word_vec = clip_tokenize(text, self.word_length, True)
            params = {"mask_dir": mask_path, "inverse": mat_inv, "ori_size": np.array(img_size)}
            return img_t, word_vec, params
        params = {
            "ori_img": np.ascontiguousarray(rgb[:, :, ::-1]),  # cv2.imdecode gives BGR
            "seg_id": meta.get("seg_id", meta.get("ref_id")),
            "mask_dir": mask_path,
            "inverse": mat_inv,
            "ori_size": np.array(img_size),
            "sents": [text],
        }
        return img_t, params


# --------------------------------------------------------------------------------------------
# LAVT


class _HFTokenizerMixin:
    """Lazy Hugging Face tokenizer (loaded on first use, so construction needs no network)."""

    _tokenizer_spec: Any
    _tokenizer: Any

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = _load_hf_tokenizer(self._tokenizer_spec)
        return self._tokenizer


class LavtAdapter(_HFTokenizerMixin):
    """LAVT ``ReferDataset.__getitem__`` outputs: ``(img, target, tensor_embeddings,
    attention_mask)``.

    Source read: yz93/LAVT-RIS @ 1da0af9f21b637c0cae9ea1363d2dd9b40e19628
    (``data/dataset_refer_bert.py`` ReferDataset.__init__/__getitem__, ``transforms.py``
    Resize/ToTensor/Normalize, ``train.py``/``test.py`` get_transform, ``args.py`` defaults
    img_size 480 and bert_tokenizer "bert-base-uncased").

      img                 float32 [3, 480, 480]: PIL bilinear resize to (img_size, img_size),
                          ToTensor, Normalize(ImageNet mean/std)
      target              int64 [480, 480] in {0, 1}: mask resized NEAREST (their "P" image),
                          ``torch.as_tensor(np.asarray(target), dtype=torch.int64)``
      tensor_embeddings   int64 [1, 20] (mode="train"); [1, 20, 1] (mode="eval", their
                          per-ref stack of sentences along the last dim: here one sentence)
      attention_mask      int64, same shape: 1 on [CLS] ... [SEP], 0 on padding

    Tokenizer: ``tokenizer=`` a Hugging Face tokenizer object or a local dir / hub name
    (default "bert-base-uncased", as theirs; loaded lazily). Ids = ``encode(text=...,
    add_special_tokens=True)[:max_tokens]`` zero-padded: a sentence longer than
    ``max_tokens`` loses its [SEP] exactly as in their code.

    Deviations: they tokenize the REFER ``raw`` sentence; a NemoDataset sample carries the
    cleaned lowercase ``sentence`` (identical for uncased BERT up to punctuation the cleaning
    removed). The mask is resized as an "L" image instead of "P" (NEAREST: same pixels). Their
    tokenizer is a vendored old HF BertTokenizer; any HF WordPiece BERT tokenizer gives the same
    ids for the same vocab.
    """

    MODES = ("train", "eval")

    def __init__(
        self,
        tokenizer: Any = "bert-base-uncased",
        img_size: int = 480,
        max_tokens: int = 20,
        mode: str = "train",
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"LAVT mode must be one of {self.MODES}, got {mode!r}")
        self._tokenizer_spec = tokenizer
        self._tokenizer = None
        self.img_size = int(img_size)
        self.max_tokens = int(max_tokens)
        self.mode = mode

    def __repr__(self) -> str:
        return (f"LavtAdapter(img_size={self.img_size}, max_tokens={self.max_tokens}, "
                f"mode={self.mode!r})")

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        image, mask01, text, _meta = _unpack(sample)
        size = [self.img_size, self.img_size]
        annot = Image.fromarray(mask01)  # mode "L"; theirs "P" -- NEAREST gives the same pixels
        img = TF.resize(image, size)  # bilinear (PIL), as transforms.Resize
        target = TF.resize(annot, size, interpolation=InterpolationMode.NEAREST)
        img = TF.to_tensor(img)
        target = torch.as_tensor(np.asarray(target).copy(), dtype=torch.int64)
        img = TF.normalize(img, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))

        ids, att = bert_encode_padded(self.tokenizer, text, self.max_tokens)
        tensor_embeddings = torch.tensor(ids).unsqueeze(0)
        attention_mask = torch.tensor(att).unsqueeze(0)
        if self.mode == "eval":
            tensor_embeddings = tensor_embeddings.unsqueeze(-1)
            attention_mask = attention_mask.unsqueeze(-1)
        return img, target, tensor_embeddings, attention_mask


# --------------------------------------------------------------------------------------------
# ReLA (GRES on gRefCOCO)


class _Instances:
    """Minimal stand-in for ``detectron2.structures.Instances`` when detectron2 is absent.

    Holds ``image_size`` and named fields; supports attribute access, ``has``/``get``/``set``,
    ``get_fields``, ``len`` and ``.to(device)`` -- what GRES ``prepare_targets`` uses.
    """

    def __init__(self, image_size: tuple[int, int], **fields: Any) -> None:
        object.__setattr__(self, "_image_size", tuple(image_size))
        object.__setattr__(self, "_fields", dict(fields))

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__.get("_fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(f"Cannot find field '{name}' in the given Instances!")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self._fields[name] = value

    def set(self, name: str, value: Any) -> None:
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def get(self, name: str) -> Any:
        return self._fields[name]

    def get_fields(self) -> dict[str, Any]:
        return self._fields

    def to(self, *args: Any, **kwargs: Any) -> _Instances:
        moved = {k: (v.to(*args, **kwargs) if hasattr(v, "to") else v)
                 for k, v in self._fields.items()}
        return _Instances(self._image_size, **moved)

    def __len__(self) -> int:
        for v in self._fields.values():
            return len(v)
        raise NotImplementedError("Empty Instances does not support __len__!")

    def __repr__(self) -> str:
        return (f"Instances(num_instances={len(self)}, image_height={self._image_size[0]}, "
                f"image_width={self._image_size[1]}, fields=[{', '.join(self._fields)}])")


def _make_instances(
    image_size: tuple[int, int], boxes: torch.Tensor, classes: torch.Tensor, masks: torch.Tensor
) -> Any:
    try:
        from detectron2.structures import Boxes, Instances
    except ImportError:
        return _Instances(image_size, gt_boxes=boxes, gt_classes=classes, gt_masks=masks)
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = classes
    inst.gt_masks = masks
    return inst


class RelaAdapter(_HFTokenizerMixin):
    """ReLA (GRES) ``RefCOCOMapper.__call__`` output dict, for gRefCOCO-style data.

    Source read: henghuiding/ReLA @ 3ca955198da8ace68f8980b6fcbada0791cc51c2
    (``gres_model/data/dataset_mappers/refcoco_mapper.py`` RefCOCOMapper/build_transform_train;
    ``gres_model/data/datasets/grefcoco.py`` record keys; ``gres_model/GRES.py`` forward and
    prepare_targets; ``gres_model/modeling/criterion.py`` loss_masks_refer;
    ``gres_model/config.py`` + ``configs/referring_*.yaml``: IMAGE_SIZE 480, MAX_TOKENS 20,
    BERT_TYPE bert-base-uncased, FORMAT RGB).

    Keys (``is_train=True``)::

      image           uint8 [3, S, S] RGB (their train AND test augmentation is only
                      ``T.Resize((S, S))``: PIL bilinear; GRES normalises with PIXEL_MEAN/STD)
      padding_mask    bool [S, S], all False (``~`` of the resized all-ones map, as theirs)
      instances       Instances(image_size=(S, S)): gt_masks bool [N, S, S], gt_classes int64
                      [N], gt_boxes XYXY [N, 4]; N = 0 for no-target (gt_masks then uint8 zeros)
      empty           bool: no-target
      gt_mask_merged  int64 [1, S, S] in {0, 1} (``gt_masks.sum(0, keepdim).clamp(max=1)``;
                      all zero for no-target) -- None if ``merge=False``
      lang_tokens     int64 [1, max_tokens]; lang_mask int64 [1, max_tokens] (same recipe as
                      LAVT: ``encode(...)[:20]`` zero-padded, mask 1 on kept ids)
      source, file_name, height, width (original size), image_id,
      sentence {"raw", "sent_id", "ref_id"}  (the grefcoco record fields they carry through)

    ``is_train=False`` puts ``gt_mask`` ([N, S, S]) instead of ``instances`` (as theirs).

    GRES reads ``image``, ``lang_tokens``, ``lang_mask`` (forward) and ``instances.gt_masks``,
    ``instances.gt_classes``, ``empty``, ``gt_mask_merged`` (prepare_targets; the loss only uses
    gt_mask_merged and empty).

    Deviations: a NemoDataset sample has only the union mask, so a multi-target sample becomes
    ONE instance holding the union (theirs: one per annotation) -- ``gt_mask_merged`` is
    identical, and it is all GRES's loss reads; ``gt_classes`` is ``meta["category_id"]`` when
    present else ``category_id`` (default 0), unused by the loss. Their per-instance masks are
    polygons rasterised after the resize; here the raster mask is resized NEAREST (detectron2's
    ``apply_segmentation``), so boundaries can differ by about a pixel. ``gt_boxes`` is the
    mask's box (``BitMasks.get_bounding_boxes`` convention, x1/y1 exclusive) instead of the
    polygon's. ``instances`` is a real detectron2 ``Instances``/``Boxes`` when detectron2 is
    importable, else a minimal stand-in (``_Instances``; gt_boxes then a float32 tensor).
    ``file_name`` is ``meta.get("file_name")`` (usually None: the image is in memory). The
    sentence is the cleaned lowercase one, not REFER ``raw`` (see LavtAdapter).
    """

    def __init__(
        self,
        tokenizer: Any = "bert-base-uncased",
        image_size: int = 480,
        max_tokens: int = 20,
        is_train: bool = True,
        merge: bool = True,
        source: str = "grefcoco",
        category_id: int = 0,
    ) -> None:
        self._tokenizer_spec = tokenizer
        self._tokenizer = None
        self.image_size = int(image_size)
        self.max_tokens = int(max_tokens)
        self.is_train = bool(is_train)
        self.merge = bool(merge)
        self.source = source
        self.category_id = int(category_id)

    def __repr__(self) -> str:
        return (f"RelaAdapter(image_size={self.image_size}, max_tokens={self.max_tokens}, "
                f"is_train={self.is_train})")

    @staticmethod
    def _merge_masks(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=0, keepdim=True).clamp(max=1)

    def __call__(self, sample: dict) -> dict[str, Any]:
        image, mask01, text, meta = _unpack(sample)
        s = self.image_size
        empty = _is_no_target(meta, mask01)
        if empty and mask01.any():
            raise AdapterInputError(
                f"sample sent_id={meta.get('sent_id')} is marked no_target but its mask is "
                "not all zero"
            )
        dataset_dict: dict[str, Any] = {
            "source": self.source,
            "file_name": meta.get("file_name"),
            "height": image.height,
            "width": image.width,
            "image_id": meta.get("image_id"),
            "sentence": {"raw": text, "sent_id": meta.get("sent_id"),
                         "ref_id": meta.get("ref_id")},
        }
        # detectron2 ResizeTransform.apply_image: PIL resize, BILINEAR
        img = np.asarray(image.resize((s, s), Image.Resampling.BILINEAR))
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)))
        dataset_dict["padding_mask"] = torch.zeros((s, s), dtype=torch.bool)

        if empty:
            gt_masks = torch.zeros((0, s, s), dtype=torch.uint8)
            boxes = torch.zeros((0, 4), dtype=torch.float32)
            classes = torch.zeros((0,), dtype=torch.int64)
        else:
            m = np.asarray(Image.fromarray(mask01).resize((s, s), Image.Resampling.NEAREST)) > 0
            gt_masks = torch.from_numpy(m)[None]
            boxes = torch.zeros((1, 4), dtype=torch.float32)
            ys, xs = np.nonzero(m)
            if xs.size:
                boxes[0] = torch.tensor(
                    [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32
                )
            classes = torch.tensor([int(meta.get("category_id", self.category_id))],
                                   dtype=torch.int64)
        if self.is_train:
            dataset_dict["instances"] = _make_instances((s, s), boxes, classes, gt_masks)
        else:
            dataset_dict["gt_mask"] = gt_masks
        dataset_dict["empty"] = empty
        dataset_dict["gt_mask_merged"] = self._merge_masks(gt_masks) if self.merge else None

        ids, att = bert_encode_padded(self.tokenizer, text, self.max_tokens)
        dataset_dict["lang_tokens"] = torch.tensor(ids).unsqueeze(0)
        dataset_dict["lang_mask"] = torch.tensor(att).unsqueeze(0)
        return dataset_dict


# --------------------------------------------------------------------------------------------
# registry


ADAPTERS: dict[str, Callable[..., Adapter]] = {
    "generic": GenericAdapter,
    "cris": CrisAdapter,
    "lavt": LavtAdapter,
    "rela": RelaAdapter,
}


def get_adapter(name: str, **options: Any) -> Adapter:
    """The adapter called ``name`` (case-insensitive), built with ``options``.

    Raises :class:`UnknownAdapterError` (a ``ValueError``) naming the available adapters.
    """
    key = str(name).strip().lower()
    if key not in ADAPTERS:
        raise UnknownAdapterError(
            f"unknown adapter {name!r}; available adapters: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[key](**options)


class AdaptedDataset(torch.utils.data.Dataset):
    """``dataset[i]`` passed through ``adapter``: drop-in for a trainer's own Dataset.

    ``adapter`` is an :class:`Adapter` or a name for :func:`get_adapter` (then ``options``).
    ``set_epoch`` is forwarded when the wrapped dataset has it (NemoDataset does).
    """

    def __init__(self, dataset: Any, adapter: Adapter | str, **options: Any) -> None:
        self.dataset = dataset
        self.adapter = get_adapter(adapter, **options) if isinstance(adapter, str) else adapter

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        return self.adapter(self.dataset[index])

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
