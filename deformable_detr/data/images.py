"""Image files to RGB PIL images: decoding, bit depths and palettes, and the EXIF orientation of phone photos.

Inference (``Detector``, ``ddetr predict``) reads images through here and therefore needs neither pycocotools nor
the dataset code.

EXIF orientation. Cameras and phones often store a portrait photo as landscape pixels plus an EXIF ``Orientation``
tag (values 1..8, TIFF/EXIF 2.3 tag 0x0112) that tells viewers how to turn it upright. ``PIL.Image.open`` returns
the stored pixels and ignores the tag, and so does the official Deformable DETR loader
(``Image.open(path).convert('RGB')`` in ``datasets/torchvision_datasets/coco.py``): a sideways-stored photo is
detected sideways. :func:`load_rgb_image` applies the tag by default (the transpositions of
``PIL.ImageOps.exif_transpose``), so a photo is processed as a person sees it. :func:`read_rgb_image` returns the
stored pixels with the tag, for callers that must decide: the COCO dataset does, from the annotation file's image
sizes (see :class:`deformable_detr.data.coco.CocoDetection`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

EXIF_ORIENTATION_TAG = 0x0112
# Orientation -> the transposition that makes the stored pixels upright: the table of PIL.ImageOps.exif_transpose
# (EXIF 2.3, tag 0x0112). Applied to the RGB pixels here rather than through exif_transpose, which reads the tag from
# the image's EXIF block, which the mode conversions of to_rgb do not always carry over.
UPRIGHT_TRANSPOSITIONS = {
    2: PIL.Image.Transpose.FLIP_LEFT_RIGHT,
    3: PIL.Image.Transpose.ROTATE_180,
    4: PIL.Image.Transpose.FLIP_TOP_BOTTOM,
    5: PIL.Image.Transpose.TRANSPOSE,
    6: PIL.Image.Transpose.ROTATE_270,
    7: PIL.Image.Transpose.TRANSVERSE,
    8: PIL.Image.Transpose.ROTATE_90,
}
# Orientations whose upright image is the stored one turned a quarter (or transposed): width and height swap.
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

_16_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UnreadableImageError(OSError):
    """An image file is missing, truncated or not an image."""


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image as 8-bit RGB. 16-bit integer images (mode I;16*, and I, which PIL uses for 16-bit PNGs) are
    scaled from 0..65535 to 0..255, where a plain ``convert('RGB')`` would clip them to 255; palette images with
    transparency go through RGBA (PIL warns otherwise). Alpha is dropped, as the official ``convert('RGB')``."""
    if image.mode == "RGB":
        return image
    if image.mode in _16_BIT_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        return PIL.Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("P", "PA") and ("transparency" in image.info or image.mode == "PA"):
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def exif_orientation(image: PIL.Image.Image) -> int:
    """The image's EXIF Orientation, 1..8; 1 (stored = upright) when the tag is absent, out of range or its EXIF
    block does not parse (viewers then show the stored pixels too)."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(size_wh: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of the upright image for stored size ``size_wh`` and EXIF ``orientation``."""
    width, height = size_wh
    return (height, width) if orientation in SWAPPING_ORIENTATIONS else (width, height)


@dataclass
class StoredImage:
    """An image file as stored: ``image`` the RGB pixels in the file's own orientation, ``orientation`` its EXIF
    Orientation (1..8, 1 = upright as stored), ``name`` the file's name for messages."""

    image: PIL.Image.Image
    orientation: int
    name: str

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) after applying the orientation."""
        return upright_size(self.image.size, self.orientation)

    def upright(self) -> PIL.Image.Image:
        """The RGB image turned as the EXIF orientation says (the stored image itself when it is 1)."""
        if self.orientation == 1:
            return self.image
        return self.image.transpose(UPRIGHT_TRANSPOSITIONS[self.orientation])


def read_rgb_image(source: str | Path | bytes, name: str | None = None) -> StoredImage:
    """Decodes a whole image file (a path or its bytes) into RGB pixels as stored, with its EXIF orientation.

    Raises :class:`UnreadableImageError` naming the file for a missing, truncated or non-image file; decoding is
    forced here so that truncation shows up at load time rather than in a later transform.
    """
    name = name or str(source if not isinstance(source, bytes) else "<bytes>")
    try:
        with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            # Read after load(): Pillow turns TIFF files itself while loading them (and drops their tag), so a TIFF
            # is upright here with orientation 1, as with the official loader, which uses Pillow too.
            return StoredImage(to_rgb(image), exif_orientation(image), name)
    except FileNotFoundError as error:
        raise UnreadableImageError(f"{name}: image file not found") from error
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"{name}: cannot read the image ({type(error).__name__}: {error})") from error


def load_rgb_image(source: str | Path | bytes, name: str | None = None, *, exif_transpose: bool = True
                   ) -> PIL.Image.Image:
    """Decodes a whole image file (a path or its bytes) into an RGB PIL image, upright: the EXIF Orientation tag
    is applied (the transposition of ``PIL.ImageOps.exif_transpose``) unless ``exif_transpose=False``, which
    returns the stored pixels as the official ``Image.open(path).convert('RGB')`` does.

    Raises :class:`UnreadableImageError` naming the file for a missing, truncated or non-image file.
    """
    stored = read_rgb_image(source, name)
    return stored.upright() if exif_transpose else stored.image
