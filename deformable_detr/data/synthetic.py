"""A small synthetic detection dataset written as real image files and COCO-format JSON: filled shapes of five
classes on textured, noisy backgrounds. Small enough to train a small Deformable DETR from scratch on a CPU.

Layout (``out_dir``)::

    train/000001.png ...   training images        train.json   COCO detection annotations of train/
    val/000001.png ...     validation images      val.json     COCO detection annotations of val/

Design:

* classes (category ids 1..5, COCO style, so ``num_classes`` = 6): rectangle, ellipse, triangle, cross, star.
  By default the colour of a shape is drawn independently of its class from a palette of saturated colours, so the
  class must be learnt from the shape (``colour_by_class=True`` ties each class to its own hue, for an easier task).
* ``min_objects``..``max_objects`` shapes per image (default 1..4), a fraction ``empty_fraction`` of the images has
  none; extents (the larger side) from 10% (at least 12 px) to 60% of the short side (log-uniform), aspect ratios
  0.5..2 (rectangles, ellipses) or 0.75..1.33 (others), triangles, crosses and stars at random rotations,
  anti-aliased edges.
* small objects (``small_fraction``): each object is, with this probability, given an extent log-uniform in
  [8, 24] px whatever the image size, so that its area is below 32 x 32 px: COCO's "small" range (AP_S). Note that
  the ordinary range also yields COCO-small objects (thin rectangles, stars, occluded shapes): 47% of them at
  ``image_size=256``, 66% at 192, 84% at 128 (measured over 200 images with the other defaults).
* shapes may overlap: a later shape is drawn over earlier ones, and is only placed where every earlier shape keeps
  at least ``min_visible`` (default 60%) of its pixels visible. The box and area of an annotation are those of the
  VISIBLE pixels (as COCO boxes follow the visible segmentation), so they agree with the image exactly.
* clutter (``clutter``): 0..``clutter`` unannotated distractor marks per image (rings, thick line segments, arcs:
  none of the five classes), in the objects' colours and sizes, drawn on the background before the objects (which
  may cover them), so that neither colour nor "something is there" tells an object: only its shape does.
* backgrounds: a gradient between two muted colours, low-frequency blotches, sometimes stripes, pixel noise; shape
  colours are chosen to contrast with the background under the shape.
* image sizes: width and height each drawn in [3/4, 1] x ``image_size`` pixels.

Deterministic: image ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])`` alone, so the
same seed gives byte-identical files (with the same numpy, Pillow and zlib/libjpeg), and the first images of a
split do not depend on how many are asked for. With every knob at its default, the generator draws the same random
numbers as before the knobs existed (``small_fraction``, ``clutter``, ``min_visible``, ``min_objects``: commit
85c1447 and earlier), so old datasets are reproduced byte for byte; a knob draws random numbers only when it is not
at its default, and is recorded in the JSON ``info`` only then.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

CATEGORIES: tuple[str, ...] = ("rectangle", "ellipse", "triangle", "cross", "star")
"""Class names; category id = position + 1."""

# Saturated colours, far from the muted backgrounds. With colour_by_class, class k uses _PALETTE[k].
_PALETTE = np.array([[230, 40, 40], [40, 200, 60], [50, 90, 240], [245, 210, 30], [220, 50, 220], [40, 220, 230],
                     [250, 130, 20], [140, 60, 230], [250, 250, 250], [20, 20, 20]], dtype=np.float64)
_SUPERSAMPLING = 4  # shapes are drawn 4x larger and box-filtered down: anti-aliased edges
_PLACEMENT_TRIES = 20
# A shape whose mask (coverage >= 0.5) has fewer pixels is redrawn. 30 keeps out unreadable slivers of the ordinary
# range (it starts at 12 px); a COCO-small shape of 8 px extent has only 15..32 pixels (measured: stars 15..27,
# triangles 16..29, ellipses 25..52), so small shapes get a lower floor, else the floor would silently cut off the
# bottom of their range (and bias their classes towards rectangles).
_MIN_PIXELS = 30
_MIN_PIXELS_SMALL = 10
_SMALL_EXTENT = (8.0, 24.0)  # px, the larger side: masks of at most 25 x 25 px (measured 600 px) < 32 x 32 (COCO small)
# Knob defaults: at these values the generator draws exactly the random numbers it drew before the knobs existed.
_KNOB_DEFAULTS = {"min_objects": 1, "small_fraction": 0.0, "clutter": 0, "min_visible": 0.6}
_SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticDataset:
    """Where :func:`make_synthetic_dataset` wrote the data."""

    root: Path
    train_images: Path
    train_json: Path
    val_images: Path
    val_json: Path


@dataclass(frozen=True)
class SyntheticObject:
    """One annotated shape of a :class:`SyntheticScene`."""

    category_id: int
    bbox: list[float]
    """COCO [x, y, w, h] of the visible pixels."""
    area: float
    """Visible pixel count (what the JSON records)."""
    full_area: float
    """Pixel count of the whole shape before later shapes covered part of it (area / full_area = visible fraction)."""
    visible: np.ndarray = field(repr=False)
    """(H, W) bool: the visible pixels (coverage >= 0.5, not covered by a later shape)."""


@dataclass(frozen=True)
class SyntheticScene:
    """Everything :func:`render_scene` drew: the image, its annotated objects, and its unannotated clutter."""

    pixels: np.ndarray = field(repr=False)
    """(H, W, 3) uint8."""
    objects: list[SyntheticObject]
    num_clutter: int
    """Distractor marks drawn (0..clutter)."""
    clutter: np.ndarray = field(repr=False)
    """(H, W) bool: pixels of the distractor marks (coverage >= 0.5) as drawn, before objects covered them."""


def make_synthetic_dataset(out_dir: str | Path, num_train: int = 1000, num_val: int = 200, image_size: int = 160,
                           seed: int = 0, *, max_objects: int = 4, empty_fraction: float = 0.1,
                           colour_by_class: bool = False, image_format: str = "png", min_objects: int = 1,
                           small_fraction: float = 0.0, clutter: int = 0, min_visible: float = 0.6
                           ) -> SyntheticDataset:
    """Writes the dataset described in this module's docstring under ``out_dir`` (created if needed; files of the
    same names are overwritten) and returns its paths.

    image_format: 'png' (lossless: pixels are exactly those the annotations were computed from) or 'jpg'.
    min_objects: the fewest objects in a non-empty image (1..max_objects).
    small_fraction: probability in [0, 1] that an object is COCO-small (extent log-uniform in [8, 24] px).
    clutter: at most this many unannotated distractor marks per image (0..clutter, uniform).
    min_visible: in (0, 1]: a shape is placed only where every earlier shape keeps this fraction of its pixels.
    The JSON ``info`` records these four only where they differ from their defaults (so that files written with the
    defaults stay byte-identical to those written before the knobs existed).
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if max_objects < 0:
        raise ValueError(f"max_objects must be >= 0, got {max_objects}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1], got {empty_fraction}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    knobs = dict(min_objects=min_objects, small_fraction=small_fraction, clutter=clutter, min_visible=min_visible)
    _check_knobs(max_objects=max_objects, **knobs)
    root = Path(out_dir)
    options = dict(image_size=image_size, max_objects=max_objects, empty_fraction=empty_fraction,
                   colour_by_class=colour_by_class)
    # Only knobs away from their defaults join the options (and so the JSON info): see the docstring.
    options.update({name: value for name, value in knobs.items() if value != _KNOB_DEFAULTS[name]})
    for split, count in (("train", num_train), ("val", num_val)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([seed, _SPLITS[split], index])
            pixels, objects = render_image(rng, **options)
            image_id = index + 1
            file_name = f"{image_id:06d}.{image_format}"
            _save(pixels, folder / file_name, image_format)
            images.append({"id": image_id, "file_name": file_name, "width": pixels.shape[1],
                           "height": pixels.shape[0]})
            for category_id, bbox, area in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                    "bbox": bbox, "area": area, "iscrowd": 0})
        coco = {"info": {"description": f"deformable_detr synthetic shapes ({split})", "seed": seed, **options,
                         "image_format": image_format},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                               for i, name in enumerate(CATEGORIES)]}
        (root / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")) + "\n")
    return SyntheticDataset(root, root / "train", root / "train.json", root / "val", root / "val.json")


def _save(pixels: np.ndarray, path: Path, image_format: str) -> None:
    image = PIL.Image.fromarray(pixels, mode="RGB")
    if image_format == "png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=92)


# --------------------------------------------------------------------------------------------------- drawing


def _check_knobs(*, max_objects: int, min_objects: int, small_fraction: float, clutter: int, min_visible: float
                 ) -> None:
    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    if not (isinstance(min_objects, int) and not isinstance(min_objects, bool)
            and 1 <= min_objects <= max(max_objects, 1)):
        raise ValueError(f"min_objects must be an integer in [1, max_objects={max_objects}], got {min_objects!r}")
    if not (number(small_fraction) and 0.0 <= small_fraction <= 1.0):
        raise ValueError(f"small_fraction must be a number in [0, 1], got {small_fraction!r}")
    if not (isinstance(clutter, int) and not isinstance(clutter, bool) and clutter >= 0):
        raise ValueError(f"clutter must be an integer >= 0, got {clutter!r}")
    if not (number(min_visible) and 0.0 < min_visible <= 1.0):
        raise ValueError(f"min_visible must be a number in (0, 1], got {min_visible!r}")


def render_image(rng: np.random.Generator, image_size: int = 160, max_objects: int = 4, empty_fraction: float = 0.1,
                 colour_by_class: bool = False, *, min_objects: int = 1, small_fraction: float = 0.0,
                 clutter: int = 0, min_visible: float = 0.6
                 ) -> tuple[np.ndarray, list[tuple[int, list[float], float]]]:
    """One image: pixels (H, W, 3) uint8 and its objects as (category id, COCO bbox [x, y, w, h] of the visible
    pixels, visible pixel count). The knobs are those of :func:`make_synthetic_dataset`; :func:`render_scene` draws
    the same image and tells more (full areas, masks, clutter)."""
    scene = render_scene(rng, image_size, max_objects, empty_fraction, colour_by_class, min_objects=min_objects,
                         small_fraction=small_fraction, clutter=clutter, min_visible=min_visible)
    return scene.pixels, [(o.category_id, o.bbox, o.area) for o in scene.objects]


def render_scene(rng: np.random.Generator, image_size: int = 160, max_objects: int = 4, empty_fraction: float = 0.1,
                 colour_by_class: bool = False, *, min_objects: int = 1, small_fraction: float = 0.0,
                 clutter: int = 0, min_visible: float = 0.6) -> SyntheticScene:
    """:func:`render_image`'s image (the same random draws, the same pixels) with its objects' masks and full areas
    and the clutter's mask."""
    _check_knobs(max_objects=max_objects, min_objects=min_objects, small_fraction=small_fraction, clutter=clutter,
                 min_visible=min_visible)
    width = int(rng.integers(image_size * 3 // 4, image_size + 1))
    height = int(rng.integers(image_size * 3 // 4, image_size + 1))
    canvas = _background(rng, width, height)
    # Every "if knob" below draws nothing at the knob's default: the default stream is the pre-knob one.
    num_clutter = int(rng.integers(0, clutter + 1)) if clutter else 0
    clutter_mask = np.zeros((height, width), dtype=bool)
    # Clutter shares the objects' colours: with colour_by_class, the classes' own colours.
    clutter_colours = _PALETTE[:len(CATEGORIES)] if colour_by_class else _PALETTE
    for _ in range(num_clutter):
        small = bool(small_fraction) and rng.random() < small_fraction
        alpha = _clutter_alpha(rng, width, height, small)
        canvas = canvas * (1.0 - alpha[..., None]) + _fill(rng, canvas, alpha, clutter_colours) * alpha[..., None]
        clutter_mask |= alpha >= 0.5
    wanted = 0 if rng.random() < empty_fraction or max_objects == 0 else int(rng.integers(min_objects,
                                                                                          max_objects + 1))
    # Each placed object: (category id, alpha (H, W) in [0, 1], full mask, visible mask).
    placed: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    for _ in range(wanted):
        category = int(rng.integers(len(CATEGORIES)))
        # Decided once per object (not per placement try), so that a small object stays small however often it is
        # redrawn for room.
        small = bool(small_fraction) and rng.random() < small_fraction
        for _ in range(_PLACEMENT_TRIES):
            alpha = _shape_alpha(rng, category, width, height, small)
            mask = alpha >= 0.5
            if mask.sum() < (_MIN_PIXELS_SMALL if small else _MIN_PIXELS):
                continue
            if all((visible & ~mask).sum() >= min_visible * full.sum() for _, _, full, visible in placed):
                break
        else:
            continue  # no room for this one
        colours = _PALETTE[category:category + 1] if colour_by_class else _PALETTE
        fill = _fill(rng, canvas, alpha, colours)
        canvas = canvas * (1.0 - alpha[..., None]) + fill * alpha[..., None]
        placed = [(c, a, full, visible & ~mask) for c, a, full, visible in placed]
        placed.append((category + 1, alpha, mask, mask))
    noise = rng.normal(0.0, rng.uniform(2.0, 8.0), size=canvas.shape)
    pixels = np.clip(np.rint(canvas + noise), 0, 255).astype(np.uint8)
    objects = []
    for category_id, _, full, visible in placed:
        rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
        x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
        objects.append(SyntheticObject(category_id, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                       float(visible.sum()), float(full.sum()), visible))
    return SyntheticScene(pixels, objects, num_clutter, clutter_mask)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(H, W, 3) float64: gradient between two muted colours + low-frequency blotches (+ stripes) + noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    t = ((along - along.min()) / max(along.max() - along.min(), 1e-9))[..., None]
    start, end = rng.uniform(50.0, 190.0, size=3), rng.uniform(50.0, 190.0, size=3)
    image = start * (1.0 - t) + end * t
    cells = int(rng.integers(3, 8))
    coarse = rng.normal(0.0, 22.0, size=(cells + 1, cells + 1, 3))
    image += _upsample(coarse, width, height)
    if rng.random() < 0.35:
        stripe_angle = rng.uniform(0.0, math.pi)
        period = rng.uniform(5.0, 20.0)
        phase = (x * math.cos(stripe_angle) + y * math.sin(stripe_angle)) * 2.0 * math.pi / period
        image += rng.uniform(6.0, 16.0) * np.sin(phase)[..., None]
    image += rng.normal(0.0, rng.uniform(3.0, 10.0), size=image.shape)
    return image


def _upsample(coarse: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear interpolation of a (gh, gw, C) grid spanning the whole image to (height, width, C)."""
    rows = np.linspace(0.0, coarse.shape[0] - 1, height)
    cols = np.linspace(0.0, coarse.shape[1] - 1, width)
    r0 = np.minimum(rows.astype(int), coarse.shape[0] - 2)
    c0 = np.minimum(cols.astype(int), coarse.shape[1] - 2)
    fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bottom = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def _extent(rng: np.random.Generator, width: int, height: int, small: bool) -> float:
    """The larger side of a shape in px, log-uniform: COCO-small ones in _SMALL_EXTENT, others in 10%..60% of the
    short side (at least 12 px)."""
    short = min(width, height)
    low, high = _SMALL_EXTENT if small else (max(12.0, 0.1 * short), 0.6 * short)
    return math.exp(rng.uniform(math.log(low), math.log(high)))


class _Window:
    """The pixels around a mark centred at (cx, cy) of the given radius, drawn supersampled: ``draw`` in coordinates
    relative to the window (``cx``, ``cy``, times _SUPERSAMPLING), ``alpha()`` the box-filtered coverage (H, W)."""

    def __init__(self, cx: float, cy: float, radius: float, width: int, height: int) -> None:
        self.left, self.top = max(int(cx - radius) - 1, 0), max(int(cy - radius) - 1, 0)
        self.right = min(int(math.ceil(cx + radius)) + 1, width)
        self.bottom = min(int(math.ceil(cy + radius)) + 1, height)
        self.width, self.height = width, height
        self.cx, self.cy = cx - self.left, cy - self.top
        self.layer = PIL.Image.new("L", ((self.right - self.left) * _SUPERSAMPLING,
                                         (self.bottom - self.top) * _SUPERSAMPLING), 0)
        self.draw = PIL.ImageDraw.Draw(self.layer)

    def alpha(self) -> np.ndarray:
        alpha = np.zeros((self.height, self.width), dtype=np.float64)
        window = self.layer.resize((self.right - self.left, self.bottom - self.top), PIL.Image.Resampling.BOX)
        alpha[self.top:self.bottom, self.left:self.right] = np.asarray(window, dtype=np.float64) / 255.0
        return alpha


def _shape_alpha(rng: np.random.Generator, category: int, width: int, height: int, small: bool = False
                 ) -> np.ndarray:
    """(H, W) coverage in [0, 1] of a random shape of class ``category`` (index into CATEGORIES)."""
    extent = _extent(rng, width, height, small)
    name = CATEGORIES[category]
    if name in ("rectangle", "ellipse"):
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    else:
        aspect = math.exp(rng.uniform(math.log(0.75), math.log(4.0 / 3.0)))
    # Half-extents, the larger one = extent / 2.
    half_x, half_y = (extent / 2, extent / 2 / aspect) if aspect >= 1 else (extent / 2 * aspect, extent / 2)
    radius = max(half_x, half_y)
    cx = rng.uniform(radius, width - radius) if width > 2 * radius else width / 2
    cy = rng.uniform(radius, height - radius) if height > 2 * radius else height / 2
    rotation = rng.uniform(0.0, 2.0 * math.pi)

    # Rasterise only the shape's window (supersampled), in coordinates relative to its top-left pixel.
    window = _Window(cx, cy, radius, width, height)
    cx, cy, s, draw = window.cx, window.cy, _SUPERSAMPLING, window.draw
    if name == "rectangle":
        draw.rectangle([(cx - half_x) * s, (cy - half_y) * s, (cx + half_x) * s - 1, (cy + half_y) * s - 1],
                       fill=255)
    elif name == "ellipse":
        draw.ellipse([(cx - half_x) * s, (cy - half_y) * s, (cx + half_x) * s - 1, (cy + half_y) * s - 1], fill=255)
    else:
        if name == "triangle":
            angles = rotation + np.arange(3) * 2.0 * math.pi / 3.0
            unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        elif name == "star":
            angles = rotation + np.arange(10) * math.pi / 5.0
            radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
            unit = np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
        else:  # cross: a plus sign of arm half-thickness t, rotated
            t = rng.uniform(0.28, 0.4)
            corners = np.array([[t, 1], [t, t], [1, t], [1, -t], [t, -t], [t, -1], [-t, -1], [-t, -t], [-1, -t],
                                [-1, t], [-t, t], [-t, 1]], dtype=np.float64)
            c, si = math.cos(rotation), math.sin(rotation)
            unit = corners @ np.array([[c, si], [-si, c]])
        # Fit the rotated outline's bounding box to the half-extents, so that every class spans the same range.
        unit = unit / np.abs(unit).max(axis=0)
        points = np.stack([cx + unit[:, 0] * half_x, cy + unit[:, 1] * half_y], axis=1) * s
        draw.polygon([tuple(p) for p in points.tolist()], fill=255)
    return window.alpha()


def _clutter_alpha(rng: np.random.Generator, width: int, height: int, small: bool) -> np.ndarray:
    """(H, W) coverage in [0, 1] of a distractor mark: a ring, a thick line segment or an arc (none of the classes:
    rings and arcs have a hole, a segment is far longer than a rectangle's aspect range 0.5..2 allows), of an
    object's extent."""
    extent = _extent(rng, width, height, small)
    kind = int(rng.integers(3))
    radius = extent / 2
    cx = rng.uniform(radius, width - radius) if width > 2 * radius else width / 2
    cy = rng.uniform(radius, height - radius) if height > 2 * radius else height / 2
    # Stroke width: thin enough to leave a clear hole / an elongated line, at least ~1.5 px to survive the
    # box filter at the smallest extents.
    thickness = max(1.5, rng.uniform(0.1, 0.2) * extent)
    window = _Window(cx, cy, radius, width, height)
    cx, cy, s, draw = window.cx, window.cy, _SUPERSAMPLING, window.draw
    box = [(cx - radius) * s, (cy - radius) * s, (cx + radius) * s - 1, (cy + radius) * s - 1]
    stroke = max(1, round(thickness * s))
    if kind == 0:  # ring
        draw.ellipse(box, outline=255, width=stroke)
    elif kind == 1:  # thick segment through the centre
        angle = rng.uniform(0.0, math.pi)
        dx, dy = (radius - thickness / 2) * math.cos(angle), (radius - thickness / 2) * math.sin(angle)
        draw.line([((cx - dx) * s, (cy - dy) * s), ((cx + dx) * s, (cy + dy) * s)], fill=255, width=stroke)
    else:  # arc spanning 120..270 degrees
        start = rng.uniform(0.0, 360.0)
        draw.arc(box, start, start + rng.uniform(120.0, 270.0), fill=255, width=stroke)
    return window.alpha()


def _fill(rng: np.random.Generator, canvas: np.ndarray, alpha: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W, 3) colour of a shape: one of ``colours`` (N, 3) contrasting with the background under it, with
    shading."""
    under = (canvas * alpha[..., None]).sum((0, 1)) / max(alpha.sum(), 1e-9)
    for _ in range(10):
        # One candidate: no draw (as colour_by_class always did).
        base = colours[0] if len(colours) == 1 else colours[rng.integers(len(colours))]
        colour = np.clip(base + rng.uniform(-25.0, 25.0, size=3), 0, 255)
        if np.linalg.norm(colour - under) >= 90.0:
            break
    height, width = alpha.shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    shading = rng.uniform(0.0, 0.25) * ((x * math.cos(angle) + y * math.sin(angle)) / max(width, height) - 0.5)
    return np.clip(colour * (1.0 + shading[..., None]), 0, 255)
