"""The Deformable DETR detector: backbone, input projections, deformable transformer, class and box heads."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformable_detr.model.backbone import Joiner, downsample_mask
from deformable_detr.model.transformer import DeformableTransformer, inverse_sigmoid


class MLP(nn.Module):
    """Feed-forward network: ``num_layers`` linear layers with ReLU in between (the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


def make_prediction_heads(hidden_dim: int, num_classes: int, num_heads: int, share: bool, two_stage: bool = False
                          ) -> tuple[nn.ModuleList, nn.ModuleList]:
    """One class head (linear) and one box head (3-layer MLP) per decoder layer (+1 for two-stage proposals).

    ``share=True`` (no box refinement) repeats ONE head in the list, as the official code does: one set of
    weights, listed once per layer in the state_dict. Otherwise the heads are independent copies of one
    initialisation.

    Initialisation: class bias at the focal-loss prior -log((1 - 0.01) / 0.01) (Lin et al. 2017, sec. 4.1),
    last box layer zero so that the first boxes sit on the reference points, its (w, h) bias at -2 (sigmoid 0.12)
    for the first head only when the heads are independent; two-stage sets that bias back to 0 in every head,
    since its references are already boxes.
    """
    class_embed = nn.Linear(hidden_dim, num_classes)
    bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
    prior_prob = 0.01
    nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
    nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
    nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
    if share:
        nn.init.constant_(bbox_embed.layers[-1].bias[2:], 0.0 if two_stage else -2.0)
        return nn.ModuleList([class_embed] * num_heads), nn.ModuleList([bbox_embed] * num_heads)
    class_heads = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_heads))
    bbox_heads = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_heads))
    if not two_stage:
        nn.init.constant_(bbox_heads[0].layers[-1].bias[2:], -2.0)
    return class_heads, bbox_heads


def feature_map_shapes(height: int, width: int, strides: list[int], num_feature_levels: int) -> list[tuple[int, int]]:
    """(H_l, W_l) of every feature level for a (padded) input of ``height`` x ``width``: ``ceil(side / stride)`` for
    the backbone's maps (each stride-2 layer of the ResNet pads and rounds up), then the extra levels halve the
    last one the same way."""
    strides = list(strides) + [strides[-1] * 2 ** k for k in range(1, num_feature_levels - len(strides) + 1)]
    return [(-(-height // stride), -(-width // stride)) for stride in strides]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also normalises a group holding a single value (a 1 x 1 map with one channel per group,
    e.g. ``hidden_dim`` 32 in 32 groups, in a batch of one image).

    ``F.group_norm`` refuses that case ("Expected more than 1 value per channel when training", in eval mode too): a
    check made for batch norm, where one value per channel has no batch statistics. Group norm's statistics are per
    image, and one value is normalised as in every other case: x - mean = 0, so the output is the group's bias (up
    to rounding). The same image in a batch of two passes the check and gives exactly that. The kernel is the one
    ``F.group_norm`` calls, so every other input gives bitwise the same output (the state_dict is
    ``nn.GroupNorm``'s, so checkpoints are unchanged).
    """

    def forward(self, input: Tensor) -> Tensor:
        """input: (batch, channels, H, W) -> the same shape."""
        return torch.group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                                torch.backends.cudnn.enabled)


@dataclass
class DetectorOutput:
    """pred_logits: (batch, Q, num_classes) class logits (sigmoid, no "no-object" class); pred_boxes: (batch, Q, 4)
    normalised (cx, cy, w, h); aux_outputs: the same for decoder layers 1..L-1; enc_outputs (two-stage): the
    encoder proposals, (batch, S, num_classes) and (batch, S, 4)."""

    pred_logits: Tensor
    pred_boxes: Tensor
    aux_outputs: list[dict[str, Tensor]] = field(default_factory=list)
    enc_outputs: dict[str, Tensor] | None = None

    def __getitem__(self, key: str):
        """Dict-style access (``outputs["pred_logits"]``), as in the official code."""
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        keys = ["pred_logits", "pred_boxes"]
        if self.aux_outputs:
            keys.append("aux_outputs")
        if self.enc_outputs is not None:
            keys.append("enc_outputs")
        return keys


def check_images_and_mask(images: Tensor, mask: Tensor | None) -> Tensor:
    """The detectors' input check: images (batch, 3, H, W) floating point, mask (batch, H, W) bool (True on
    padding) or None for no padding; returns the mask."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (batch, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a normalised floating-point tensor, got {images.dtype}")
    if mask is None:
        return torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
    if mask.shape != (images.shape[0], *images.shape[2:]) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {(images.shape[0], *images.shape[2:])} (batch, H, W), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return mask


class DeformableDETR(nn.Module):
    """Deformable DETR (Zhu et al. 2020).

    The heads are built by :func:`make_prediction_heads` and handed both to this module and (box refinement,
    two-stage) to the transformer's decoder, which is how the official checkpoints come to list them twice.
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, class_embed: nn.ModuleList,
                 bbox_embed: nn.ModuleList, num_queries: int = 300, num_feature_levels: int = 4,
                 aux_loss: bool = True, with_box_refine: bool = False, two_stage: bool = False) -> None:
        super().__init__()
        hidden_dim = transformer.d_model
        num_decoder_layers = transformer.decoder.num_layers
        expected_heads = num_decoder_layers + (1 if two_stage else 0)
        if len(class_embed) != expected_heads or len(bbox_embed) != expected_heads:
            raise ValueError(
                f"expected {expected_heads} class and box heads, got {len(class_embed)} and {len(bbox_embed)}"
            )
        if two_stage != transformer.two_stage:
            raise ValueError(f"two_stage={two_stage} but the transformer has two_stage={transformer.two_stage}")
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        # Registration order = the official state_dict order.
        self.transformer = transformer
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        num_backbone_levels = len(backbone.strides)
        if num_feature_levels < num_backbone_levels:
            raise ValueError(
                f"num_feature_levels ({num_feature_levels}) < the backbone's {num_backbone_levels} returned maps"
            )
        projections = [
            nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=1), GroupNorm(32, hidden_dim))
            for channels in backbone.num_channels
        ]
        # Extra levels: stride-2 3x3 convolutions on top of the last backbone map.
        in_channels = backbone.num_channels[-1]
        for _ in range(num_feature_levels - num_backbone_levels):
            projections.append(nn.Sequential(
                nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1), GroupNorm(32, hidden_dim)
            ))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        self.backbone = backbone
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.constant_(projection[0].bias, 0)

    def input_size_problem(self, height: int, width: int) -> str | None:
        """Why the model cannot run a (padded) input of ``height`` x ``width`` pixels, or None when it can.

        Two-stage takes its ``num_queries`` queries from the encoder's top-scoring feature-map positions (one
        proposal each), so its feature maps need at least that many positions. Any size runs otherwise, down to
        1 x 1 feature maps (see :class:`GroupNorm`).
        """
        return self._positions_problem(feature_map_shapes(height, width, self.backbone.strides,
                                                          self.num_feature_levels))

    def _positions_problem(self, shapes: list[tuple[int, int]]) -> str | None:
        if not self.two_stage:
            return None
        needed = self.transformer.two_stage_num_proposals
        positions = sum(h * w for h, w in shapes)
        if positions >= needed:
            return None
        side = 1
        while sum(h * w for h, w in feature_map_shapes(side, side, self.backbone.strides,
                                                         self.num_feature_levels)) < needed:
            side += 1
        levels = ", ".join(f"{h}x{w}" for h, w in shapes)
        return (f"its feature maps ({levels}) have {positions} positions, fewer than the {needed} queries this "
                f"two-stage model selects among them; a square input needs at least {side}x{side} pixels")

    def forward(self, images: Tensor, mask: Tensor | None = None) -> DetectorOutput:
        """
        Args:
            images: (batch, 3, H, W) normalised images, zero-padded to a common size.
            mask: (batch, H, W) bool, True on padding; None means no padding.
        """
        mask = check_images_and_mask(images, mask)
        features, pos = self.backbone(images, mask)
        srcs = [projection(level_features) for projection, (level_features, _) in zip(self.input_proj, features)]
        masks = [level_mask for _, level_mask in features]
        for level in range(len(features), self.num_feature_levels):
            source = features[-1][0] if level == len(features) else srcs[-1]
            src = self.input_proj[level](source)
            level_mask = downsample_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](level_mask).to(src.dtype))
        # Two-stage only, and no int(): under torch.export with a dynamic size the shapes are symbolic, and the check
        # holds for every size from the export's minimum up (an int() would fix the size).
        problem = self.two_stage and self._positions_problem([(src.shape[2], src.shape[3]) for src in srcs])
        if problem:
            raise ValueError(f"an input of {images.shape[2]}x{images.shape[3]} pixels (height x width) is too small: "
                             f"{problem}")

        query_embed = None if self.two_stage else self.query_embed.weight
        result = self.transformer(srcs, masks, pos, query_embed)

        outputs_classes, outputs_coords = [], []
        for layer in range(result.hs.shape[0]):
            reference = result.init_reference if layer == 0 else result.inter_references[layer - 1]
            reference = inverse_sigmoid(reference)
            outputs_classes.append(self.class_embed[layer](result.hs[layer]))
            delta = self.bbox_embed[layer](result.hs[layer])
            if reference.shape[-1] == 4:
                coord_unact = delta + reference
            else:
                coord_unact = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            outputs_coords.append(coord_unact.sigmoid())

        aux_outputs = []
        if self.aux_loss:
            aux_outputs = [{"pred_logits": logits, "pred_boxes": boxes}
                           for logits, boxes in zip(outputs_classes[:-1], outputs_coords[:-1])]
        enc_outputs = None
        if self.two_stage:
            enc_outputs = {"pred_logits": result.enc_outputs_class,
                           "pred_boxes": result.enc_outputs_coord_unact.sigmoid()}
        return DetectorOutput(outputs_classes[-1], outputs_coords[-1], aux_outputs, enc_outputs)
