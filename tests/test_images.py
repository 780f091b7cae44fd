"""Image files and the evaluation transform: EXIF orientation (phone photos load upright; the dataset's rule for
annotation files made on either orientation), the lazy data package, EvalTransform for PIL images and tensors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

from deformable_detr.data.coco import CocoDetection
from deformable_detr.data.images import UnreadableImageError, load_rgb_image, read_rgb_image
from deformable_detr.data.transforms import (
    Compose,
    EvalTransform,
    Normalize,
    RandomResize,
    ToTensor,
    make_coco_transforms,
)
from deformable_detr.verify.run import verify_files

# The EXIF 2.3 definition of each Orientation value, as numpy on the stored (H, W, 3) array: what a viewer shows.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # row 0 is the left side, column 0 the top
    6: lambda a: np.rot90(a, k=-1),  # row 0 is the right side: turn a quarter clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # row 0 is the right side, column 0 the bottom
    8: lambda a: np.rot90(a, k=1),  # row 0 is the left side: turn a quarter anticlockwise
}


def _exif(orientation: int) -> bytes:
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _stored_pixels(height: int = 20, width: int = 36) -> np.ndarray:
    """A smooth gradient (JPEG keeps it well) with a bright block in the stored top-left corner."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 60)], -1).astype(np.uint8)
    pixels[:5, :8] = 255
    return pixels


# ----------------------------------------------------------------------------------------------- orientation


def test_a_phone_jpeg_stored_sideways_loads_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    PIL.Image.fromarray(_stored_pixels()).save(path, quality=95, exif=_exif(6))

    upright = load_rgb_image(path)
    stored = load_rgb_image(path, exif_transpose=False)
    assert stored.size == (36, 20) and upright.size == (20, 36), "width and height swap"
    np.testing.assert_array_equal(np.asarray(upright), np.rot90(np.asarray(stored), k=-1))
    # The stored top-left block (blue 255 on 60) is at the top right of the upright picture, as a viewer shows it.
    blue = np.asarray(upright)[..., 2]
    assert blue[1:7, -4:].min() > 200 and blue[1:7, :4].max() < 120 and blue[-8:, -4:].max() < 120
    # The same pixels as Pillow's own exif_transpose of the file.
    with PIL.Image.open(path) as original:
        np.testing.assert_array_equal(np.asarray(upright), np.asarray(PIL.ImageOps.exif_transpose(original)))
    # From bytes too (the datasets' cache mode).
    assert np.array_equal(np.asarray(load_rgb_image(path.read_bytes(), name="phone.jpg")), np.asarray(upright))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_the_exif_definition_and_pillow(tmp_path, orientation):
    pixels = _stored_pixels(7, 11)
    path = tmp_path / f"o{orientation}.png"  # lossless, so that pixels compare exactly with the stored array
    PIL.Image.fromarray(pixels).save(path, exif=_exif(orientation))
    stored = read_rgb_image(path)
    assert stored.orientation == orientation
    upright = np.asarray(load_rgb_image(path))
    np.testing.assert_array_equal(upright, UPRIGHT[orientation](pixels))
    assert stored.upright_size == (upright.shape[1], upright.shape[0])
    with PIL.Image.open(path) as original:
        np.testing.assert_array_equal(upright, np.asarray(PIL.ImageOps.exif_transpose(original).convert("RGB")))


def test_a_grey_tagged_image_is_turned_and_converted(tmp_path):
    path = tmp_path / "grey.jpg"
    PIL.Image.fromarray(_stored_pixels()[..., 0]).save(path, exif=_exif(8))
    image = load_rgb_image(path)
    assert image.mode == "RGB" and image.size == (20, 36)
    stored = np.asarray(load_rgb_image(path, exif_transpose=False))
    np.testing.assert_array_equal(np.asarray(image), np.rot90(stored, k=1))


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(UnreadableImageError, match="absent.jpg: image file not found"):
        load_rgb_image(tmp_path / "absent.jpg")
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(UnreadableImageError, match="notes.jpg: cannot read the image"):
        load_rgb_image(tmp_path / "notes.jpg")


# ------------------------------------------------------------------------------------------- the dataset rule


def _tagged_dataset(root: Path, declared: str, size_hw: tuple[int, int] = (20, 36)) -> Path:
    """images/photo.png stored (H, W) = ``size_hw`` with Orientation 6, and a JSON whose width / height are the
    ``declared`` ('stored', 'upright' or 'none') size, with one box."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(_stored_pixels(*size_hw)).save(root / "images" / "photo.png", exif=_exif(6))
    height, width = size_hw
    entry = {"id": 7, "file_name": "photo.png"}
    if declared == "stored":
        entry.update(width=width, height=height)
    elif declared == "upright":
        entry.update(width=height, height=width)
    annotation = {"id": 1, "image_id": 7, "category_id": 1, "bbox": [2.0, 3.0, 10.0, 12.0], "area": 120.0,
                  "iscrowd": 0}
    path = root / f"{declared}.json"
    path.write_text(json.dumps({"images": [entry], "annotations": [annotation],
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


@pytest.mark.parametrize("cache_mode", [False, True])
@pytest.mark.parametrize(("declared", "expected_wh"), [("stored", (36, 20)), ("upright", (20, 36)),
                                                       ("none", (20, 36))])
def test_the_dataset_keeps_the_stored_orientation_only_when_the_annotation_file_says_so(
        tmp_path, declared, expected_wh, cache_mode):
    annotations = _tagged_dataset(tmp_path, declared)
    dataset = CocoDetection(tmp_path / "images", annotations, cache_mode=cache_mode, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sizes agree with the file: no mismatch warning
        image, target = dataset[0]
    assert image.size == expected_wh
    stored = np.asarray(load_rgb_image(tmp_path / "images" / "photo.png", exif_transpose=False))
    expected = stored if expected_wh == (36, 20) else np.rot90(stored, k=-1)
    np.testing.assert_array_equal(np.asarray(image), expected)
    # The boxes are the file's, on the image the rule chose; the sizes are that image's.
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 15.0]]
    assert target["orig_size"].tolist() == [expected_wh[1], expected_wh[0]]


def test_a_square_tagged_image_cannot_be_told_apart_and_reads_upright(tmp_path):
    annotations = _tagged_dataset(tmp_path, "stored", size_hw=(24, 24))
    image, _ = CocoDetection(tmp_path / "images", annotations)[0]
    stored = np.asarray(load_rgb_image(tmp_path / "images" / "photo.png", exif_transpose=False))
    np.testing.assert_array_equal(np.asarray(image), np.rot90(stored, k=-1))


def test_the_orientation_can_be_forced_and_a_disagreeing_file_is_reported(tmp_path):
    upright_json = _tagged_dataset(tmp_path, "upright")
    official = CocoDetection(tmp_path / "images", upright_json, orientation="stored")
    with pytest.warns(UserWarning, match=r"photo.png: the image is 36x20 but .*upright.json says 20x36"):
        image, _ = official[0]
    assert image.size == (36, 20)
    stored_json = _tagged_dataset(tmp_path, "stored")
    forced = CocoDetection(tmp_path / "images", stored_json, orientation="upright")
    with pytest.warns(UserWarning, match=r"photo.png: the image is 20x36 but .*stored.json says 36x20"):
        image, _ = forced[0]
    assert image.size == (20, 36)
    with pytest.raises(ValueError, match=r"orientation must be one of \('auto', 'upright', 'stored'\), got 'up'"):
        CocoDetection(tmp_path / "images", stored_json, orientation="up")


def test_the_data_package_loads_pycocotools_only_for_the_datasets():
    code = ("import sys; import deformable_detr.data as data; import deformable_detr.inference.predict; "
            "print(sorted(m for m in ('pycocotools', 'matplotlib', 'deformable_detr.data.synthetic') "
            "if m in sys.modules)); data.CocoDetection; data.make_synthetic_dataset; "
            "print(sorted(m for m in ('pycocotools', 'deformable_detr.data.synthetic') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "['deformable_detr.data.synthetic', 'pycocotools']"]


# ---------------------------------------------------------------------------------------------- EvalTransform


def test_the_eval_transform_reference_is_unaffected(reference_path):
    lines: list[str] = []
    assert verify_files([str(reference_path / "eval_transform.npz")], print_fn=lines.append), "\n".join(lines)
    assert isinstance(make_coco_transforms("val"), EvalTransform)


def test_eval_transform_is_the_official_val_pipeline_for_pil_images():
    image = PIL.Image.fromarray(_stored_pixels(90, 150))
    target = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0]]), "area": torch.tensor([3000.0]),
              "size": torch.tensor([90, 150])}
    official = Compose([RandomResize([64], max_size=96), Compose([ToTensor(), Normalize()])])
    random.seed(3)
    expected, expected_target = official(image, target)
    after_official = random.random()
    random.seed(3)
    got, got_target = EvalTransform(64, 96)(image, target)
    assert random.random() == after_official, "the same draws from Python's random as the official pipeline"
    assert torch.equal(got, expected) and tuple(got.shape) == (3, 58, 96)
    for key in expected_target:
        assert torch.equal(got_target[key], expected_target[key]), key


def test_eval_transform_resizes_tensors_with_the_same_size_rule():
    pixels = _stored_pixels(90, 150)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    target = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0]]), "size": torch.tensor([90, 150])}
    transform = EvalTransform(64, 96)
    from_pil, pil_target = transform(PIL.Image.fromarray(pixels), target)
    from_tensor, tensor_target = transform(tensor, target)
    assert from_tensor.shape == from_pil.shape == (3, 58, 96)
    assert torch.equal(tensor_target["boxes"], pil_target["boxes"])
    # Antialiased bilinear in torchvision and in PIL: close (normalised units, std ~0.22), not bitwise equal.
    assert float((from_tensor - from_pil).abs().mean()) < 0.05
    with pytest.raises(ValueError, match=r"float \(3, H, W\) RGB in \[0, 1\], got torch.uint8 \(3, 90, 150\)"):
        transform(torch.zeros(3, 90, 150, dtype=torch.uint8))
    with pytest.raises(TypeError, match="expected a PIL image or a float"):
        transform(pixels)
