"""Detection transforms: each maps (image, target) to (image, target) and keeps the boxes on the image.

The behaviour (and the use of the random number generators) is that of the official ``datasets/transforms.py``:
Python's ``random`` draws the flip / select / size choices and the crop's size, torch's global generator the crop's
position. So a seeded run makes the same choices as the official code, and DataLoader workers, which seed both
generators per worker, get independent streams.

A target is a dict of tensors: ``boxes`` (n, 4) xyxy in pixels until :class:`Normalize`, which turns them into
cxcywh normalised by the image size; ``labels`` (n,), ``area`` (n,), ``iscrowd`` (n,), ``size`` (2,) = (h, w) of
the current image, plus fields that pass through untouched (``image_id``, ``orig_size``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import PIL.Image
import torch
import torchvision.transforms.functional as F
from torch import Tensor

from deformable_detr.box_ops import box_xyxy_to_cxcywh
from deformable_detr.config import (
    OFFICIAL_CROP_RESIZE_SIZES,
    OFFICIAL_CROP_SIZE,
    OFFICIAL_MAX_SIZE,
    OFFICIAL_TRAIN_SCALES,
    OFFICIAL_VAL_SIZE,
)

Target = dict[str, Tensor]
ImageLike = PIL.Image.Image | Tensor
Transform = Callable[[ImageLike, Target | None], tuple[ImageLike, Target | None]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-instance fields that a crop filters together with the boxes.
_INSTANCE_FIELDS = ("labels", "area", "iscrowd")


def image_size(image: ImageLike) -> tuple[int, int]:
    """(width, height) of a PIL image or a (..., H, W) tensor."""
    if isinstance(image, PIL.Image.Image):
        return image.size
    return int(image.shape[-1]), int(image.shape[-2])


# ------------------------------------------------------------------------------------------------- functional


def hflip(image: ImageLike, target: Target | None) -> tuple[ImageLike, Target | None]:
    """Mirror left-right; a box [x0, x1] becomes [w - x1, w - x0]."""
    flipped = F.hflip(image)
    if target is None:
        return flipped, None
    width, _ = image_size(image)
    target = target.copy()
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor(
            [width, 0, width, 0])
    return flipped, target


def crop(image: ImageLike, target: Target | None, region: tuple[int, int, int, int]
         ) -> tuple[ImageLike, Target | None]:
    """Crop ``region`` = (top, left, height, width). Boxes are shifted and clipped to the crop, their area is
    recomputed from the clipped box, and instances whose box became empty are dropped (with their labels, area,
    iscrowd)."""
    top, left, height, width = region
    cropped = F.crop(image, top, left, height, width)
    if target is None:
        return cropped, None
    target = target.copy()
    target["size"] = torch.tensor([height, width])
    if "boxes" in target:
        limit = torch.as_tensor([width, height], dtype=torch.float32)
        boxes = target["boxes"] - torch.as_tensor([left, top, left, top])
        boxes = torch.min(boxes.reshape(-1, 2, 2), limit).clamp(min=0)  # (n, 2 corners, xy)
        target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
        target["boxes"] = boxes.reshape(-1, 4)
        keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
        for field in (*_INSTANCE_FIELDS, "boxes"):
            if field in target:
                target[field] = target[field][keep]
    return cropped, target


class ImageSizeError(ValueError):
    """An image that a resize cannot handle: it has no pixels, or it is so elongated that its resized short side
    would be 0 pixels. The message gives the size and the limit; callers prefix the image's name."""


def get_size_with_aspect_ratio(size_wh: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) with the short side ``size``, the aspect ratio kept, and the long side capped at ``max_size``.

    The official arithmetic, which fixes the integer output: when the long side would exceed ``max_size`` the short
    side becomes ``round(max_size * short / long)`` (Python's round), and the long side is ``int(size * long /
    short)`` (truncated). E.g. 640x480 -> (800, 1066); 1000x400 -> (533, 1332).

    Raises :class:`ImageSizeError` for an empty image (a side of 0) and for one whose long side is at least
    ``2 * max_size`` times its short side (e.g. 4000x1 for max_size 1333): its short side would round to 0 pixels,
    where the official code fails inside the resampling.
    """
    width, height = size_wh
    if width < 1 or height < 1:
        raise ImageSizeError(f"the image is {width}x{height} pixels: an empty image cannot be resized")
    short_size = size
    if max_size is not None:
        min_original = float(min(width, height))
        max_original = float(max(width, height))
        if max_original / min_original * size > max_size:
            size = int(round(max_size * min_original / max_original))
            if size < 1:
                raise ImageSizeError(
                    f"the image is {width}x{height} pixels, too elongated for the resize (short side {short_size}, "
                    f"long side at most {max_size}): its short side would become 0 pixels; the long side must be "
                    f"less than {2 * max_size} times the short side")
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(image: ImageLike, target: Target | None, size: int | Sequence[int], max_size: int | None = None
           ) -> tuple[ImageLike, Target | None]:
    """Resize to short side ``size`` (capped by ``max_size``, see :func:`get_size_with_aspect_ratio`) or to the
    exact ``size`` = (w, h) when a pair is given (:class:`ImageSizeError` for an empty input or output). A PIL
    image is resampled by PIL (bilinear, as the official), a (..., H, W) tensor by torchvision (bilinear,
    antialiased).
    Boxes scale by (ratio_w, ratio_h) and areas by ratio_w * ratio_h, the ratios being those of the integer output
    size to the input size."""
    if isinstance(size, Sequence):
        output_hw = (int(size[1]), int(size[0]))
        if min(image_size(image)) < 1 or min(output_hw) < 1:
            raise ImageSizeError(f"cannot resize a {'x'.join(map(str, image_size(image)))} image to "
                                 f"{output_hw[1]}x{output_hw[0]} pixels: both need at least 1 pixel per side")
    else:
        output_hw = get_size_with_aspect_ratio(image_size(image), size, max_size)
    # antialias: PIL always filters; for tensors it makes a downscale average the pixels as PIL's does, rather than
    # sample them (torchvision's default for tensors is the same, stated here so that it cannot drift).
    resized = F.resize(image, list(output_hw), antialias=True)
    if target is None:
        return resized, None
    (new_width, new_height), (old_width, old_height) = image_size(resized), image_size(image)
    ratio_width, ratio_height = float(new_width) / float(old_width), float(new_height) / float(old_height)
    target = target.copy()
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_width, ratio_height, ratio_width, ratio_height])
    if "area" in target:
        target["area"] = target["area"] * (ratio_width * ratio_height)
    target["size"] = torch.tensor(list(output_hw))
    return resized, target


# ---------------------------------------------------------------------------------------------------- classes


class Compose:
    """Applies ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: ImageLike, target: Target | None = None) -> tuple[ImageLike, Target | None]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}".replace("\n", "\n    ") for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomHorizontalFlip:
    """Flips with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: ImageLike, target: Target | None = None) -> tuple[ImageLike, Target | None]:
        if random.random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomResize:
    """Resizes the short side to a size drawn uniformly from ``sizes``, the long side capped at ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if isinstance(sizes, int) or not sizes or any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes must be a non-empty sequence of positive ints, got {sizes!r}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be positive or None, got {max_size}")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target | None = None) -> tuple[ImageLike, Target | None]:
        return resize(image, target, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crops a region of random width in [min_size, min(W, max_size)] and height in [min_size, min(H, max_size)]
    at a random position."""

    def __init__(self, min_size: int, max_size: int) -> None:
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target | None = None) -> tuple[ImageLike, Target | None]:
        width, height = image_size(image)
        # The official code fails (empty randint range) on a side shorter than min_size; we crop that side whole
        # instead, which leaves every case the official code handles unchanged.
        crop_width = random.randint(min(self.min_size, width), min(width, self.max_size))
        crop_height = random.randint(min(self.min_size, height), min(height, self.max_size))
        return crop(image, target, self._position(width, height, crop_width, crop_height))

    @staticmethod
    def _position(width: int, height: int, crop_width: int, crop_height: int) -> tuple[int, int, int, int]:
        """(top, left, h, w), drawn from torch's generator exactly as torchvision's RandomCrop.get_params."""
        if width == crop_width and height == crop_height:
            return 0, 0, height, width
        top = int(torch.randint(0, height - crop_height + 1, size=(1,)).item())
        left = int(torch.randint(0, width - crop_width + 1, size=(1,)).item())
        return top, left, crop_height, crop_width

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Applies ``first`` with probability ``p``, else ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: ImageLike, target: Target | None = None) -> tuple[ImageLike, Target | None]:
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p},\n  {self.first!r},\n  {self.second!r})".replace("\n", "\n  ")


class ToTensor:
    """PIL image -> (3, H, W) float32 in [0, 1]; the target passes through."""

    def __call__(self, image: ImageLike, target: Target | None = None) -> tuple[Tensor, Target | None]:
        return F.to_tensor(image), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """(x - mean) / std per channel, and boxes xyxy pixels -> cxcywh in [0, 1] (divided by the image's w, h)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}")
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Tensor, target: Target | None = None) -> tuple[Tensor, Target | None]:
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = target.copy()
        height, width = image.shape[-2:]
        if "boxes" in target:
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([width, height, width, height],
                                                                                  dtype=torch.float32)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


# ------------------------------------------------------------------------------------------------- pipelines


class EvalTransform(Compose):
    """The evaluation transform, for datasets and for inference: short side to ``val_size`` with the long side at
    most ``max_size`` (:func:`get_size_with_aspect_ratio`), to a float tensor, ImageNet normalisation.

    Call it as ``(image, target) -> (image, target)``:

    * a PIL image: exactly the official ``make_coco_transforms('val')`` (PIL bilinear resize, ToTensor, Normalize),
      stage by stage: :attr:`transforms` = [RandomResize([val_size], max_size), ToTensor, Normalize]. The resize
      stays a one-size RandomResize as officially, because it draws from Python's ``random`` even with one size; a
      seeded run that evaluates in the main process then leaves the training draws as the official code does.
    * a float tensor (3, H, W) in [0, 1] (RGB, not normalised): the same output size, resized by torchvision
      (bilinear, antialiased: close to PIL's filter, not bitwise equal), then Normalize.

    Returns (3, h, w) float32 normalised, and the target resized and normalised as every transform does (None
    stays None).
    """

    def __init__(self, val_size: int = OFFICIAL_VAL_SIZE, max_size: int = OFFICIAL_MAX_SIZE, *,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if val_size < 1 or max_size < 1:
            raise ValueError(f"val_size and max_size must be positive, got val_size={val_size}, max_size={max_size}")
        self.val_size = val_size
        self.max_size = max_size
        self.resize = RandomResize([val_size], max_size=max_size)
        self.normalize = Normalize(mean, std)
        super().__init__([self.resize, ToTensor(), self.normalize])

    def __call__(self, image: ImageLike, target: Target | None = None) -> tuple[Tensor, Target | None]:
        if isinstance(image, PIL.Image.Image):
            return super().__call__(image, target)
        if not isinstance(image, Tensor):
            raise TypeError(f"EvalTransform: expected a PIL image or a float (3, H, W) tensor, got "
                            f"{type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"EvalTransform: tensors must be float (3, H, W) RGB in [0, 1], got {image.dtype} "
                             f"{tuple(image.shape)}")
        image, target = self.resize(image, target)
        return self.normalize(image, target)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(val_size={self.val_size}, max_size={self.max_size}, "
                f"mean={self.normalize.mean}, std={self.normalize.std})")


def make_coco_transforms(image_set: str, *, scales: Sequence[int] = OFFICIAL_TRAIN_SCALES,
                         max_size: int = OFFICIAL_MAX_SIZE,
                         crop_resize_sizes: Sequence[int] = OFFICIAL_CROP_RESIZE_SIZES,
                         crop_size: tuple[int, int] = OFFICIAL_CROP_SIZE, val_size: int = OFFICIAL_VAL_SIZE,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Compose:
    """The official augmentation (defaults = the official values), with its sizes as parameters.

    train: flip (p 0.5), then with p 0.5 either resize the short side to one of ``scales`` (long side <=
    ``max_size``), or resize to one of ``crop_resize_sizes`` (no cap), crop a random ``crop_size`` = (min, max)
    region, and resize to one of ``scales``; then ToTensor and Normalize.
    val: :class:`EvalTransform` (resize the short side to ``val_size``, long side <= ``max_size``, ToTensor,
    Normalize).
    """
    normalize = Compose([ToTensor(), Normalize(mean, std)])
    if image_set == "train":
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size=max_size),
                Compose([
                    RandomResize(crop_resize_sizes),
                    RandomSizeCrop(*crop_size),
                    RandomResize(scales, max_size=max_size),
                ]),
            ),
            normalize,
        ])
    if image_set == "val":
        return EvalTransform(val_size, max_size, mean=mean, std=std)
    raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
