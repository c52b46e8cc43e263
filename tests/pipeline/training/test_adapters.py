"""pipeline.adapters: synthetic NemoDataset samples through each trainer adapter.

Geometry is checked against hand computations; no tokenizer is downloaded (CRIS uses the BPE file
bundled with open_clip, LAVT/ReLA a tiny WordPiece vocab written to a tmp dir).
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.training import adapters as ad

W, H = 123, 77  # odd, landscape
ROWS, COLS = (20, 49), (30, 79)  # inclusive pixel rows / cols of the target rectangle
COLOR = (200, 100, 50)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "man", "on", "left", "in",
         "red", "shirt", ",", "a", "dog", "##s"]
IDS = {t: i for i, t in enumerate(VOCAB)}


def make_sample(
    text: str = "the man on the left", no_target: bool = False, color=COLOR
) -> dict:
    img = np.zeros((H, W, 3), np.uint8)
    img[:] = color
    mask = np.zeros((H, W), np.uint8)
    if not no_target:
        mask[ROWS[0]:ROWS[1] + 1, COLS[0]:COLS[1] + 1] = 1
    return {
        "image": Image.fromarray(img),
        "mask": mask,
        "sentence": text,
        "hard_negatives": ["the dog"],
        "hard_negative_kinds": ["attribute"],
        "meta": {"sent_id": 11, "ref_id": 22, "image_id": 33, "split": "train",
                 "is_mosaic": False, "quadrant": None, "source_image_ids": [33],
                 "no_target": no_target, "index": 0, "epoch": 0},
    }


def bbox(m: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(m)
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_vocab")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return d


@pytest.fixture(scope="module")
def bert_tok(vocab_dir):
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(vocab_dir))


# ------------------------------------------------------------------------------ registry


def test_registry_and_unknown_name():
    assert set(ad.ADAPTERS) == {"generic", "cris", "lavt", "rela"}
    assert isinstance(ad.get_adapter("generic"), ad.Adapter)
    assert isinstance(ad.get_adapter("CRIS"), ad.CrisAdapter)
    with pytest.raises(ValueError) as exc:
        ad.get_adapter("mattnet")
    msg = str(exc.value)
    assert "mattnet" in msg
    for name in ("generic", "cris", "lavt", "rela"):
        assert name in msg


def test_bad_sample_is_a_clear_error():
    with pytest.raises(ValueError, match="sentence"):
        ad.get_adapter("generic")({"image": Image.new("RGB", (4, 4)), "mask": np.zeros((4, 4))})
    s = make_sample()
    s["mask"] = np.zeros((W, H), np.uint8)  # transposed
    with pytest.raises(ValueError, match="shape"):
        ad.get_adapter("generic")(s)


# ------------------------------------------------------------------------------ generic


def test_generic():
    s = make_sample()
    out = ad.get_adapter("generic")(s)
    image, mask, text = out
    assert isinstance(out, ad.GenericSample)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (W, H)
    assert mask.dtype == np.uint8 and mask.shape == (H, W) and set(np.unique(mask)) == {0, 1}
    assert text == "the man on the left"
    d = ad.get_adapter("generic", as_dict=True)(s)
    assert set(d) == {"image", "mask", "text", "meta"} and d["meta"]["sent_id"] == 11


# ------------------------------------------------------------------------------ CRIS


def test_cris_transform_mat_hand_computed():
    s = 416 / 123
    mat, inv = ad.cris_transform_mat((H, W), 416)
    by = (416 - H * s) / 2
    np.testing.assert_allclose(mat, [[s, 0, 0], [0, s, by]], atol=1e-4)
    np.testing.assert_allclose(inv, [[1 / s, 0, 0], [0, 1 / s, -by / s]], atol=1e-4)


def test_cris_train_outputs_and_geometry():
    img, word_vec, mask = ad.get_adapter("cris")(make_sample())
    assert img.shape == (3, 416, 416) and img.dtype == torch.float32
    assert word_vec.shape == (17,) and word_vec.dtype == torch.int64
    assert mask.shape == (416, 416) and mask.dtype == torch.float32
    assert float(mask.min()) >= 0.0 and float(mask.max()) == 1.0

    # Letterbox: scale = 416/123 fills the width, rows offset by by = (416 - 77 s) / 2.
    # OpenCV maps pixel INDICES (x_dst = s * x_src + b, pixel centres at integers), so with the
    # bilinear-warped mask >= 0.5 exactly where the source position is within half a pixel of
    # the rectangle: dst in [s (r0 - 0.5) + b, s (r1 + 0.5) + b].
    s = 416 / 123
    by = (416 - 77 * s) / 2
    y0, y1, x0, x1 = bbox(mask.numpy() >= 0.5)
    assert abs(y0 - math.ceil(s * (ROWS[0] - 0.5) + by)) <= 1
    assert abs(y1 - math.floor(s * (ROWS[1] + 0.5) + by)) <= 1
    assert abs(x0 - math.ceil(s * (COLS[0] - 0.5))) <= 1
    assert abs(x1 - math.floor(s * (COLS[1] + 0.5))) <= 1
    # soft (bilinear, /255.) edges as in CRIS; the inside is exactly 1, outside exactly 0
    vals = mask.numpy()
    assert np.all(vals[y0 + 2:y1 - 1, x0 + 2:x1 - 1] == 1.0)
    assert vals[:int(by), :].max() == 0.0
    assert np.any((vals > 0) & (vals < 1))
    assert np.allclose(vals * 255, np.round(vals * 255), atol=1e-4)


def test_cris_normalisation_and_border():
    img, _, _ = ad.get_adapter("cris")(make_sample())
    mean = torch.tensor(ad.CLIP_MEAN)
    std = torch.tensor(ad.CLIP_STD)
    inside = (torch.tensor(COLOR) / 255.0 - mean) / std
    torch.testing.assert_close(img[:, 208, 208], inside)
    # the letterbox band (top rows, bottom rows) holds the border: CLIP mean * 255 saturated
    # to uint8 = (123, 117, 104), i.e. ~0 after normalisation
    border = (torch.tensor([123.0, 117.0, 104.0]) / 255.0 - mean) / std
    torch.testing.assert_close(img[:, 0, 0], border)
    torch.testing.assert_close(img[:, 415, 200], border)
    assert float(border.abs().max()) < 0.01
    # the image band. OpenCV maps pixel indices (y_dst = s * y_src + by), so source row 0 lands
    # on y = by and row 76 on by + 76 s; bicubic reads 2 source px either side, hence rows
    # beyond by + 78 s or before by - 2 s are pure border, rows between by + s and by + 75 s
    # pure colour.
    s = 416 / 123
    by = (416 - 77 * s) / 2
    col = img[:, :, 300]
    for y in (math.ceil(by + s), 208, math.floor(by + 75 * s)):
        assert torch.allclose(col[:, y], inside), y
    for y in (0, math.floor(by - 2 * s) - 1, math.ceil(by + 78 * s) + 1, 415):
        assert torch.allclose(col[:, y], border), y
    assert not torch.allclose(col[:, round(by)], border)
    assert not torch.allclose(col[:, round(by)], inside)

def test_cris_tokens():
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    _, wv, _ = ad.get_adapter("cris")(make_sample("the man on the left"))
    body = tok.encode("the man on the left")
    assert wv[0] == 49406
    assert wv[1:1 + len(body)].tolist() == body
    assert wv[1 + len(body)] == 49407
    assert wv[2 + len(body):].eq(0).all()

    # G-Ref default length, and truncation keeping eot in the last slot as CRIS does
    long = " ".join(["person"] * 40)
    _, wv, _ = ad.get_adapter("cris", dataset="refcocog_u")(make_sample(long))
    assert wv.shape == (22,)
    assert wv[0] == 49406 and wv[-1] == 49407 and wv[1:-1].ne(0).all()
    assert wv[1:-1].tolist() == tok.encode(long)[:20]
    assert ad.clip_tokenize(long, 17).tolist()[-1] == 49407
    with pytest.raises(RuntimeError):
        ad.clip_tokenize(long, 17, truncate=False)


def test_cris_val_and_test_modes(tmp_path):
    with pytest.raises(ValueError, match="mask_dir"):
        ad.get_adapter("cris", mode="val")
    img, wv, params = ad.get_adapter("cris", mode="val", mask_dir=tmp_path)(make_sample())
    assert img.shape == (3, 416, 416) and wv.shape == (17,)
    assert set(params) == {"mask_dir", "inverse", "ori_size"}
    assert params["ori_size"].tolist() == [H, W] and params["inverse"].shape == (2, 3)
    gt = np.asarray(Image.open(params["mask_dir"]))
    assert gt.shape == (H, W) and set(np.unique(gt)) == {0, 255}
    img, params = ad.get_adapter("cris", mode="test", mask_dir=tmp_path)(make_sample())
    assert params["sents"] == ["the man on the left"] and params["seg_id"] == 22
    assert params["ori_img"].shape == (H, W, 3) and params["ori_img"][0, 0].tolist() == [50, 100,
                                                                                          200]


def test_cris_nearest_option_is_binary():
    _, _, mask = ad.get_adapter("cris", mask_interpolation="nearest")(make_sample())
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    s = 416 / 123
    by = (416 - 77 * s) / 2
    y0, y1, x0, x1 = bbox(mask.numpy() > 0)
    assert abs(y0 - math.ceil(s * (ROWS[0] - 0.5) + by)) <= 1
    assert abs(x1 - math.floor(s * (COLS[1] + 0.5))) <= 1


def test_cv2_warp_nearest_by_hand():
    src = np.arange(12, dtype=np.uint8).reshape(3, 4)
    up = ad.cv2_warp_affine(src, np.array([[2.0, 0, 0], [0, 2.0, 0]]), (9, 7), "nearest", 99)
    # OpenCV INTER_NEAREST: dst x reads src floor(x / 2 + 0.5); past the source, the border
    cols = [0, 1, 1, 2, 2, 3, 3, None, None]
    rows = [0, 1, 1, 2, 2, None, None]
    want = np.array([[99 if r is None or c is None else src[r, c] for c in cols] for r in rows],
                    np.uint8)
    np.testing.assert_array_equal(up, want)
    rgb = np.stack([src, src + 1, src + 2], axis=-1)
    np.testing.assert_array_equal(
        ad.cv2_warp_affine(rgb, np.array([[1.0, 0, 0], [0, 1.0, 0]]), (4, 3), "nearest"), rgb)


def test_cv2_warp_identity_and_constant():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    eye = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    for interp in ("linear", "cubic"):
        np.testing.assert_array_equal(ad.cv2_warp_affine(src, eye, (13, 9), interp), src)
    shifted = ad.cv2_warp_affine(src[:, :, 0], np.array([[1.0, 0, 2], [0, 1.0, 1]]), (13, 9),
                                 "linear", 7)
    np.testing.assert_array_equal(shifted[1:, 2:], src[:-1, :-2, 0])
    assert (shifted[0] == 7).all() and (shifted[:, :2] == 7).all()


# ------------------------------------------------------------------------------ LAVT


def _check_bert_ids(ids: torch.Tensor, att: torch.Tensor, words: list[str]) -> None:
    n = len(words) + 2
    expect = [IDS["[CLS]"], *(IDS[w] for w in words), IDS["[SEP]"]]
    assert ids.reshape(-1)[:n].tolist() == expect
    assert ids.reshape(-1)[n:].eq(0).all()
    assert att.reshape(-1).tolist() == [1] * n + [0] * (20 - n)


@pytest.mark.parametrize("how", ["object", "path"])
def test_lavt(bert_tok, vocab_dir, how):
    tok = bert_tok if how == "object" else vocab_dir
    img, target, emb, att = ad.get_adapter("lavt", tokenizer=tok)(make_sample())
    assert img.shape == (3, 480, 480) and img.dtype == torch.float32
    assert target.shape == (480, 480) and target.dtype == torch.int64
    assert set(target.unique().tolist()) == {0, 1}
    assert emb.shape == (1, 20) and att.shape == (1, 20)
    assert emb.dtype == torch.int64 and att.dtype == torch.int64
    _check_bert_ids(emb, att, ["the", "man", "on", "the", "left"])

    inside = (torch.tensor(COLOR) / 255.0 - torch.tensor(ad.IMAGENET_MEAN)) / torch.tensor(
        ad.IMAGENET_STD)
    torch.testing.assert_close(img[:, 240, 240], inside)
    torch.testing.assert_close(img[:, 0, 0], inside)

    # PIL NEAREST samples src floor((x + 0.5) * n_src / 480): first/last dst pixel per edge
    def span(lo: int, hi: int, n: int) -> tuple[int, int]:
        return math.ceil(lo * 480 / n - 0.5), math.ceil((hi + 1) * 480 / n - 0.5) - 1

    y0, y1, x0, x1 = bbox(target.numpy())
    ey0, ey1 = span(*ROWS, H)
    ex0, ex1 = span(*COLS, W)
    assert max(abs(y0 - ey0), abs(y1 - ey1), abs(x0 - ex0), abs(x1 - ex1)) <= 1


def test_bert_adapters_tokenize_the_sentence_as_written(bert_tok):
    """LAVT (data/dataset_refer_bert.py) and ReLA (refcoco_mapper.py) encode REFER's `raw`;
    the cleaned `sentence` drops its punctuation. The sample's raw_sentence is what they get."""
    sample = make_sample("the man on the left")
    sample["raw_sentence"] = "The man, on the left"
    _, _, emb, att = ad.get_adapter("lavt", tokenizer=bert_tok)(sample)
    _check_bert_ids(emb, att, ["the", "man", ",", "on", "the", "left"])
    d = ad.get_adapter("rela", tokenizer=bert_tok)(sample)
    _check_bert_ids(d["lang_tokens"], d["lang_mask"], ["the", "man", ",", "on", "the", "left"])
    assert d["sentence"]["raw"] == "The man, on the left"
    # a sample without it (shards before schema 5) falls back to the cleaned sentence
    _, _, emb, att = ad.get_adapter("lavt", tokenizer=bert_tok)(make_sample())
    _check_bert_ids(emb, att, ["the", "man", "on", "the", "left"])


def test_lavt_truncation_and_eval_shape(bert_tok):
    long = " ".join(["dog"] * 30)
    _, _, emb, att = ad.get_adapter("lavt", tokenizer=bert_tok)(make_sample(long))
    assert emb[0, 0] == IDS["[CLS]"] and emb[0, 1:].eq(IDS["dog"]).all()  # [SEP] cut, as theirs
    assert att.eq(1).all()
    _, _, emb, att = ad.get_adapter("lavt", tokenizer=bert_tok, mode="eval")(make_sample())
    assert emb.shape == (1, 20, 1) and att.shape == (1, 20, 1)


def test_lavt_tokenizer_is_lazy_and_picklable(bert_tok):
    a = ad.get_adapter("lavt", tokenizer="no/such/tokenizer/anywhere")  # not loaded yet
    assert a._tokenizer is None
    b = pickle.loads(pickle.dumps(ad.get_adapter("lavt", tokenizer=bert_tok)))
    assert b(make_sample())[2].shape == (1, 20)


# ------------------------------------------------------------------------------ ReLA


def test_rela_positive(bert_tok):
    d = ad.get_adapter("rela", tokenizer=bert_tok)(make_sample())
    assert d["image"].shape == (3, 480, 480) and d["image"].dtype == torch.uint8
    assert d["image"][:, 100, 100].tolist() == list(COLOR)
    assert d["empty"] is False
    m = d["gt_mask_merged"]
    assert m.shape == (1, 480, 480) and m.dtype == torch.int64
    assert set(m.unique().tolist()) == {0, 1}
    inst = d["instances"]
    assert len(inst) == 1 and inst.image_size == (480, 480)
    assert inst.gt_masks.shape == (1, 480, 480) and inst.gt_masks.dtype == torch.bool
    assert inst.gt_classes.dtype == torch.int64
    assert torch.equal(inst.gt_masks.long().sum(0, keepdim=True).clamp(max=1), m)
    _check_bert_ids(d["lang_tokens"], d["lang_mask"], ["the", "man", "on", "the", "left"])
    assert d["lang_tokens"].shape == (1, 20) and d["lang_mask"].dtype == torch.int64
    assert d["padding_mask"].shape == (480, 480) and not d["padding_mask"].any()
    assert (d["height"], d["width"], d["image_id"]) == (H, W, 33)
    assert d["sentence"] == {"raw": "the man on the left", "sent_id": 11, "ref_id": 22}
    y0, y1, x0, x1 = bbox(m[0].numpy())
    assert abs(y0 - math.ceil(ROWS[0] * 480 / H - 0.5)) <= 1
    assert abs(x1 - (math.ceil((COLS[1] + 1) * 480 / W - 0.5) - 1)) <= 1
    moved = inst.to("cpu")
    assert len(moved) == 1
    back = pickle.loads(pickle.dumps(d))  # DataLoader workers pickle the dict
    assert torch.equal(back["instances"].gt_masks, inst.gt_masks) and back["empty"] is False


def test_rela_no_target(bert_tok):
    d = ad.get_adapter("rela", tokenizer=bert_tok)(make_sample(no_target=True))
    assert d["empty"] is True
    m = d["gt_mask_merged"]
    assert m.shape == (1, 480, 480) and m.dtype == torch.int64 and not m.any()
    assert len(d["instances"]) == 0 and d["instances"].gt_masks.shape == (0, 480, 480)
    # eval mode carries gt_mask instead of instances, as their mapper does
    e = ad.get_adapter("rela", tokenizer=bert_tok, is_train=False)(make_sample(no_target=True))
    assert "instances" not in e and e["gt_mask"].shape == (0, 480, 480)
    bad = make_sample(no_target=True)
    bad["mask"][0, 0] = 1
    with pytest.raises(ValueError, match="no_target"):
        ad.get_adapter("rela", tokenizer=bert_tok)(bad)


# ------------------------------------------------------------------------------ wrapper


def test_adapted_dataset():
    samples = [make_sample(), make_sample(no_target=True)]
    ds = ad.AdaptedDataset(samples, "generic")
    assert len(ds) == 2 and ds[1].mask.sum() == 0


class _Named(list):
    """Samples that say which dataset the shards were built from, as NemoDataset does."""

    dataset_name = "refcocog-umd"


def test_adapted_dataset_takes_the_datasets_name_for_its_defaults():
    """CRIS uses 22 tokens on G-Ref (its config/refcocog_*: word_len 22) and 17 elsewhere;
    AdaptedDataset(ds, "cris") fell back to 17 for G-Ref shards, cutting long sentences."""
    long_text = " ".join(["the"] * 30)
    gref = ad.AdaptedDataset(_Named([make_sample(long_text)]), "cris")
    assert gref.adapter.word_length == 22 and gref[0][1].shape == (22,)
    assert ad.AdaptedDataset([make_sample()], "cris").adapter.word_length == 17
    given = ad.AdaptedDataset(_Named([make_sample()]), "cris", word_length=30)
    assert given.adapter.word_length == 30  # what the caller says wins
    other = ad.AdaptedDataset(_Named([make_sample()]), "cris", dataset="refcoco")
    assert other.adapter.word_length == 17
    assert ad.AdaptedDataset(_Named([make_sample()]), "generic")[0].mask.sum() > 0


def test_cris_ground_truth_png_is_this_samples_even_in_a_reused_mask_dir(tmp_path):
    """A PNG of the same name (ref, sent, index, epoch) left by another dataset in the same
    mask_dir was kept and scored as this sample's ground truth."""
    cris = ad.get_adapter("cris", mode="val", mask_dir=tmp_path)
    first = cris(make_sample())[2]["mask_dir"]
    Image.fromarray(np.zeros((H, W), np.uint8)).save(first)  # another build's mask, same name
    again = cris(make_sample())[2]["mask_dir"]
    assert again == first
    gt = np.asarray(Image.open(again))
    rows, cols = np.nonzero(gt)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (*ROWS, *COLS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------- masks as users have them


def _adapter(name: str, bert_tok) -> Any:
    """A registered adapter, with the test tokenizer where it needs one."""
    kwargs = {"tokenizer": bert_tok} if name in ("lavt", "rela") else {}
    return ad.get_adapter(name, **kwargs)


def _output_mask(name: str, out: Any) -> np.ndarray:
    if name == "generic":
        return np.asarray(out.mask, np.float64)
    if name == "cris":
        return out[2].numpy().astype(np.float64)
    if name == "lavt":
        return out[1].numpy().astype(np.float64)
    return out["gt_mask_merged"][0].numpy().astype(np.float64)  # rela


def _user_mask(form: str) -> np.ndarray:
    """The test rectangle (ROWS x COLS) in the forms masks arrive in from users' own code."""
    m01 = make_sample()["mask"]
    if form == "uint8_255":
        return m01 * np.uint8(255)
    if form == "bool":
        return m01.astype(bool)
    if form == "float01":
        return m01.astype(np.float32)
    if form == "float_soft":  # probabilities: 0.7 inside, 0.3 outside -> the same hard mask
        return np.where(m01 == 1, 0.7, 0.3).astype(np.float64)
    if form == "int64":
        return m01.astype(np.int64)
    raise AssertionError(form)


ADAPTER_NAMES = ("generic", "cris", "lavt", "rela")


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@pytest.mark.parametrize("form", ["uint8_255", "bool", "float01", "float_soft", "int64"])
def test_every_adapter_binarises_user_masks(bert_tok, name, form):
    adapter = _adapter(name, bert_tok)
    # oracle 1: the output for the canonical {0, 1} uint8 mask (what NemoDataset returns)
    want = _output_mask(name, adapter(make_sample()))
    s = make_sample()
    s["mask"] = _user_mask(form)
    got = _output_mask(name, adapter(s))
    np.testing.assert_array_equal(got, want)
    # oracle 2: hand facts: a hard target peaks at exactly 1 (a 0/255 mask scaled by CRIS's
    # own /255 would peak at 1/255 = 0.0039) and the rectangle's middle is foreground
    assert got.max() == 1.0 and got.min() == 0.0


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@pytest.mark.parametrize("shape", ["hw1", "hw3", "flat"])
def test_every_adapter_refuses_a_mask_that_is_not_2d(bert_tok, name, shape):
    s = make_sample()
    m = s["mask"]
    s["mask"] = {"hw1": m[:, :, None], "hw3": np.repeat(m[:, :, None], 3, 2),
                 "flat": m.reshape(-1)}[shape]
    with pytest.raises(ad.AdapterInputError, match="shape"):
        _adapter(name, bert_tok)(s)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@pytest.mark.parametrize("bad", [255.0, -0.5, float("nan")])
def test_every_adapter_refuses_float_masks_outside_0_1(bert_tok, name, bad):
    s = make_sample()
    m = s["mask"].astype(np.float32)
    m[ROWS[0], COLS[0]] = bad
    s["mask"] = m
    with pytest.raises(ad.AdapterInputError, match=r"\[0, 1\]"):
        _adapter(name, bert_tok)(s)
