"""LLaVA-1.5's side of a request: its chat format, its image padding, its image tokens.

A CLIP-style processor resizes the short side and center-crops, which would cut off instances
near the long edges (the model would then be asked about objects it cannot see). LLaVA-1.5
pads to a square first (`expand2square`), with the CLIP normalisation mean as fill
(`pad_to_square`); prompts describe boxes in that padded square (`square_offset`).

Only PIL is imported at module level.
"""

from __future__ import annotations

from typing import Any, Literal

from PIL import Image, ImageStat

__all__ = ["CLIP_MEAN_RGB", "DEFAULT_MODEL", "IMAGE_TOKEN", "LLAVA_CHAT_TEMPLATE",
           "conversation", "image_token_count", "llava_prompt", "pad_to_square",
           "square_offset"]

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
IMAGE_TOKEN = "<image>"

# LLaVA-1.5's chat template, exactly as shipped with llava-hf/llava-1.5-7b-hf
# (chat_template.json): "USER: <image>\n{prompt} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# LLaVA-1.5 pads images to a square with the CLIP normalisation mean (its `expand2square` is
# called with `tuple(int(x * 255) for x in image_processor.image_mean)`): after normalisation
# the padding is exactly zero, which is what the model saw in training.
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_MEAN_RGB: tuple[int, int, int] = tuple(int(x * 255) for x in _OPENAI_CLIP_MEAN)  # type: ignore[assignment]


def llava_prompt(prompt: str) -> str:
    """LLaVA-1.5's chat format for one user turn with one image (what its template renders)."""
    return f"USER: {IMAGE_TOKEN}\n{prompt} ASSISTANT:"


def conversation(image: Image.Image | None, prompt: str) -> list[dict[str, Any]]:
    """One user turn with one image (its placeholder when `image` is None) and the prompt,
    in the messages format of a processor's ``apply_chat_template``."""
    block: dict[str, Any] = {"type": "image"}
    if image is not None:
        block["image"] = image
    return [{"role": "user", "content": [block, {"type": "text", "text": prompt}]}]


def square_offset(width: int, height: int) -> tuple[int, int, int]:
    """(side, left, top) of the centered square that `pad_to_square` produces."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def pad_to_square(image: Image.Image,
                  fill: tuple[int, int, int] | Literal["average"] | None = None,
                  ) -> tuple[Image.Image, tuple[int, int]]:
    """Pad to a centered square; return ``(square_image, (left, top))`` offset of the original.

    The fill is LLaVA-1.5's by default (`CLIP_MEAN_RGB`; the HF generator passes its own
    processor's mean); ``fill="average"`` uses the picture's own average colour instead; or
    pass an RGB tuple.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if fill is None:
        color: tuple[int, ...] = CLIP_MEAN_RGB
    elif fill == "average":
        color = tuple(int(round(c)) for c in ImageStat.Stat(image).mean[:3])
    else:
        color = tuple(int(c) for c in fill)
    width, height = image.size
    side, left, top = square_offset(width, height)
    if width == height:
        return image, (0, 0)
    canvas = Image.new("RGB", (side, side), color)  # type: ignore[arg-type]
    canvas.paste(image, (left, top))
    return canvas, (left, top)


def image_token_count(processor: Any) -> int | None:
    """Tokens one square image takes in a prompt (its ``<image>`` expanded), measured once
    with the model's processor (LLaVA-1.5: 576); None when the processor cannot say."""
    try:
        text = llava_prompt("x")
        image = Image.new("RGB", (336, 336), CLIP_MEAN_RGB)
        expanded = processor(text=[text], images=[image])["input_ids"][0]
        return len(expanded) - len(processor.tokenizer(text)["input_ids"]) + 1
    except Exception:  # another processor API: vLLM's own length cap still applies
        return None
