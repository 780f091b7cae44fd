"""Data pipeline: official eval-transform parity, transforms keep boxes on the pixels, COCO target preparation,
bad inputs, image modes, the synthetic dataset, batching."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from deformable_detr.box_ops import box_cxcywh_to_xyxy
from deformable_detr.data import (
    AnnotationFileError,
    CocoDetection,
    DatasetLayoutError,
    UnreadableImageError,
    batch_images,
    build_coco_dataset,
    category_info,
    collate_fn,
    load_coco_annotations,
    make_coco_transforms,
    make_synthetic_dataset,
    num_classes,
    prepare_coco_target,
    to_rgb,
)
from deformable_detr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    RandomHorizontalFlip,
    RandomResize,
    RandomSizeCrop,
    crop,
    get_size_with_aspect_ratio,
)
from deformable_detr.verify.run import load_reference, verify_files, verify_reference

# ------------------------------------------------------------------------------------------ reference parity


def test_eval_transform_matches_the_official_reference(reference_path):
    path = reference_path / "eval_transform.npz"
    lines: list[str] = []
    assert verify_files([str(path)], print_fn=lines.append), "\n".join(lines)
    reference = load_reference(path)
    checks, computed = verify_reference(reference)
    inputs = ("in.anno_bbox_xywh", "in.anno_category_id", "in.anno_area")
    checked = {c.name for c in checks}
    assert checked == {k for k in reference if k.partition(".")[2] not in inputs}
    assert all(c.passed for c in checks)
    for key in checked:  # same dtypes as the official arrays, not only the same values
        assert np.asarray(computed[key]).dtype == reference[key].dtype, key


def test_output_size_rule_is_the_official_one():
    assert get_size_with_aspect_ratio((640, 480), 800, 1333) == (800, 1066)
    assert get_size_with_aspect_ratio((1000, 400), 800, 1333) == (533, 1332)
    assert get_size_with_aspect_ratio((480, 640), 800, 1333) == (1066, 800)
    assert get_size_with_aspect_ratio((800, 600), 600, None) == (600, 800)  # already the size: unchanged


# ------------------------------------------------------------------------- transforms keep boxes on the pixels

COLOURS = {1: (255, 0, 255), 2: (0, 255, 255)}  # label -> a colour found nowhere else in the test image


def _image_with_boxes(width: int = 160, height: int = 120) -> tuple[PIL.Image.Image, dict[str, torch.Tensor]]:
    pixels = np.full((height, width, 3), (60, 110, 70), dtype=np.uint8)
    boxes = [[30, 20, 90, 70], [100, 60, 150, 110]]  # xyxy, pixel edges
    for (x0, y0, x1, y1), colour in zip(boxes, COLOURS.values()):
        pixels[y0:y1, x0:x1] = colour
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(list(COLOURS)),
              "area": torch.tensor([3000.0, 2500.0]), "iscrowd": torch.zeros(2, dtype=torch.int64),
              "size": torch.tensor([height, width])}
    return PIL.Image.fromarray(pixels), target


def _coloured_region(pixels: np.ndarray, colour: tuple[int, int, int]) -> list[int] | None:
    """xyxy (pixel edges) of the pixels closer to ``colour`` than to anything else in the image, or None."""
    near = np.abs(pixels.astype(np.int64) - np.array(colour)).max(-1) < 100
    if not near.any():
        return None
    rows, cols = np.flatnonzero(near.any(1)), np.flatnonzero(near.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _assert_boxes_on_pixels(pixels: np.ndarray, boxes_xyxy: torch.Tensor, labels: torch.Tensor,
                            tolerance: float = 2.0) -> None:
    for label, colour in COLOURS.items():
        region = _coloured_region(pixels, colour)
        rows = (labels == label).nonzero().flatten()
        if len(rows) == 0:
            assert region is None or min(region[2] - region[0], region[3] - region[1]) <= 2, \
                f"label {label}: box dropped but its colour still covers {region}"
            continue
        box = boxes_xyxy[rows[0]].tolist()
        if min(box[2] - box[0], box[3] - box[1]) < 3:
            continue  # a sliver left by a crop: too thin to find reliably after resampling
        assert region is not None, f"label {label}: box {box} but no pixel of its colour"
        assert np.abs(np.array(box) - np.array(region)).max() <= tolerance, (label, box, region)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def test_flip_moves_boxes_with_the_pixels():
    image, target = _image_with_boxes()
    flipped, out = RandomHorizontalFlip(p=1.0)(image, target)
    assert out["boxes"][0].tolist() == [160 - 90, 20, 160 - 30, 70]
    _assert_boxes_on_pixels(np.asarray(flipped), out["boxes"], out["labels"], tolerance=0)


def test_crop_clips_and_drops_boxes_and_recomputes_area():
    image, target = _image_with_boxes()
    cropped, out = crop(image, target, (40, 50, 60, 60))  # top 40, left 50, 60x60: cuts box 1, box 2 partly in
    assert out["size"].tolist() == [60, 60]
    assert out["boxes"].tolist() == [[0, 0, 40, 30], [50, 20, 60, 60]]
    assert out["area"].tolist() == [1200.0, 400.0]
    _assert_boxes_on_pixels(np.asarray(cropped), out["boxes"], out["labels"], tolerance=0)
    cropped, out = crop(image, target, (0, 0, 15, 160))  # above both boxes
    assert len(out["boxes"]) == len(out["labels"]) == len(out["area"]) == len(out["iscrowd"]) == 0
    for seed in range(20):
        _seed(seed)
        cropped, out = RandomSizeCrop(30, 100)(image, target)
        _assert_boxes_on_pixels(np.asarray(cropped), out["boxes"], out["labels"], tolerance=0)


@pytest.mark.parametrize("sizes,max_size", [([60], None), ([333], None), ([200], 250), ([97], 111)])
def test_resize_scales_boxes_and_area_by_the_integer_size_ratios(sizes, max_size):
    image, target = _image_with_boxes()
    resized, out = RandomResize(sizes, max_size)(image, target)
    height, width = get_size_with_aspect_ratio(image.size, sizes[0], max_size)
    assert resized.size == (width, height) and out["size"].tolist() == [height, width]
    ratio_w, ratio_h = width / 160, height / 120
    torch.testing.assert_close(out["area"], target["area"] * (ratio_w * ratio_h))
    _assert_boxes_on_pixels(np.asarray(resized), out["boxes"], out["labels"])


def test_training_pipeline_keeps_boxes_on_the_pixels():
    transforms = make_coco_transforms("train", scales=[96, 128, 160], crop_resize_sizes=[100, 130],
                                      crop_size=(60, 110), max_size=220)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    kinds = set()
    for seed in range(24):
        image, target = _image_with_boxes()
        _seed(seed)
        tensor, out = transforms(image, target)
        height, width = tensor.shape[-2:]
        assert out["size"].tolist() == [height, width]
        pixels = ((tensor * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        boxes = box_cxcywh_to_xyxy(out["boxes"]) * torch.tensor([width, height, width, height])
        assert ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()
        _assert_boxes_on_pixels(pixels, boxes, out["labels"])
        kinds.add((len(out["boxes"]), bool(boxes[:, 0].min() > 100) if len(boxes) else None))
    assert len(kinds) > 1, "24 seeds should give different crops / flips"


def test_random_size_crop_on_an_image_smaller_than_min_size_crops_it_whole():
    image, target = _image_with_boxes(40, 30)
    target["boxes"] = torch.tensor([[5.0, 5.0, 20.0, 25.0]])
    target = {**target, "labels": target["labels"][:1], "area": target["area"][:1], "iscrowd": target["iscrowd"][:1]}
    cropped, out = Compose([RandomSizeCrop(384, 600)])(image, target)
    assert cropped.size == (40, 30) and out["boxes"].tolist() == [[5.0, 5.0, 20.0, 25.0]]


# ---------------------------------------------------------------------------------------- target preparation


def test_target_preparation_drops_crowd_and_degenerate_boxes_and_clamps():
    annotations = [
        {"bbox": [10, 10, 20, 30], "category_id": 3, "area": 500.0, "iscrowd": 0},
        {"bbox": [5, 5, 50, 50], "category_id": 4, "area": 2000.0, "iscrowd": 1},  # crowd
        {"bbox": [30, 40, 0, 10], "category_id": 5, "area": 0.0, "iscrowd": 0},  # zero width
        {"bbox": [-10, 90, 30, 40], "category_id": 6, "area": 1111.0},  # clamped, no iscrowd field
        {"bbox": [120, 10, 10, 10], "category_id": 7, "area": 100.0, "iscrowd": 0},  # right of the image
    ]
    target = prepare_coco_target((100, 110), 42, annotations)
    assert target["boxes"].tolist() == [[10, 10, 30, 40], [0, 90, 20, 110]]
    assert target["labels"].tolist() == [3, 6]
    assert target["area"].tolist() == [500.0, 1111.0]  # the annotation's area, not recomputed after clamping
    assert target["iscrowd"].tolist() == [0, 0]
    assert target["image_id"].tolist() == [42]
    assert target["size"].tolist() == target["orig_size"].tolist() == [110, 100]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    empty = prepare_coco_target((100, 110), 1, [])
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


# ------------------------------------------------------------------------------------------------ bad inputs


def _write_dataset(root: Path, files: dict[str, bytes | PIL.Image.Image], boxes_per_image: int = 1) -> Path:
    """A COCO-format folder root/images + root/anno.json with one box per image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (name, content) in enumerate(files.items(), start=1):
        if isinstance(content, PIL.Image.Image):
            content.save(root / "images" / name)
        else:
            (root / "images" / name).write_bytes(content)
        images.append({"id": image_id, "file_name": name, "width": 32, "height": 24})
        for _ in range(boxes_per_image):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 2,
                                "bbox": [2, 3, 10, 8], "area": 80.0, "iscrowd": 0})
    json_path = root / "anno.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": [{"id": 2, "name": "thing"}, {"id": 7, "name": "other"}]}))
    return json_path


def _rgb(seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8))


def test_missing_folder_or_json_is_an_error_naming_the_path(tmp_path):
    json_path = _write_dataset(tmp_path, {"a.png": _rgb()})
    with pytest.raises(DatasetLayoutError, match="nowhere.*image folder not found"):
        CocoDetection(tmp_path / "nowhere", json_path)
    with pytest.raises(DatasetLayoutError, match="missing.json: annotation file not found"):
        CocoDetection(tmp_path / "images", tmp_path / "missing.json")
    with pytest.raises(DatasetLayoutError, match="(?s)not_coco: COCO folder not found.*train2017"):
        build_coco_dataset("train", coco_path=tmp_path / "not_coco")
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"(?s)instances_val2017.json: annotation file not found.*val2017/"):
        build_coco_dataset("val", coco_path=tmp_path / "coco")
    with pytest.raises(ValueError, match="images .* annotations"):
        build_coco_dataset("val", images=tmp_path / "images")


@pytest.mark.parametrize("content,reason", [
    ('{"images": [', "not valid JSON .*line 1"),
    ("[1, 2]", "top level is a JSON list"),
    ('{"images": [], "categories": []}', "'annotations' is missing"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] needs .*file_name"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "x"}], '
     '"annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]}', r"annotations\[0\]: 'bbox' must be 4"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "x"}], '
     '"annotations": [{"image_id": 9, "category_id": 1, "bbox": [1, 2, 3, 4]}]}', "image_id 9 is not in 'images'"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "x"}], '
     '"annotations": [{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}]}', "category_id 3 is not in"),
])
def test_malformed_annotation_file_is_an_error_with_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(AnnotationFileError, match=f"bad.json: .*{reason}"):
        load_coco_annotations(path)


def test_missing_optional_annotation_fields_get_coco_defaults(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "x"}], '
                    '"annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}]}')
    annotation = load_coco_annotations(path).anns[1]
    assert annotation["area"] == 12.0 and annotation["iscrowd"] == 0


@pytest.mark.parametrize("cache_mode", [False, True])
def test_unreadable_image_is_skipped_with_a_warning_and_counted(tmp_path, cache_mode):
    good = PIL.Image.new("RGB", (32, 24), (10, 20, 30))
    buffer = tmp_path / "full.jpg"
    _rgb().save(buffer)
    truncated = buffer.read_bytes()[:300]
    json_path = _write_dataset(tmp_path, {"a.png": good, "b.png": b"not an image at all", "c.jpg": truncated,
                                          "d.png": _rgb(1)})
    dataset = CocoDetection(tmp_path / "images", json_path, cache_mode=cache_mode, progress=False)
    image, target = dataset[0]
    assert image.size == (32, 24) and target["image_id"].item() == 1
    with pytest.warns(UserWarning, match="skipped") as record:
        image, target = dataset[1]
    messages = [str(w.message) for w in record]
    assert any(m.startswith(str(tmp_path / "images" / "b.png") + ": cannot read the image") for m in messages)
    assert any("c.jpg" in m for m in messages), "the truncated JPEG is skipped too"
    assert target["image_id"].item() == 4 and dataset.num_skipped == 2
    strict = CocoDetection(tmp_path / "images", json_path, cache_mode=cache_mode, strict=True, progress=False)
    with pytest.raises(UnreadableImageError, match="b.png"):
        strict[1]
    (tmp_path / "images" / "d.png").unlink()
    if not cache_mode:
        with pytest.raises(UnreadableImageError, match="d.png: image file not found"):
            strict[3]


def test_skips_in_dataloader_workers_are_counted_in_the_main_process(tmp_path):
    json_path = _write_dataset(tmp_path, {"a.png": _rgb(), "b.png": b"\x89PNG broken", "c.png": _rgb(2)})
    dataset = CocoDetection(tmp_path / "images", json_path, make_coco_transforms("val", val_size=24, max_size=40))
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_fn, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, mask, targets = next(iter(loader))
    assert [t["image_id"].item() for t in targets] == [1, 3, 3]
    assert dataset.num_skipped == 1


def test_cache_mode_loads_only_this_rank_s_share(tmp_path):
    json_path = _write_dataset(tmp_path, {f"{i}.png": _rgb(i) for i in range(5)})
    dataset = CocoDetection(tmp_path / "images", json_path, cache_mode=True, local_rank=1, local_size=2,
                            progress=False)
    assert sorted(dataset.cache) == ["1.png", "3.png"]
    assert np.array_equal(np.asarray(dataset[3][0]), np.asarray(_rgb(3)))
    assert np.array_equal(np.asarray(dataset[4][0]), np.asarray(_rgb(4)))  # read from disk, then cached
    assert "4.png" in dataset.cache


def test_categories_and_num_classes(tmp_path):
    dataset = CocoDetection(tmp_path / "images", _write_dataset(tmp_path, {"a.png": _rgb()}))
    assert category_info(dataset) == {2: "thing", 7: "other"}
    assert dataset.category_ids == [2, 7] and num_classes(dataset) == 8


# ------------------------------------------------------------------------------------------------ image modes


def test_image_modes_are_converted_to_rgb(tmp_path):
    grey = PIL.Image.fromarray(np.full((24, 32), 77, dtype=np.uint8), mode="L")
    rgba = PIL.Image.new("RGBA", (32, 24), (200, 100, 50, 0))
    palette = PIL.Image.new("P", (32, 24), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = bytes([0, 255] + [255] * 254)
    deep = PIL.Image.fromarray(np.array([[0, 32896, 65535]] * 24, dtype=np.uint16).repeat(11, 1)[:, :32])
    json_path = _write_dataset(tmp_path, {"grey.png": grey, "rgba.png": rgba, "palette.png": palette,
                                          "deep.png": deep})
    assert PIL.Image.open(tmp_path / "images" / "deep.png").mode == "I;16"
    dataset = CocoDetection(tmp_path / "images", json_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning about palette transparency, no skip
        images = [dataset[i][0] for i in range(4)]
    assert all(image.mode == "RGB" and image.size == (32, 24) for image in images)
    assert np.asarray(images[0])[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(images[1])[0, 0].tolist() == [200, 100, 50]
    assert np.asarray(images[2])[0, 0].tolist() == [10, 200, 30]
    assert np.asarray(images[3])[0, [0, 11, 22]].tolist() == [[0] * 3, [128] * 3, [255] * 3]  # scaled, not clipped
    assert to_rgb(PIL.Image.new("1", (3, 3), 1)).getpixel((0, 0)) == (255, 255, 255)


# -------------------------------------------------------------------------------------------------- synthetic


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_dataset_is_deterministic_and_valid_coco(tmp_path):
    options = dict(num_train=16, num_val=4, image_size=64, empty_fraction=0.25)
    first = make_synthetic_dataset(tmp_path / "a", seed=3, **options)
    make_synthetic_dataset(tmp_path / "b", seed=3, **options)
    make_synthetic_dataset(tmp_path / "c", seed=4, **options)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b")
    assert files != _files(tmp_path / "c")
    assert len([name for name in files if name.endswith(".png")]) == 20

    coco = load_coco_annotations(first.train_json)
    assert len(coco.imgs) == 16
    images_with_boxes = {a["image_id"] for a in coco.anns.values()}
    assert len(images_with_boxes) < 16, "some images have no object"
    assert len({a["category_id"] for a in coco.anns.values()}) >= 3
    assert sorted(coco.cats) == [1, 2, 3, 4, 5]
    for annotation in coco.anns.values():
        info = coco.imgs[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= info["width"] and y + h <= info["height"] and w > 0 and h > 0
        assert 0 < annotation["area"] <= w * h

    dataset = build_coco_dataset("train", images=first.train_images, annotations=first.train_json,
                                 transforms=make_coco_transforms("train", scales=[48, 64], crop_resize_sizes=[56],
                                                                 crop_size=(32, 56), max_size=96))
    assert num_classes(dataset) == 6 and category_info(dataset)[5] == "star"
    images, mask, targets = collate_fn([dataset[i] for i in range(4)])
    assert images.shape[:2] == (4, 3) and mask.shape == (4, *images.shape[2:]) and len(targets) == 4


def test_synthetic_boxes_match_the_pixels_of_single_objects(tmp_path):
    data = make_synthetic_dataset(tmp_path, num_train=12, num_val=0, image_size=64, max_objects=1,
                                  empty_fraction=0.0)
    coco = load_coco_annotations(data.train_json)
    background_checked = 0
    for image_id, info in coco.imgs.items():
        annotations = coco.imgToAnns[image_id]
        assert len(annotations) == 1
        x, y, w, h = (int(v) for v in annotations[0]["bbox"])
        pixels = np.asarray(PIL.Image.open(data.train_images / info["file_name"]), dtype=np.float64)
        inside = pixels[y:y + h, x:x + w].reshape(-1, 3)
        # The object's colour (the most common colour in its box) should be rare outside the box.
        centre = pixels[y + h // 2, x + w // 2]
        if np.abs(inside - centre).max(1).mean() > 60:
            continue  # the centre pixel is background (a cross arm or a star's notch): skip
        outside = np.ones(pixels.shape[:2], dtype=bool)
        outside[max(y - 1, 0):y + h + 1, max(x - 1, 0):x + w + 1] = False
        assert (np.abs(pixels[outside] - centre).max(1) < 30).mean() < 0.02
        background_checked += 1
    assert background_checked >= 6


def test_synthetic_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_dataset(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="image_format"):
        make_synthetic_dataset(tmp_path, image_format="gif")


# ---------------------------------------------------------------------------------------------------- collate


def test_collate_pads_bottom_right_and_masks_the_padding():
    a, b = torch.rand(3, 5, 7) + 1, torch.rand(3, 6, 4) + 1
    targets = [{"labels": torch.tensor([1])}, {"labels": torch.tensor([2, 3])}]
    images, mask, out_targets = collate_fn([(a, targets[0]), (b, targets[1])])
    assert images.shape == (2, 3, 6, 7) and mask.shape == (2, 6, 7) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :5, :7], a) and torch.equal(images[1, :, :6, :4], b)
    assert (images[0, :, 5:] == 0).all() and (images[1, :, :, 4:] == 0).all()
    assert torch.equal(mask[0], torch.arange(6)[:, None].expand(6, 7) >= 5)
    assert torch.equal(mask[1], torch.arange(7)[None, :].expand(6, 7) >= 4)
    assert out_targets == targets
    same, same_mask = batch_images([a])
    assert torch.equal(same[0], a) and not same_mask.any()
    with pytest.raises(ValueError, match="channel"):
        batch_images([a, torch.rand(1, 5, 7)])
