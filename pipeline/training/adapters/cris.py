"""CRIS (DerrickWang005/CRIS.pytorch): letterbox warp, CLIP tokenization, its sample tuple."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.training.adapters.base import (
    check_hard_negatives,
    hard_negatives_of,
    unpack_sample,
)
from pipeline.training.adapters.cv2_warp import affine_from_points, cv2_warp_affine

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    return affine_from_points(src, dst), affine_from_points(dst, src)


@functools.cache
def clip_tokenizer() -> Any:
    """open_clip's SimpleTokenizer, built once per process (bundled BPE file, no network)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_tokenize(text: str, context_length: int, truncate: bool = True) -> torch.Tensor:
    """CRIS ``utils/dataset.py tokenize(text, context_length, truncate)[0]``: LongTensor [L].

    ``[sot] + bpe(text) + [eot]`` zero-padded to ``context_length``; if longer and ``truncate``,
    cut to ``context_length`` and the LAST position overwritten with eot (as theirs).
    """
    tok = clip_tokenizer()
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
    "nearest" for a hard {0,1} mask -- a deviation, off by default), ``hard_negatives`` (0).

    With ``hard_negatives=N`` (mode="train") the tuple grows by the sample's hard negatives,
    each encoded exactly as the positive sentence (:meth:`encode_text`), padded to N with the
    encoding of "": ``(img, word_vec, mask, neg_word_vecs, neg_valid)``, ``neg_word_vecs``
    int64 [N, word_length], ``neg_valid`` bool [N] (False on padding). CRIS itself reads no
    negatives; this is for a C3*-style loss added to its training step.

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
        hard_negatives: int = 0,
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
        self.hard_negatives = check_hard_negatives(hard_negatives, mode == "train", "CRIS")
        self.mean = torch.tensor(CLIP_MEAN).reshape(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).reshape(3, 1, 1)

    def __repr__(self) -> str:
        return (f"CrisAdapter(input_size={self.input_size}, word_length={self.word_length}, "
                f"mode={self.mode!r}, hard_negatives={self.hard_negatives})")

    def encode_text(self, text: str) -> torch.Tensor:
        """A sentence as CRIS feeds it to CLIP: ``tokenize(text, word_length, True)[0]``."""
        return clip_tokenize(text, self.word_length, True)

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
        return cv2_warp_affine(mask255, mat, size, self.mask_interpolation, 0.0)

    def _write_mask(self, mask01: np.ndarray, meta: Mapping[str, Any]) -> str:
        assert self.mask_dir is not None
        self.mask_dir.mkdir(parents=True, exist_ok=True)
        name = (f"ref{meta.get('ref_id')}_sent{meta.get('sent_id')}"
                f"_idx{meta.get('index')}_ep{meta.get('epoch')}.png")
        path = self.mask_dir / name
        # written every time: a PNG of the same name left by another dataset or shards build
        # in a reused mask_dir would otherwise be scored as this sample's ground truth
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        Image.fromarray(mask01 * 255).save(tmp, format="PNG")
        os.replace(tmp, path)
        return str(path)

    def __call__(self, sample: dict) -> tuple:
        image, mask01, text, meta = unpack_sample(sample)
        rgb = np.asarray(image)
        img_size = rgb.shape[:2]
        mat, mat_inv = cris_transform_mat(img_size, self.input_size)
        size = (self.input_size, self.input_size)
        warped = cv2_warp_affine(rgb, mat, size, "cubic", tuple(m * 255 for m in CLIP_MEAN))
        if self.mode == "train":
            mask = self._warp_mask(mask01 * np.uint8(255), mat) / 255.0
            word_vec = self.encode_text(text)
            img_t, mask_t = self.convert(warped, mask)
            if not self.hard_negatives:
                return img_t, word_vec, mask_t
            texts, valid = hard_negatives_of(sample, self.hard_negatives)
            negs = torch.stack([self.encode_text(t) for t in texts])
            return img_t, word_vec, mask_t, negs, torch.tensor(valid, dtype=torch.bool)
        mask_path = self._write_mask(mask01, meta)
        img_t = self.convert(warped)[0]
        if self.mode == "val":
            word_vec = self.encode_text(text)
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
