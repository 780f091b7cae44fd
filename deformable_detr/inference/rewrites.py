"""Inference-only rewrites of a trained detector, each returning an optimised copy with the same outputs.

* :func:`fold_frozen_batchnorm`: the backbone's frozen batch norms are per-channel affine maps, y = x * s + t with
  s = gamma / sqrt(var + eps) and t = beta - mean * s; after a convolution they fold into its weights (W * s) and
  bias (b * s + t), which removes one full pass over every backbone activation.
* :func:`optimize_for_inference`: folding, eval mode, in-place ReLUs (the activations read only fresh linear
  outputs, so nothing else sees them change), and channels-last memory for the convolutions (oneDNN's faster layout
  on CPUs; measured on a 2-core AVX2 machine at 800 x 1066: backbone 1.38 s -> 1.01 s, the whole model about 4%).

The copies are for inference only: their state_dict no longer has the ``bn*`` buffers, so never save or train
them; keep the original for that.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def _fold_into(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> None:
    """conv <- norm(conv(.)), computed in float64 and stored in the convolution's dtype."""
    if conv.out_channels != norm.weight.shape[0]:
        raise ValueError(f"cannot fold a batch norm of {norm.weight.shape[0]} channels into a convolution with "
                         f"{conv.out_channels} outputs")
    with torch.no_grad():
        scale = norm.weight.double() * (norm.running_var.double() + norm.eps).rsqrt()
        shift = norm.bias.double() - norm.running_mean.double() * scale
        bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        conv.weight.copy_(weight.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))


def fold_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every ``FrozenBatchNorm2d`` that follows a ``Conv2d`` is folded into it and
    replaced by ``nn.Identity``.

    Pairs are found the way torchvision's ResNet calls them: ``convN`` then ``bnN`` in a block (and ``conv1``/``bn1``
    of the stem), and a convolution followed by a batch norm inside an ``nn.Sequential`` (the downsample branches).
    A frozen batch norm left over (one that follows no convolution) is an error, so that a model whose structure
    this does not know is not silently half-folded.
    """
    folded = copy.deepcopy(model)
    for module in folded.modules():
        children = dict(module.named_children())
        pairs: list[tuple[str, str]] = []
        if isinstance(module, nn.Sequential):
            names = list(children)
            pairs += [(a, b) for a, b in zip(names, names[1:])
                      if isinstance(children[a], nn.Conv2d) and isinstance(children[b], FrozenBatchNorm2d)]
        pairs += [(f"conv{name[2:]}", name) for name, child in children.items()
                  if isinstance(child, FrozenBatchNorm2d) and name.startswith("bn")
                  and isinstance(children.get(f"conv{name[2:]}"), nn.Conv2d)]
        for conv_name, norm_name in pairs:
            _fold_into(children[conv_name], children[norm_name])
            setattr(module, norm_name, nn.Identity())
    left = [name for name, module in folded.named_modules() if isinstance(module, FrozenBatchNorm2d)]
    if left:
        raise ValueError(f"fold_frozen_batchnorm: {len(left)} FrozenBatchNorm2d follow no convolution it knows how "
                         f"to fold into: {left[:5]}")
    return folded


def optimize_for_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` without gradients, its frozen batch norms folded, its ReLUs in place, and
    (``channels_last``) its backbone and input projections in channels-last memory (feed it channels-last images to
    save the layout conversion at the first convolution; any layout gives the same result)."""
    optimised = fold_frozen_batchnorm(model).eval()
    for module in optimised.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    if channels_last:
        optimised.backbone.to(memory_format=torch.channels_last)
        optimised.input_proj.to(memory_format=torch.channels_last)
    for parameter in optimised.parameters():
        parameter.requires_grad_(False)
    return optimised
