"""Drawing: a Scene becomes a small RGB PNG. Pure PIL with integer geometry, so the bytes depend
only on the scene (and the PIL/zlib build), never on a random state."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from .scenes import COLORS, Obj, Scene

BACKGROUND = (232, 232, 228)
SUPERSAMPLE = 4  # draw large, then shrink: smooth edges make small shapes recognisable
RADIUS_OF_CELL = {"large": 0.36, "small": 0.22}  # half the shape's extent, as a fraction of a cell


def max_jitter(image_size: int) -> int:
    """How far (pixels) a centre may move inside its cell without leaving it."""
    return max(1, image_size // 24)


def _polygon(obj: Obj, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if obj.shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if obj.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if obj.shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(obj.shape)


def render(scene: Scene, image_size: int) -> Image.Image:
    big = image_size * SUPERSAMPLE
    cell = big / 3
    img = Image.new("RGB", (big, big), BACKGROUND)
    pen = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx = (obj.col + 0.5) * cell + obj.dx * SUPERSAMPLE
        cy = (obj.row + 0.5) * cell + obj.dy * SUPERSAMPLE
        r = RADIUS_OF_CELL[obj.size] * cell
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            pen.ellipse([round(cx - r), round(cy - r), round(cx + r), round(cy + r)], fill=fill)
        else:
            pen.polygon([(round(x), round(y)) for x, y in _polygon(obj, cx, cy, r)], fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)  # no text chunks, no timestamps
    return buf.getvalue()
