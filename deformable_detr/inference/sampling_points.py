"""Where the decoder looks: the last decoder layer's deformable sampling points of a query, drawn over the image
coloured by attention weight (the paper's figure 6).

:class:`SamplingPointRecorder` hooks the last decoder layer's cross-attention and recomputes the sampling locations
and attention weights from its inputs with :meth:`MSDeformAttn.sampling_locations_and_weights`, the same method its
forward uses, so the picture shows exactly what the model sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from deformable_detr.inference.drawing import enlarge_for_drawing, label_colour
from deformable_detr.model.ms_deform_attn import MSDeformAttn


@dataclass
class SamplingPoints:
    """Every query's last-layer samples of one image, in original-image pixels.

    locations: (Q, num_heads, num_levels, num_points, 2) (x, y); weights: (Q, num_heads, num_levels, num_points),
    summing to 1 over levels and points of each head; reference_points: (Q, 2) (x, y); boxes: (Q, 4) xyxy, the
    query's predicted box; scores, labels: (Q,), its best class probability and label.
    """

    locations: Tensor
    weights: Tensor
    reference_points: Tensor
    boxes: Tensor
    scores: Tensor
    labels: Tensor


@dataclass
class _Record:
    locations: Tensor  # (batch, Q, heads, levels, points, 2), normalised to each level's padded map
    weights: Tensor  # (batch, Q, heads, levels, points)
    reference_points: Tensor  # (batch, Q, levels, 2 or 4), normalised to each level's padded map
    spatial_shapes: list[tuple[int, int]]


def last_cross_attention(model: nn.Module) -> MSDeformAttn:
    """The last decoder layer's deformable cross-attention of a DeformableDETR."""
    try:
        module = model.transformer.decoder.layers[-1].cross_attn
    except (AttributeError, IndexError) as error:
        raise ValueError(f"expected a DeformableDETR with decoder layers, got {type(model).__name__}") from error
    if not isinstance(module, MSDeformAttn):
        raise ValueError(f"the last decoder layer's cross_attn is a {type(module).__name__}, not MSDeformAttn")
    return module


class SamplingPointRecorder:
    """Context manager recording, for every forward pass of ``model``, the last decoder layer's sampling locations,
    attention weights and reference points (on the CPU, float32)."""

    def __init__(self, model: nn.Module) -> None:
        self.module = last_cross_attention(model)
        self.records: list[_Record] = []
        self._handle = None

    def _hook(self, module: MSDeformAttn, args: tuple, output: Tensor) -> None:
        # The decoder calls cross_attn(query, reference_points, input_flatten, spatial_shapes, ...) positionally.
        query, reference_points, _, spatial_shapes = args[:4]
        locations, weights = module.sampling_locations_and_weights(query, reference_points, spatial_shapes)
        self.records.append(_Record(locations.float().cpu(), weights.float().cpu(), reference_points.float().cpu(),
                                    list(spatial_shapes)))

    def __enter__(self) -> SamplingPointRecorder:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def pop(self) -> _Record:
        """The record of the last forward pass (removed from the list)."""
        if not self.records:
            raise RuntimeError("no forward pass was recorded (did the model run inside the recorder?)")
        return self.records.pop()


def to_image_pixels(record: _Record, index: int, padded_hw: tuple[int, int], resized_hw: tuple[int, int],
                    original_hw: tuple[int, int], boxes: Tensor, probabilities: Tensor) -> SamplingPoints:
    """Image ``index`` of a recorded batch in original-image pixels.

    The model normalises every level's map to [0, 1] over the padded input (its reference points are the valid
    part's coordinates times the valid ratio), so a location x is at x * padded width of the resized input on every
    level; padding is at the bottom and right, so it shifts nothing; then original / resized size scales it back.
    ``boxes``: (Q, 4) xyxy original pixels; ``probabilities``: (Q, C) class probabilities.
    """
    # (2,) original pixels per normalised unit, (x, y)
    extent = torch.tensor([padded_hw[1] * original_hw[1] / resized_hw[1],
                           padded_hw[0] * original_hw[0] / resized_hw[0]])
    locations = record.locations[index] * extent
    reference = record.reference_points[index, :, 0, :2] * extent
    scores, labels = probabilities.max(-1)
    return SamplingPoints(locations, record.weights[index], reference, boxes, scores, labels)


def draw_sampling_points(image: Image.Image, points: SamplingPoints, query: int,
                         names: dict[int, str] | None = None, colormap: str = "jet",
                         min_side: int = 512) -> Image.Image:
    """A copy of ``image`` with ``query``'s predicted box, its reference point (white cross) and its
    num_heads x num_levels x num_points sampling points, each a dot coloured by its attention weight (colour bar at
    the bottom, from 0 to the largest weight). Images whose longer side is under ``min_side`` are enlarged by an
    integer factor first (:func:`enlarge_for_drawing`), so that the dots stay apart."""
    # Only this picture needs matplotlib (its colour maps): predicting without pictures does not import it.
    import matplotlib

    num_queries = points.locations.shape[0]
    if not 0 <= query < num_queries:
        raise ValueError(f"query must be in [0, {num_queries}), got {query}")
    canvas, zoom = enlarge_for_drawing(image, min_side)
    draw = ImageDraw.Draw(canvas)
    size = max(canvas.size)
    font = ImageFont.load_default(size=max(10, round(size / 50)))
    cmap = matplotlib.colormaps[colormap]
    label = int(points.labels[query])
    x0, y0, x1, y1 = (float(v) * zoom for v in points.boxes[query])
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0), width=max(2, size // 300) + 2)
    draw.rectangle([x0, y0, x1, y1], outline=label_colour(label), width=max(2, size // 300))

    locations = points.locations[query].reshape(-1, 2) * zoom
    weights = points.weights[query].reshape(-1)
    top = float(weights.max()) or 1.0
    radius = max(2.0, size / 180)
    # Weakest first, so that the strongest samples are drawn on top.
    for i in torch.argsort(weights).tolist():
        x, y = (float(v) for v in locations[i])
        r, g, b, _ = cmap(float(weights[i]) / top)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(int(r * 255), int(g * 255), int(b * 255)),
                     outline=(0, 0, 0))
    cx, cy = (float(v) * zoom for v in points.reference_points[query])
    arm = 2.5 * radius
    for width, colour in ((5, (0, 0, 0)), (2, (255, 255, 255))):
        draw.line([cx - arm, cy - arm, cx + arm, cy + arm], fill=colour, width=width)
        draw.line([cx - arm, cy + arm, cx + arm, cy - arm], fill=colour, width=width)

    name = names.get(label, str(label)) if names else str(label)
    heads, levels, samples = points.locations.shape[1:4]
    captions = [f"query {query}: {name} {float(points.scores[query]):.2f}",
                f"{heads} heads x {levels} levels x {samples} points",
                f"colour = attention weight, 0 .. {top:.3f}:"]
    left, top_px, _, bottom = draw.textbbox((0, 0), "Ag", font=font)
    line_height = bottom - top_px + 4
    bar_height = line_height
    framed = Image.new("RGB", (canvas.width, canvas.height + len(captions) * line_height + bar_height + 4),
                       (255, 255, 255))
    framed.paste(canvas, (0, 0))
    frame = ImageDraw.Draw(framed)
    for row, caption in enumerate(captions):
        frame.text((3 - left, canvas.height + 2 + row * line_height - top_px), caption, fill=(0, 0, 0), font=font)
    bar_y = canvas.height + len(captions) * line_height + 2
    for x in range(canvas.width):
        r, g, b, _ = cmap(x / max(canvas.width - 1, 1))
        frame.line([x, bar_y + 2, x, bar_y + bar_height - 2], fill=(int(r * 255), int(g * 255), int(b * 255)))
    return framed
