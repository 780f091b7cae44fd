"""Batching images of different sizes: zero padding at the bottom and right, and a mask of the padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deformable_detr.data.transforms import Target


def batch_images(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pads (C, H_i, W_i) images into one batch, as the official ``nested_tensor_from_tensor_list``.

    Returns images (B, C, max H_i, max W_i), zero on padding (image i in the top-left corner), and mask
    (B, max H_i, max W_i) bool, True on padding.
    """
    if len(images) == 0:
        raise ValueError("batch_images: no images")
    if any(image.dim() != 3 for image in images):
        raise ValueError(f"batch_images: expected (C, H, W) images, got shapes {[tuple(i.shape) for i in images]}")
    channels = {image.shape[0] for image in images}
    if len(channels) != 1:
        raise ValueError(f"batch_images: images have different channel counts {sorted(channels)}")
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    first = images[0]
    batch = torch.zeros((len(images), first.shape[0], height, width), dtype=first.dtype, device=first.device)
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for padded, padding, image in zip(batch, mask, images):
        padded[:, :image.shape[1], :image.shape[2]].copy_(image)
        padding[:image.shape[1], :image.shape[2]] = False
    return batch, mask


def collate_fn(batch: Sequence[tuple[Tensor, Target]]) -> tuple[Tensor, Tensor, list[Target]]:
    """DataLoader collate for (image, target) items: (images (B, 3, H, W), mask (B, H, W) True on padding,
    list of the B targets)."""
    images, targets = zip(*batch)
    padded, mask = batch_images(images)
    return padded, mask, list(targets)
