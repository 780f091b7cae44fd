"""ResNet backbone with frozen batch norm, returning the feature maps the transformer reads, with their masks."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from deformable_detr.config import RESNETS
from deformable_detr.model.position_encoding import PositionEmbeddingSine


def _nearest_source_index(in_size: int, out_size: int, device: torch.device) -> Tensor:
    """(out_size,) int64: min(floor(dst * scale), in_size - 1) with scale = in_size / out_size in float32, the
    source index of ``F.interpolate``'s legacy nearest mode (ATen's ``nearest_neighbor_compute_source_index``)."""
    scale = (torch.scalar_tensor(in_size, dtype=torch.float32, device=device)
             / torch.scalar_tensor(out_size, dtype=torch.float32, device=device))
    return (torch.arange(out_size, dtype=torch.float32, device=device) * scale).floor().long().clamp(max=in_size - 1)


def downsample_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(batch, H, W) bool -> (batch, h, w) bool by legacy nearest interpolation (src = floor(dst * in / out)).

    The indices are computed as tensors, not by ``F.interpolate``: the same pixels (tested), and an ONNX graph of a
    dynamic size computes them in the same float32 arithmetic. Its Resize divides by out / in instead and lands a
    row short where dst * in / out is a whole number (row 89 of 120 for row 3 of 4: 3 / float32(4 / 120) = 89.99999).
    """
    rows = _nearest_source_index(mask.shape[1], size[0], mask.device)
    cols = _nearest_source_index(mask.shape[2], size[1], mask.device)
    return mask[:, rows[:, None], cols[None, :]]


class Backbone(nn.Module):
    """A torchvision ResNet whose stem and first stage are frozen, batch norm frozen everywhere.

    Multi-scale returns layer2..layer4 (strides 8, 16, 32); single-scale returns layer4 alone. ``dilation``
    replaces layer4's stride by a dilation (the DC5 variant: stride 16 at layer4). ``checkpoint_blocks``: in training
    with gradients on, the activations of each residual block of a trained stage are recomputed in the backward
    instead of kept (the frozen stem and layer1 keep none anyway).
    """

    def __init__(self, name: str = "resnet50", train_backbone: bool = True, multi_scale: bool = True,
                 dilation: bool = False, checkpoint_blocks: bool = False) -> None:
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks
        if name not in RESNETS:
            raise ValueError(f"backbone must be one of {RESNETS}, got {name!r}")
        self.name = name
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d
        )
        for param_name, parameter in resnet.named_parameters():
            # The stem and layer1 stay at their ImageNet values, as in the official recipe.
            if not train_backbone or not any(layer in param_name for layer in ("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)
        last_channels = 2048 if name in ("resnet50", "resnet101") else 512
        if multi_scale:
            return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
            self.strides = [8, 16, 32]
            self.num_channels = [last_channels // 4, last_channels // 2, last_channels]
        else:
            return_layers = {"layer4": "0"}
            self.strides = [32]
            self.num_channels = [last_channels]
        if dilation:
            self.strides[-1] //= 2
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """images: (batch, 3, H, W), mask: (batch, H, W) True on padding -> [(features (batch, C_l, H_l, W_l),
        mask (batch, H_l, W_l))] per returned stage."""
        if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
            maps = self._checkpointed_body(images)
        else:
            maps = list(self.body(images).values())
        return [(features, downsample_mask(mask, features.shape[-2:])) for features in maps]

    def _checkpointed_body(self, images: Tensor) -> list[Tensor]:
        """``self.body``'s feature maps, each residual block of a stage with trained parameters checkpointed."""
        maps, x = [], images
        for name, module in self.body.items():
            if isinstance(module, nn.Sequential) and any(p.requires_grad for p in module.parameters()):
                for block in module:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = module(x)
            if name in self.body.return_layers:
                maps.append(x)
        return maps


class Joiner(nn.Sequential):
    """Backbone followed by the position encoding of each returned map.

    An ``nn.Sequential`` only so that parameter names are ``backbone.0.body.*`` as in official checkpoints.
    """

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
        """Returns the backbone's [(features, mask)] and the matching position encodings
        [(batch, hidden_dim, H_l, W_l)] in the dtype of the features."""
        features = self[0](images, mask)
        positions = [self[1](level_mask).to(level_features.dtype) for level_features, level_mask in features]
        return features, positions
