"""COCO-format detection data: annotation file checks, image decoding, target preparation, the dataset.

Labels are the COCO ``category_id`` values themselves, as in the official code, so a model needs
``num_classes = max category id + 1`` logits (91 for COCO 2017, whose ids run 1..90 with gaps).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from tqdm import tqdm

# Image decoding lives in images.py (inference needs it without pycocotools); re-exported for existing imports.
from deformable_detr.data.images import UnreadableImageError, load_rgb_image, read_rgb_image, to_rgb
from deformable_detr.data.transforms import ImageLike, ImageSizeError, Target, Transform, make_coco_transforms

__all__ = ["AnnotationFileError", "CocoDetection", "DatasetLayoutError", "DegenerateImageError", "MIN_IMAGE_SIDE",
           "ORIENTATIONS", "UnreadableImageError", "build_coco_dataset", "category_info",
           "images_with_all_boxes_dropped", "load_coco_annotations", "load_rgb_image", "num_classes",
           "prepare_coco_target", "to_rgb"]

OFFICIAL_LAYOUT = """\
  <coco_path>/train2017/                              training images
  <coco_path>/val2017/                                validation images
  <coco_path>/annotations/instances_train2017.json
  <coco_path>/annotations/instances_val2017.json"""

ORIENTATIONS = ("auto", "upright", "stored")
MIN_IMAGE_SIDE = 2
"""Dataset images with a side shorter than this (in pixels) are degenerate: skipped as unreadable."""


class DatasetLayoutError(FileNotFoundError):
    """An image folder or annotation file is not where the dataset's layout says."""


class AnnotationFileError(ValueError):
    """An annotation file is not valid JSON or not COCO detection format."""


class DegenerateImageError(UnreadableImageError):
    """An image that decodes but is no usable sample: a side shorter than :data:`MIN_IMAGE_SIDE` pixels (a 200x1
    strip), or a shape that the dataset's transforms resize to 0 pixels (too elongated for the ``max_size`` cap).
    Handled as an unreadable image: skipped with a warning and counted, an error with ``strict``."""


# --------------------------------------------------------------------------------------------- annotation file


def load_coco_annotations(path: str | Path) -> COCO:
    """Reads and checks a COCO-format detection file; returns a pycocotools ``COCO`` index over it.

    Required: ``images`` (``id`` int, ``file_name`` str), ``annotations`` (``image_id`` of a listed image,
    ``category_id`` of a listed category, ``bbox`` = 4 finite numbers x, y, w, h), ``categories`` (``id`` int >= 0,
    ``name``). Optional annotation fields get COCO's meaning when absent, so that pycocotools' evaluation can use
    them too: ``iscrowd`` 0, ``area`` w * h, ``id`` a fresh unique number.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: annotation file not found (expected a COCO-format detection JSON)")
    try:
        with path.open("rb") as file:
            dataset = json.load(file)
    except json.JSONDecodeError as error:
        raise AnnotationFileError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column "
                                  f"{error.colno})") from error
    except UnicodeDecodeError as error:
        raise AnnotationFileError(f"{path}: not valid JSON (not UTF-8 text: {error.reason})") from error
    _check_coco_dataset(dataset, path)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def _check_coco_dataset(dataset: Any, path: Path) -> None:
    def fail(reason: str) -> None:
        raise AnnotationFileError(f"{path}: not a COCO detection file: {reason}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(dataset, dict):
        fail(f"the top level is a JSON {type(dataset).__name__}, expected an object with 'images', 'annotations' "
             "and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            fail(f"'{key}' is {'missing' if key not in dataset else 'not a list'}")

    image_ids: set[int] = set()
    for n, image in enumerate(dataset["images"]):
        if not isinstance(image, dict) or not is_int(image.get("id")) or not isinstance(image.get("file_name"), str):
            fail(f"images[{n}] needs an int 'id' and a str 'file_name', got {_short(image)}")
        if image["id"] in image_ids:
            fail(f"images[{n}]: image id {image['id']} appears twice")
        image_ids.add(image["id"])

    category_ids: set[int] = set()
    for n, category in enumerate(dataset["categories"]):
        if not isinstance(category, dict) or not is_int(category.get("id")) or category["id"] < 0:
            fail(f"categories[{n}] needs an int 'id' >= 0 (ids are the labels), got {_short(category)}")
        if category["id"] in category_ids:
            fail(f"categories[{n}]: category id {category['id']} appears twice")
        category_ids.add(category["id"])
        category.setdefault("name", str(category["id"]))

    annotation_ids = {a["id"] for a in dataset["annotations"] if isinstance(a, dict) and is_int(a.get("id"))}
    next_id = max(annotation_ids, default=0) + 1
    for n, annotation in enumerate(dataset["annotations"]):
        if not isinstance(annotation, dict):
            fail(f"annotations[{n}] is not an object: {_short(annotation)}")
        if annotation.get("image_id") not in image_ids:
            fail(f"annotations[{n}]: image_id {annotation.get('image_id')!r} is not in 'images'")
        if annotation.get("category_id") not in category_ids:
            fail(f"annotations[{n}]: category_id {annotation.get('category_id')!r} is not in 'categories'")
        bbox = annotation.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in bbox)):
            fail(f"annotations[{n}]: 'bbox' must be 4 finite numbers [x, y, width, height], got {_short(bbox)}")
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("area", float(bbox[2]) * float(bbox[3]))
        if not is_int(annotation.get("id")):
            annotation["id"] = next_id
            next_id += 1


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------------------ target


def prepare_coco_target(size_wh: tuple[int, int], image_id: int, annotations: list[dict[str, Any]]) -> Target:
    """The official ``ConvertCocoPolysToMask`` (boxes only): COCO annotations of one image -> a target dict.

    Crowd annotations (iscrowd 1) are dropped; boxes go from xywh to xyxy and are clamped to the image; boxes left
    empty (x1 <= x0 or y1 <= y0) are dropped. ``area`` is the annotation's own (not recomputed after clamping).

    Returns: ``boxes`` (n, 4) float32 xyxy pixels, ``labels`` (n,) int64 = category_id, ``area`` (n,) float32,
    ``iscrowd`` (n,) int64, ``image_id`` (1,) int64, ``orig_size`` and ``size`` (2,) int64 = (h, w).
    """
    width, height = size_wh
    annotations = [a for a in annotations if a.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
    area = torch.tensor([float(a["area"]) for a in annotations], dtype=torch.float32)
    iscrowd = torch.tensor([a.get("iscrowd", 0) for a in annotations], dtype=torch.int64)
    return {"boxes": boxes[keep], "labels": labels[keep], "image_id": torch.tensor([image_id]),
            "area": area[keep], "iscrowd": iscrowd[keep],
            "orig_size": torch.as_tensor([int(height), int(width)]), "size": torch.as_tensor([int(height), int(width)])}


def images_with_all_boxes_dropped(coco: COCO) -> dict[int, str]:
    """The images that have annotations but whose prepared target (:func:`prepare_coco_target`) has no box, so that
    they train as background only: ``{image id: why}``, why being ``"crowd only"`` (every annotation has iscrowd
    1) or ``"no box inside the image"`` (every non-crowd box has zero or negative width or height, or no area once
    clamped to the image).

    Read from the annotation file alone, with the rules of :func:`prepare_coco_target` (float32, the same
    clamping), the image size being the file's ``width`` / ``height``; without them only the crowd flag and the
    boxes' own sizes are judged. Images without annotations are not counted (they are meant to be background), nor
    are boxes that a random crop cuts off later (augmentation, not an annotation fault).
    """
    annotations = coco.dataset.get("annotations", [])
    if not annotations:
        return {}

    def declared(info: dict[str, Any], key: str) -> float:
        value = info.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
            else math.inf

    # Vectorised over all annotations (COCO 2017's 860k take about a second), one row per image for the sizes.
    image_ids = list(coco.imgs)
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    limits = torch.tensor([[declared(coco.imgs[i], "width"), declared(coco.imgs[i], "height")] for i in image_ids],
                          dtype=torch.float32)  # (images, 2)
    count = len(annotations)
    rows = torch.from_numpy(np.fromiter((row_of[a["image_id"]] for a in annotations), np.int64, count))  # (n,)
    crowd = torch.from_numpy(np.fromiter((a.get("iscrowd", 0) != 0 for a in annotations), np.bool_, count))
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32)  # (n, 4) xywh
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = torch.minimum(boxes[:, 0::2].clamp(min=0), limits[rows, :1])
    boxes[:, 1::2] = torch.minimum(boxes[:, 1::2].clamp(min=0), limits[rows, 1:])
    kept_box = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0]) & ~crowd
    annotated, kept, not_crowd = (torch.zeros(len(image_ids), dtype=torch.bool) for _ in range(3))
    annotated[rows] = True
    kept[rows[kept_box]] = True
    not_crowd[rows[~crowd]] = True
    return {image_ids[row]: "no box inside the image" if not_crowd[row] else "crowd only"
            for row in sorted((annotated & ~kept).nonzero().flatten().tolist(), key=lambda r: image_ids[r])}


def warn_images_with_all_boxes_dropped(dataset: CocoDetection, examples: int = 5) -> int:
    """One warning naming how many of ``dataset``'s annotated images train as background only because every box
    is dropped when the target is prepared (see :func:`images_with_all_boxes_dropped`), with the first
    ``examples`` ids and file names; returns the count (0: no warning)."""
    dropped = dataset.images_with_all_boxes_dropped
    if not dropped:
        return 0
    annotated = len({a["image_id"] for a in dataset.coco.dataset["annotations"]})
    reasons = {why: sum(1 for w in dropped.values() if w == why) for why in sorted(set(dropped.values()))}
    listed = ", ".join(f"{image_id} ({dataset.coco.imgs[image_id]['file_name']}: {why})"
                       for image_id, why in list(dropped.items())[:examples])
    more = f", and {len(dropped) - examples} more" if len(dropped) > examples else ""
    warnings.warn(f"{dataset.annotation_file}: {len(dropped)} of {annotated} annotated image(s) have no box left "
                  f"once their targets are prepared ({', '.join(f'{n} {why}' for why, n in reasons.items())}), so "
                  f"they train as background only: image ids {listed}{more}", stacklevel=2)
    return len(dropped)


# ----------------------------------------------------------------------------------------------------- dataset


class CocoDetection(Dataset):
    """Images of a folder with their COCO-format annotations; item ``i`` = transformed (image, target) of the
    ``i``-th image id in increasing order (the official order).

    An unreadable image (missing, truncated, not an image) is skipped with a warning naming it: the item is then
    the next readable one, and :attr:`num_skipped` counts the skips (over all DataLoader workers). With
    ``strict=True`` it raises :class:`UnreadableImageError` instead. So is a degenerate image
    (:class:`DegenerateImageError`): a side shorter than :data:`MIN_IMAGE_SIDE` pixels, or one that ``transforms``
    resize to 0 pixels (too elongated for their ``max_size`` cap; with random sizes, possibly only for some draws).

    :attr:`images_with_all_boxes_dropped`: the annotated images whose boxes are all dropped by
    :func:`prepare_coco_target` (crowd only, outside the image, no area), which train as background only;
    :func:`build_coco_dataset` warns about them for a training set.

    ``cache_mode`` reads the files' bytes into memory up front, only those of the items with index % local_size ==
    local_rank (the official sharding: with the official distributed sampler a process mostly reads its own share;
    others are read from disk on first use, then cached too).

    ``orientation``: which way up an image with an EXIF Orientation tag (a phone photo stored sideways) is read.
    The facts: the official loader (``Image.open(path).convert('RGB')``) ignores the tag, so it trains and
    evaluates on the stored pixels. A COCO-format file does not say in which orientation its boxes were drawn, and
    tools differ: annotators that display the image with the tag applied (RectLabel, labelme, Dataloop, VIA in a
    browser that applies it) give boxes on the upright image; others strip or ignore the tag and give boxes on the
    stored pixels (Labelbox strips it; CTW1500 and ICDAR2017 were annotated on the stored pixels,
    open-mmlab/mmocr#375). The only
    evidence in the file is each image's ``width`` / ``height``, and it tells the two apart only for a quarter-turn
    tag (orientations 5..8) on a non-square image.

    * ``"auto"`` (default): upright, except when the file's width / height are the stored size and not the upright
      one: then the boxes were measured on the stored pixels, which are kept (as officially). Untagged images read
      exactly as officially.
    * ``"upright"``: always apply the tag; ``"stored"``: never (the official behaviour). For files whose sizes are
      known to be wrong (Label Studio's COCO export writes the stored size of an image it annotated upright,
      HumanSignal/label-studio#6608) or when the boxes are known to follow the stored pixels of a 180-degree or
      square image, which the sizes cannot show.

    Either way, an image whose size then differs from the file's ``width`` / ``height`` gets a warning naming it.
    """

    def __init__(self, image_folder: str | Path, annotation_file: str | Path, transforms: Transform | None = None,
                 *, cache_mode: bool = False, local_rank: int = 0, local_size: int = 1, strict: bool = False,
                 orientation: Literal["auto", "upright", "stored"] = "auto", progress: bool = True) -> None:
        self.image_folder = Path(image_folder)
        if not self.image_folder.is_dir():
            raise DatasetLayoutError(f"{self.image_folder}: image folder not found (expected a folder holding the "
                                     f"files named by the 'file_name' fields of {annotation_file})")
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if not 0 <= local_rank < local_size:
            raise ValueError(f"need 0 <= local_rank < local_size, got local_rank={local_rank}, "
                             f"local_size={local_size}")
        self.annotation_file = Path(annotation_file)
        self.coco = load_coco_annotations(annotation_file)
        self.ids: list[int] = sorted(self.coco.imgs)
        self.transforms = transforms
        self.strict = strict
        self.orientation = orientation
        self.cache_mode = cache_mode
        self.local_rank, self.local_size = local_rank, local_size
        # Shared memory, so that skips in DataLoader worker processes show in the main process's count.
        self._num_skipped = multiprocessing.Value("q", 0)
        self.cache: dict[str, bytes] = {}
        self._all_boxes_dropped: dict[int, str] | None = None
        if cache_mode:
            self._cache_images(progress)

    @property
    def num_skipped(self) -> int:
        """Items so far replaced by the next readable one because their image could not be read."""
        return int(self._num_skipped.value)

    @property
    def category_ids(self) -> list[int]:
        return sorted(self.coco.cats)

    @property
    def categories(self) -> dict[int, str]:
        """{category id (= label): name}."""
        return {i: str(self.coco.cats[i].get("name", i)) for i in self.category_ids}

    def __len__(self) -> int:
        return len(self.ids)

    def _cache_images(self, progress: bool) -> None:
        shard = [i for i in range(len(self.ids)) if i % self.local_size == self.local_rank]
        for index in tqdm(shard, desc=f"caching images of {self.image_folder}", disable=not progress,
                          dynamic_ncols=True):
            file_name = self.coco.imgs[self.ids[index]]["file_name"]
            try:
                self.cache[file_name] = (self.image_folder / file_name).read_bytes()
            except OSError:
                pass  # reported (or raised, when strict) when the item is read

    def load_image(self, index: int) -> PIL.Image.Image:
        """The RGB image of item ``index``, untransformed, turned by its EXIF orientation as ``orientation`` says;
        :class:`UnreadableImageError` if it cannot be read."""
        info = self.coco.imgs[self.ids[index]]
        file_name = info["file_name"]
        path = self.image_folder / file_name
        if self.cache_mode:
            if file_name not in self.cache:
                try:
                    self.cache[file_name] = path.read_bytes()
                except OSError as error:
                    raise UnreadableImageError(f"{path}: cannot read the file ({error.strerror or error})") from error
            stored = read_rgb_image(self.cache[file_name], name=str(path))
        else:
            stored = read_rgb_image(path)
        declared = (info.get("width"), info.get("height"))
        upright = self.orientation == "upright" or (
            self.orientation == "auto" and not (declared == stored.image.size != stored.upright_size))
        image = stored.upright() if upright else stored.image
        if declared not in ((image.width, image.height), (None, None)):
            warnings.warn(f"{path}: the image is {image.width}x{image.height} but {self.annotation_file} says "
                          f"{info.get('width')}x{info.get('height')}; boxes are taken as given, in the pixels of "
                          "the file", stacklevel=2)
        return image

    def load_target(self, index: int, size_wh: tuple[int, int]) -> Target:
        """The prepared target of item ``index`` (see :func:`prepare_coco_target`), untransformed."""
        image_id = self.ids[index]
        return prepare_coco_target(size_wh, image_id, self.coco.imgToAnns.get(image_id, []))

    @property
    def images_with_all_boxes_dropped(self) -> dict[int, str]:
        """{image id: why} of the annotated images left without a box by target preparation (see
        :func:`images_with_all_boxes_dropped`); computed once, from the annotation file."""
        if self._all_boxes_dropped is None:
            self._all_boxes_dropped = images_with_all_boxes_dropped(self.coco)
        return self._all_boxes_dropped

    def _sample(self, index: int) -> tuple[ImageLike, Target]:
        """Item ``index`` transformed; :class:`UnreadableImageError` (or its :class:`DegenerateImageError`) naming
        the file if it cannot be used."""
        image = self.load_image(index)
        path = self.image_folder / self.coco.imgs[self.ids[index]]["file_name"]
        if min(image.size) < MIN_IMAGE_SIDE:
            raise DegenerateImageError(f"{path}: the image is {image.width}x{image.height} pixels; a side under "
                                       f"{MIN_IMAGE_SIDE} pixels is not a usable image")
        target = self.load_target(index, image.size)
        if self.transforms is not None:
            try:
                image, target = self.transforms(image, target)
            except ImageSizeError as error:
                raise DegenerateImageError(f"{path}: {error}") from error
        return image, target

    def __getitem__(self, index: int) -> tuple[ImageLike, Target]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index %= len(self)
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            try:
                return self._sample(current)
            except UnreadableImageError as error:
                if self.strict:
                    raise
                with self._num_skipped.get_lock():
                    self._num_skipped.value += 1
                warnings.warn(f"{error}; skipped (the next readable image is used instead)", stacklevel=2)
        raise UnreadableImageError(f"{self.image_folder}: none of the {len(self)} images listed in "
                                   f"{self.annotation_file} can be read and used")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images in {self.image_folder}, annotations "
                f"{self.annotation_file}, {len(self.coco.anns)} boxes, {len(self.coco.cats)} categories)")


def category_info(dataset: CocoDetection) -> dict[int, str]:
    """{category id (= label): name} of a dataset."""
    return dataset.categories


def num_classes(dataset: CocoDetection) -> int:
    """The number of class logits the dataset's labels need: the largest category id + 1."""
    return max(dataset.category_ids, default=0) + 1


def build_coco_dataset(image_set: str, coco_path: str | Path | None = None, images: str | Path | None = None,
                       annotations: str | Path | None = None, *, cache_mode: bool = False, local_rank: int = 0,
                       local_size: int = 1, strict: bool = False,
                       transforms: Transform | Literal["official"] | None = "official",
                       orientation: Literal["auto", "upright", "stored"] = "auto",
                       progress: bool = True) -> CocoDetection:
    """The ``image_set`` ('train' or 'val') split, from the official COCO layout (``coco_path``) or from any image
    folder + COCO-format JSON (``images`` and ``annotations``).

    ``transforms``: 'official' = :func:`make_coco_transforms` (image_set) with the official sizes; None returns the
    RGB PIL image and the untransformed target. ``orientation``: see :class:`CocoDetection`.

    A training set warns once (:func:`warn_images_with_all_boxes_dropped`) about its annotated images whose boxes
    are all dropped when their targets are prepared, which would otherwise train as background silently.
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    if coco_path is not None:
        if images is not None or annotations is not None:
            raise ValueError("give either coco_path (official layout) or images + annotations, not both")
        root = Path(coco_path)
        if not root.is_dir():
            raise DatasetLayoutError(f"{root}: COCO folder not found; expected the official layout:\n"
                                     f"{OFFICIAL_LAYOUT}")
        images = root / f"{image_set}2017"
        annotations = root / "annotations" / f"instances_{image_set}2017.json"
        for path, kind in ((images, "image folder"), (annotations, "annotation file")):
            if not path.exists():
                raise DatasetLayoutError(f"{path}: {kind} not found; expected the official layout:\n"
                                         f"{OFFICIAL_LAYOUT}")
    elif images is None or annotations is None:
        raise ValueError(f"give the {image_set} data: coco_path (official layout) or both images (a folder) and "
                         "annotations (a COCO-format JSON)")
    if transforms == "official":
        transforms = make_coco_transforms(image_set)
    elif transforms is not None and not callable(transforms):
        raise TypeError(f"transforms must be callable, 'official' or None, got {transforms!r}")
    dataset = CocoDetection(images, annotations, transforms, cache_mode=cache_mode, local_rank=local_rank,
                            local_size=local_size, strict=strict, orientation=orientation, progress=progress)
    if image_set == "train":
        warn_images_with_all_boxes_dropped(dataset)
    return dataset

