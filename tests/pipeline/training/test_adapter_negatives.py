"""Hard negatives through the cris, lavt and rela adapters.

The oracle for each encoded negative is the adapter's own positive path: the same text given as
a sample's sentence must encode to the same tensor. Shapes and masks are checked against the
sample's counts; the positive half of the output is unchanged by the option. No tokenizer is
downloaded (CRIS: open_clip's bundled BPE; LAVT/ReLA: a tiny WordPiece vocab in a tmp dir).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from pipeline.training import adapters as ad

W, H = 40, 30
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "man", "on", "left", "in",
         "red", "shirt", "a", "dog", "right", "woman", "blue"]
NEGATIVES = ["the woman on the right", "a red dog", "the man in blue"]


def sample(text: str = "the man on the left", negatives: list[str] | None = None) -> dict:
    img = np.zeros((H, W, 3), np.uint8)
    img[:, :, 0] = np.arange(W, dtype=np.uint8)[None, :] * 5
    mask = np.zeros((H, W), np.uint8)
    mask[5:20, 8:30] = 1
    negatives = list(NEGATIVES if negatives is None else negatives)
    return {"image": Image.fromarray(img), "mask": mask, "sentence": text,
            "hard_negatives": negatives, "hard_negative_kinds": ["neighbour"] * len(negatives),
            "meta": {"sent_id": 1, "ref_id": 2, "image_id": 3, "split": "train",
                     "no_target": False, "index": 0, "epoch": 0}}


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer.from_pretrained(str(d))


def positive_text_encoding(name: str, adapter, text: str) -> tuple[torch.Tensor, ...]:
    """What the adapter's positive path gives for `text` (the oracle)."""
    out = adapter(sample(text, negatives=[]))
    if name == "cris":
        return (out[1],)
    if name == "lavt":
        return out[2], out[3]
    return out["lang_tokens"], out["lang_mask"]


def negatives_of(name: str, out) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    if name == "cris":
        return (out[3],), out[4]
    if name == "lavt":
        return (out[4], out[5]), out[6]
    return (out["neg_lang_tokens"], out["neg_lang_mask"]), out["neg_valid"]


def make(name: str, bert_tok, **kw):
    extra = {"tokenizer": bert_tok} if name in ("lavt", "rela") else {}
    return ad.get_adapter(name, **extra, **kw)


@pytest.mark.parametrize("name", ["cris", "lavt", "rela"])
@pytest.mark.parametrize("count", [0, 2, 3])
def test_negatives_are_encoded_as_positives_and_padded(bert_tok, name, count):
    n = 4
    adapter = make(name, bert_tok, hard_negatives=n)
    plain = make(name, bert_tok)
    s = sample(negatives=NEGATIVES[:count])
    out = adapter(s)
    parts, valid = negatives_of(name, out)
    assert valid.dtype == torch.bool and valid.tolist() == [True] * count + [False] * (n - count)
    for i in range(n):
        text = NEGATIVES[i] if i < count else ""  # padding: the encoding of the empty text
        want = positive_text_encoding(name, plain, text)
        for got, exp in zip(parts, want, strict=True):
            assert got.dtype == torch.int64 and got.shape == (n, *exp.shape)
            assert torch.equal(got[i], exp), (name, i, text)
    # the positive half is the trainer's output, unchanged by the option
    base = plain(s)
    if name == "rela":
        assert set(out) - set(base) == {"neg_lang_tokens", "neg_lang_mask", "neg_valid"}
        for k in ("image", "lang_tokens", "lang_mask", "gt_mask_merged"):
            assert torch.equal(out[k], base[k])
    else:
        assert len(out) == len(base) + len(parts) + 1
        for a, b in zip(out[: len(base)], base, strict=True):
            assert torch.equal(a, b)


def test_default_output_is_the_trainers_own(bert_tok):
    assert len(make("cris", bert_tok)(sample())) == 3
    assert len(make("lavt", bert_tok)(sample())) == 4
    assert "neg_valid" not in make("rela", bert_tok)(sample())


@pytest.mark.parametrize("name", ["cris", "lavt", "rela"])
def test_more_negatives_than_the_adapter_pads_to_is_an_error(bert_tok, name):
    with pytest.raises(ad.AdapterInputError, match="hard_negatives >= NemoDataset"):
        make(name, bert_tok, hard_negatives=2)(sample())


@pytest.mark.parametrize("name, kw", [("cris", {"mode": "val", "mask_dir": "."}),
                                      ("lavt", {"mode": "eval"}), ("rela", {"is_train": False})])
def test_negatives_only_in_training_mode(bert_tok, name, kw):
    with pytest.raises(ValueError, match="training material"):
        make(name, bert_tok, hard_negatives=2, **kw)
    with pytest.raises(ValueError, match=">= 0"):
        make(name, bert_tok, hard_negatives=-1)


def test_batch_layout_for_a_contrastive_loss(bert_tok):
    """default_collate gives B x N negatives and a B x N mask next to the B positives."""
    cris = make("cris", bert_tok, hard_negatives=3)
    batch = default_collate([cris(sample(negatives=NEGATIVES[:k])) for k in (3, 1, 0)])
    img, word_vec, mask, negs, valid = batch
    assert img.shape == (3, 3, 416, 416) and word_vec.shape == (3, 17)
    assert negs.shape == (3, 3, 17)
    assert valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    lavt = make("lavt", bert_tok, hard_negatives=2)
    *_, ids, att, valid = default_collate([lavt(sample(negatives=NEGATIVES[:k]))
                                           for k in (2, 1)])
    assert ids.shape == att.shape == (2, 2, 1, 20) and valid.tolist() == [[True, True],
                                                                          [True, False]]
    # by hand from VOCAB: [CLS] a red dog [SEP] = 2 12 10 13 3; padding "" = [CLS] [SEP] = 2 3
    assert ids[0, 1, 0, :6].tolist() == [2, 12, 10, 13, 3, 0]  # sample 0, negative 1
    assert att[0, 1, 0, :6].tolist() == [1, 1, 1, 1, 1, 0]
    assert ids[1, 1, 0, :3].tolist() == [2, 3, 0] and att[1, 1, 0].sum() == 2
    assert pickle.loads(pickle.dumps(lavt)).hard_negatives == 2
