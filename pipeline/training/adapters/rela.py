"""ReLA / GRES (henghuiding/ReLA) on gRefCOCO: its RefCOCOMapper output dict."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.training.adapters.base import (
    AdapterInputError,
    check_hard_negatives,
    hard_negatives_of,
    is_no_target,
    raw_text,
    unpack_sample,
)
from pipeline.training.adapters.bert import LazyHFTokenizer, bert_encode_padded
from pipeline.training.adapters.detectron2_compat import make_instances


class RelaAdapter(LazyHFTokenizer):
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

    With ``hard_negatives=K`` (is_train) the dict also holds the sample's hard negatives, each
    encoded exactly as the positive (:meth:`encode_text`), padded to K with the encoding of ""
    ([CLS] [SEP]): ``neg_lang_tokens`` and ``neg_lang_mask`` int64 [K, 1, max_tokens] (each
    entry shaped as ``lang_tokens``), ``neg_valid`` bool [K] (False on padding).

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
    importable, else a minimal stand-in (``InstancesStandIn``; gt_boxes then a float32 tensor).
    ``file_name`` is ``meta.get("file_name")`` (usually None: the image is in memory). The
    sentence is the sample's ``raw_sentence``, REFER's ``raw`` as theirs (see LavtAdapter).
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
        hard_negatives: int = 0,
    ) -> None:
        self._tokenizer_spec = tokenizer
        self._tokenizer = None
        self.image_size = int(image_size)
        self.max_tokens = int(max_tokens)
        self.is_train = bool(is_train)
        self.merge = bool(merge)
        self.source = source
        self.category_id = int(category_id)
        self.hard_negatives = check_hard_negatives(hard_negatives, self.is_train, "ReLA")

    def __repr__(self) -> str:
        return (f"RelaAdapter(image_size={self.image_size}, max_tokens={self.max_tokens}, "
                f"is_train={self.is_train}, hard_negatives={self.hard_negatives})")

    def encode_text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A sentence as RefCOCOMapper gives it to GRES: ``(lang_tokens, lang_mask)``, int64
        [1, max_tokens] each."""
        ids, att = bert_encode_padded(self.tokenizer, text, self.max_tokens)
        return torch.tensor(ids).unsqueeze(0), torch.tensor(att).unsqueeze(0)

    @staticmethod
    def _merge_masks(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=0, keepdim=True).clamp(max=1)

    def __call__(self, sample: dict) -> dict[str, Any]:
        image, mask01, text, meta = unpack_sample(sample)
        text = raw_text(sample, text)
        s = self.image_size
        empty = is_no_target(meta, mask01)
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
            dataset_dict["instances"] = make_instances((s, s), boxes, classes, gt_masks)
        else:
            dataset_dict["gt_mask"] = gt_masks
        dataset_dict["empty"] = empty
        dataset_dict["gt_mask_merged"] = self._merge_masks(gt_masks) if self.merge else None

        dataset_dict["lang_tokens"], dataset_dict["lang_mask"] = self.encode_text(text)
        if self.hard_negatives:
            texts, valid = hard_negatives_of(sample, self.hard_negatives)
            ids, att = zip(*(self.encode_text(t) for t in texts), strict=True)
            dataset_dict["neg_lang_tokens"] = torch.stack(ids)
            dataset_dict["neg_lang_mask"] = torch.stack(att)
            dataset_dict["neg_valid"] = torch.tensor(valid, dtype=torch.bool)
        return dataset_dict
