"""Drawing detections on images: boxes, names and scores that stay readable on any background."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def label_colour(label: int) -> tuple[int, int, int]:
    """A saturated colour per label, spread around the hue circle by the golden ratio."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def enlarge_for_drawing(image: Image.Image, min_side: int = 512) -> tuple[Image.Image, int]:
    """An RGB copy of ``image`` enlarged by an integer factor ``zoom`` (nearest neighbour, so pixels stay sharp
    squares) chosen so that the longer side reaches about ``min_side``; ``zoom`` is 1 for an image already that large
    (or ``min_side`` <= 0). Captions and dots drawn on the result stay readable on a small image. Returns the copy and
    ``zoom``: pixel coordinates of ``image`` times ``zoom`` are those of the copy."""
    zoom = max(1, min_side // max(image.size))
    canvas = image.convert("RGB")  # a copy, also of an RGB image
    if zoom == 1:
        return canvas, 1
    return canvas.resize((image.width * zoom, image.height * zoom), Image.NEAREST), zoom


def draw_detections(image: Image.Image, boxes: Sequence[Sequence[float]], scores: Sequence[float],
                    labels: Sequence[int], names: dict[int, str] | None = None, score_threshold: float = 0.0,
                    line_width: int | None = None, min_side: int = 512) -> Image.Image:
    """A copy of ``image`` with every detection scoring at least ``score_threshold`` drawn on it.

    boxes: xyxy pixels of ``image``. An image whose longer side is under ``min_side`` is enlarged first
    (:func:`enlarge_for_drawing`, boxes scaled with it; ``min_side=0`` draws at the image's own size), so that
    captions do not cover a small image. Each box gets a dark outline under its coloured one, and its caption
    ("name 0.87") sits on a filled tag of the box's colour with black or white text, whichever contrasts more.
    """
    canvas, zoom = enlarge_for_drawing(image, min_side)
    draw = ImageDraw.Draw(canvas)
    width = line_width or max(2, round(max(canvas.size) / 300))
    font = ImageFont.load_default(size=max(10, round(max(canvas.size) / 50)))
    # Lowest scores first, so the most confident boxes end up on top.
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    for i in order:
        if scores[i] < score_threshold:
            continue
        x0, y0, x1, y1 = (float(v) * zoom for v in boxes[i])
        colour = label_colour(int(labels[i]))
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0), width=width + 2)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        name = names.get(int(labels[i]), str(int(labels[i]))) if names else str(int(labels[i]))
        caption = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_w, text_h = right - left, bottom - top
        # Above the box when there is room, else inside its top edge.
        tag_y = y0 - text_h - 4 if y0 - text_h - 4 >= 0 else y0
        tag_x = min(max(x0, 0), max(canvas.width - text_w - 4, 0))
        draw.rectangle([tag_x, tag_y, tag_x + text_w + 4, tag_y + text_h + 4], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tag_x + 2 - left, tag_y + 2 - top), caption, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255),
                  font=font)
    return canvas
