"""LAVT (yz93/LAVT-RIS): resize, ImageNet normalisation, BERT ids, its sample tuple."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.training.adapters.base import (
    check_hard_negatives,
    hard_negatives_of,
    raw_text,
    unpack_sample,
)
from pipeline.training.adapters.bert import LazyHFTokenizer, bert_encode_padded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LavtAdapter(LazyHFTokenizer):
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

    With ``hard_negatives=N`` (mode="train") the tuple grows by the sample's hard negatives,
    each encoded exactly as the positive sentence (:meth:`encode_text`), padded to N with the
    encoding of "" ([CLS] [SEP]): ``(img, target, tensor_embeddings, attention_mask,
    neg_embeddings, neg_attention_mask, neg_valid)``, the first two int64 [N, 1, max_tokens]
    (each entry shaped as the positive's), ``neg_valid`` bool [N] (False on padding).

    The text is the sample's ``raw_sentence`` (REFER's ``raw``, as they tokenize it; shards
    before schema 5 and samples without it give the cleaned ``sentence``, which differs where
    the cleaning removed punctuation). Deviations: the mask is resized as an "L" image instead
    of "P" (NEAREST: same pixels). Their tokenizer is a vendored old HF BertTokenizer; any HF
    WordPiece BERT tokenizer gives the same ids for the same vocab.
    """

    MODES = ("train", "eval")

    def __init__(
        self,
        tokenizer: Any = "bert-base-uncased",
        img_size: int = 480,
        max_tokens: int = 20,
        mode: str = "train",
        hard_negatives: int = 0,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"LAVT mode must be one of {self.MODES}, got {mode!r}")
        self.hard_negatives = check_hard_negatives(hard_negatives, mode == "train", "LAVT")
        self._tokenizer_spec = tokenizer
        self._tokenizer = None
        self.img_size = int(img_size)
        self.max_tokens = int(max_tokens)
        self.mode = mode

    def __repr__(self) -> str:
        return (f"LavtAdapter(img_size={self.img_size}, max_tokens={self.max_tokens}, "
                f"mode={self.mode!r}, hard_negatives={self.hard_negatives})")

    def encode_text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A sentence as LAVT feeds it to BERT: ``(tensor_embeddings, attention_mask)``, int64
        [1, max_tokens] ([1, max_tokens, 1] in eval mode)."""
        ids, att = bert_encode_padded(self.tokenizer, text, self.max_tokens)
        tensor_embeddings = torch.tensor(ids).unsqueeze(0)
        attention_mask = torch.tensor(att).unsqueeze(0)
        if self.mode == "eval":
            return tensor_embeddings.unsqueeze(-1), attention_mask.unsqueeze(-1)
        return tensor_embeddings, attention_mask

    def __call__(self, sample: dict) -> tuple[torch.Tensor, ...]:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        image, mask01, text, _meta = unpack_sample(sample)
        size = [self.img_size, self.img_size]
        annot = Image.fromarray(mask01)  # mode "L"; theirs "P" -- NEAREST gives the same pixels
        img = TF.resize(image, size)  # bilinear (PIL), as transforms.Resize
        target = TF.resize(annot, size, interpolation=InterpolationMode.NEAREST)
        img = TF.to_tensor(img)
        target = torch.as_tensor(np.asarray(target).copy(), dtype=torch.int64)
        img = TF.normalize(img, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))

        tensor_embeddings, attention_mask = self.encode_text(raw_text(sample, text))
        if not self.hard_negatives:
            return img, target, tensor_embeddings, attention_mask
        texts, valid = hard_negatives_of(sample, self.hard_negatives)
        ids, att = zip(*(self.encode_text(t) for t in texts), strict=True)
        return (img, target, tensor_embeddings, attention_mask, torch.stack(ids),
                torch.stack(att), torch.tensor(valid, dtype=torch.bool))
