"""stages.models.llava: LLaVA-1.5's padding to a square, checked pixel by pixel."""

from __future__ import annotations

from PIL import Image

from stages.models.llava import CLIP_MEAN_RGB, pad_to_square


def test_pad_to_square_places_content_and_fills_with_clip_mean() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.putpixel((0, 0), (0, 255, 0))
    out, (left, top) = pad_to_square(img)
    assert out.size == (40, 40) and (left, top) == (0, 10)
    assert out.getpixel((0, 10)) == (0, 255, 0)  # original top-left corner, shifted down
    assert out.getpixel((39, 29)) == (255, 0, 0)
    assert out.getpixel((20, 5)) == CLIP_MEAN_RGB == out.getpixel((20, 35))
    assert CLIP_MEAN_RGB == (122, 116, 104)  # LLaVA-1.5: int(x * 255) of the CLIP mean
    tall, offset = pad_to_square(Image.new("RGB", (15, 30), (0, 0, 255)), fill=(1, 2, 3))
    assert tall.size == (30, 30) and offset == (7, 0)
    assert tall.getpixel((0, 0)) == (1, 2, 3) and tall.getpixel((7, 0)) == (0, 0, 255)


def test_pad_to_square_average_fill_and_modes() -> None:
    img = Image.new("RGB", (20, 10), (200, 100, 0))
    img.paste((0, 0, 100), (0, 0, 10, 10))  # left half
    out, _ = pad_to_square(img, fill="average")
    assert out.getpixel((0, 0)) == (100, 50, 50)
    square = Image.new("RGB", (16, 16))
    assert pad_to_square(square) == (square, (0, 0))
    gray, _ = pad_to_square(Image.new("L", (8, 4), 7))
    assert gray.mode == "RGB" and gray.size == (8, 8)

