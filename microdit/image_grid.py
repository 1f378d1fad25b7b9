"""A contact sheet of generated images: each tile captioned with the start of its prompt
(`<out>/grid.png` of `microdit evaluate`)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from microdit.io import atomic_path


def save_grid(images: list[Image.Image], captions: list[str], path: Path, cols: int = 4, tile: int = 192) -> None:
    """Images in a grid, each with the start of its caption underneath."""
    from PIL import ImageDraw, ImageFont

    if not images:
        return
    font = ImageFont.load_default()
    line_h, lines = 12, 3
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * tile, rows * (tile + line_h * lines + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for n, (image, caption) in enumerate(zip(images, captions)):
        x, y = (n % cols) * tile, (n // cols) * (tile + line_h * lines + 4)
        small = image.convert("RGB").resize((tile, tile), Image.NEAREST if image.width < tile else Image.BICUBIC)
        canvas.paste(small, (x, y))
        for k, text in enumerate(wrap(caption, tile // 6, lines)):
            draw.text((x + 2, y + tile + 2 + k * line_h), text, fill=(30, 30, 30), font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def wrap(text: str, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` characters, the last kept line ending in '...' when cut."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 3)] + "..."
    return [ln[:width] for ln in lines]
