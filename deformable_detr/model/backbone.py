"""ResNet backbone with frozen batch norm, returning the feature maps the transformer reads, with their masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from deformable_detr.config import RESNETS
from deformable_detr.model.position_encoding import PositionEmbeddingSine


def downsample_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(batch, H, W) bool -> (batch, h, w) bool by legacy nearest interpolation (src = floor(dst * in / out))."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class Backbone(nn.Module):
    """A torchvision ResNet whose stem and first stage are frozen, batch norm frozen everywhere.

    Multi-scale returns layer2..layer4 (strides 8, 16, 32); single-scale returns layer4 alone. ``dilation``
    replaces layer4's stride by a dilation (the DC5 variant: stride 16 at layer4).
    """

    def __init__(self, name: str = "resnet50", train_backbone: bool = True, multi_scale: bool = True,
                 dilation: bool = False) -> None:
        super().__init__()
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
        outputs = []
        for features in self.body(images).values():
            outputs.append((features, downsample_mask(mask, features.shape[-2:])))
        return outputs


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
