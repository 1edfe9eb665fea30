"""Labelled image grids (trigger, poison and inverted-trigger pictures) as PNG.

Images are upscaled by an integer factor with nearest neighbour, so that each is at least
:data:`MIN_SIZE` pixels and the trigger's pixels stay sharp; every row has a label on the left
and every image a caption under it (one or two lines). Text uses PIL's default font (no font
files), so the output is the same byte for byte on every machine with the same Pillow. Files
are written atomically under a unique temporary name (:func:`benchmark.io.atomic_write_bytes`),
so two processes writing the same picture never collide.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from benchmark.io import atomic_write_bytes

MIN_SIZE = 96  # smallest side of a shown image, in pixels
FONT_SIZE = 11
PAD = 4
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def class_name(classes: Sequence[str], label: int) -> str:
    """The class name of ``label`` where ``classes`` holds one, else the number."""
    if 0 <= label < len(classes) and str(classes[label]).strip():
        return str(classes[label])
    return str(label)


def distinct_first(labels: Tensor, n: int) -> Tensor:
    """Indices of ``n`` samples, one per class in order of first appearance while classes
    last, then the next samples in order (so the picture shows as many classes as it can)."""
    labels = labels.cpu()
    seen: set[int] = set()
    first, rest = [], []
    for i, y in enumerate(labels.tolist()):
        (rest if y in seen else first).append(i)
        seen.add(y)
        if len(first) >= n:
            break
    return torch.tensor((first + rest)[:n], dtype=torch.long)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` shortened with "..." to at most ``width`` pixels."""
    font = _font()
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels."""
    lines: list[str] = []
    for word in text.split():
        line = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(line, font=_font()) <= width:
            lines[-1] = line
        else:
            lines.append(_fit(draw, word, width))
    return lines


def _to_pil(x: Tensor, scale: int) -> Image.Image:
    """A ``(C, H, W)`` uint8 image as RGB, upscaled ``scale`` times with nearest neighbour."""
    arr = x.detach().cpu().to(torch.uint8)
    if arr.shape[0] == 1:
        arr = arr.expand(3, -1, -1)
    image = Image.fromarray(arr[:3].permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def labelled_grid(
    rows: Sequence[Tensor],
    row_labels: Sequence[str],
    captions: Sequence[Sequence[str]] | None = None,
    note: str | None = None,
    min_size: int = MIN_SIZE,
) -> Image.Image:
    """A grid of uint8 image rows ``(N, C, H, W)`` (same N, C, H, W), one label per row and
    an optional caption under each image (``"\\n"`` breaks a line) and note on top."""
    n, _, h, w = rows[0].shape
    scale = max(1, math.ceil(min_size / max(h, w)))
    cell_w, cell_h = w * scale, h * scale
    line_h = FONT_SIZE + 3
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(t, font=_font())) for t in row_labels) + 2 * PAD
    width = label_w + n * (cell_w + PAD) + PAD
    text_rows = [[c.split("\n") for c in r] for r in (captions or [[""] * n for _ in rows])]
    n_lines = max((len(c) for r in text_rows for c in r), default=0)
    row_h = PAD + cell_h + n_lines * line_h + PAD
    note_lines = _wrap(probe, note, width - 2 * PAD) if note else []
    top = PAD + len(note_lines) * line_h
    canvas = Image.new("RGB", (width, top + len(rows) * row_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(note_lines):
        draw.text((PAD, PAD + k * line_h), line, fill=INK, font=_font())
    for r, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        y0 = top + r * row_h + PAD
        draw.text((PAD, y0 + cell_h // 2), label, fill=INK, font=_font(), anchor="lm")
        for i in range(n):
            x0 = label_w + i * (cell_w + PAD)
            canvas.paste(_to_pil(images[i], scale), (x0, y0))
            for k, line in enumerate(text_rows[r][i]):
                pos = (x0, y0 + cell_h + 1 + k * line_h)
                draw.text(pos, _fit(draw, line, cell_w), fill=INK, font=_font())
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG atomically, under a unique temporary name."""
    path = Path(path)
    atomic_write_bytes(path, png_bytes(image))
    return path
