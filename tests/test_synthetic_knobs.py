"""The synthetic dataset's difficulty knobs (small objects, clutter, occlusion, min_objects): defaults reproduce the
pre-knob files byte for byte, each knob does what it says, checked against the pixels and against pycocotools' own
area ranges, and bad values get one clear line."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deformable_detr.data.synthetic import make_synthetic_dataset, render_image, render_scene


def _digest(root: Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``root``, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_defaults_write_the_files_of_the_generator_before_the_knobs(tmp_path):
    """The digests were produced by the generator before the knobs were added (commit 85c1447, numpy/Pillow of this
    venv): at their defaults the knobs draw no random number, so the demo's data (and its AP) is unchanged."""
    make_synthetic_dataset(tmp_path / "a", num_train=6, num_val=3, image_size=96, seed=5)
    make_synthetic_dataset(tmp_path / "b", num_train=6, num_val=3, image_size=96, seed=5, colour_by_class=True,
                           max_objects=6)
    assert _digest(tmp_path / "a") == "f6ece40cf4ed3b37e9082607c95625e54091b43887cd69bc94a058a2e5035208"
    assert _digest(tmp_path / "b") == "9ede9e691398137b7e99bbe6a9aa2acf7696104e94ca3f3910541e1b0c4db483"
    # Naming a knob at its default changes nothing either; a knob away from it changes the data.
    make_synthetic_dataset(tmp_path / "c", num_train=6, num_val=3, image_size=96, seed=5, small_fraction=0.0,
                           clutter=0, min_visible=0.6, min_objects=1)
    assert _digest(tmp_path / "c") == _digest(tmp_path / "a")
    make_synthetic_dataset(tmp_path / "d", num_train=6, num_val=3, image_size=96, seed=5, clutter=1)
    assert _digest(tmp_path / "d") != _digest(tmp_path / "a")


def _coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _small_share(path: Path) -> tuple[int, float]:
    """(annotations, share of them in pycocotools' 'small' area range), the range read from COCOeval itself."""
    coco = _coco(path)
    params = COCOeval(coco, coco, "bbox").params
    low, high = params.areaRng[params.areaRngLbl.index("small")]
    assert (low, high) == (0, 32**2)
    areas = np.array([a["area"] for a in coco.anns.values()])
    return len(areas), float(((areas >= low) & (areas <= high)).mean())


def test_small_fraction_makes_coco_small_objects(tmp_path):
    """small_fraction=1: every object is COCO-small (its area < 1024 px, in COCOeval's 'small' range) at 256 px.
    small_fraction=0 keeps the ordinary extents (10%..60% of the short side): these already hold COCO-small objects at
    256 px (thin rectangles of 19 x 10 px, stars, whose area is ~0.3 extent^2, occluded shapes): 31 of 71 here, 47%
    of 443 over 200 images measured; small_fraction=0.5 lies in between (about 0.5 + 0.5 * that share)."""
    shares = {}
    for fraction in (0.0, 0.5, 1.0):
        data = make_synthetic_dataset(tmp_path / str(fraction), num_train=30, num_val=0, image_size=256, seed=1,
                                      small_fraction=fraction, empty_fraction=0.0)
        count, shares[fraction] = _small_share(data.train_json)
        assert count >= 60
        coco = json.loads(data.train_json.read_text())
        if fraction == 1.0:
            assert max(a["area"] for a in coco["annotations"]) < 32**2
            assert max(max(a["bbox"][2:]) for a in coco["annotations"]) <= 25
        if fraction == 0.0:
            assert "small_fraction" not in coco["info"]  # a default is not recorded (byte-identical files)
            # The ordinary range: no shape's larger side under 10% of the short side (>= 192 px here), bar occlusion.
            whole = [a for a in coco["annotations"] if max(a["bbox"][2:]) < 19]
            assert not whole, whole
        else:
            assert coco["info"]["small_fraction"] == fraction
    assert shares[1.0] == 1.0
    assert 0.3 < shares[0.0] < 0.6
    assert shares[0.0] + 0.2 < shares[0.5] < shares[1.0] - 0.1


def test_small_objects_boxes_match_the_pixels(tmp_path):
    """One small object per image: pixels of its colour (the median over the pixels the generator says are its own)
    fill much of its JSON box and are (almost) absent outside it; the 8-px end of the range survives the pixel floor
    (some object's larger side is <= 11 px, some has fewer than the 30 pixels ordinary shapes must have)."""
    data = make_synthetic_dataset(tmp_path, num_train=16, num_val=0, image_size=64, max_objects=1,
                                  empty_fraction=0.0, small_fraction=1.0)
    coco = _coco(data.train_json)
    sides, areas = [], []
    for index, (image_id, info) in enumerate(coco.imgs.items()):
        (annotation,) = coco.imgToAnns[image_id]
        x, y, w, h = (int(v) for v in annotation["bbox"])
        sides.append(max(w, h))
        areas.append(annotation["area"])
        assert annotation["area"] <= w * h < 32**2
        pixels = np.asarray(PIL.Image.open(data.train_images / info["file_name"]), dtype=np.float64)
        (obj,) = render_scene(np.random.default_rng([0, 0, index]), 64, max_objects=1, empty_fraction=0.0,
                              small_fraction=1.0).objects
        colour = np.median(pixels[obj.visible], 0)
        near = np.abs(pixels - colour).max(2) < 30
        outside = np.ones(pixels.shape[:2], dtype=bool)
        outside[max(y - 1, 0):y + h + 1, max(x - 1, 0):x + w + 1] = False
        assert near[y:y + h, x:x + w].sum() >= 0.5 * annotation["area"]
        assert near[outside].mean() < 0.02
    assert min(sides) <= 11 and min(areas) < 30


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood lies in ``mask`` (drops anti-aliased edge pixels)."""
    padded = np.pad(mask, 1)
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def test_annotations_are_the_visible_pixels_with_every_knob(tmp_path):
    """With small objects, clutter and strong occlusion at once: the JSON's box and area are the tight box and count
    of each object's visible pixels; the interior of those pixels has one colour (the object's: nothing, clutter
    included, was drawn over it); visible pixels of two objects never overlap; the render functions agree."""
    options = dict(image_size=96, max_objects=8, small_fraction=0.5, clutter=4, min_visible=0.3)
    data = make_synthetic_dataset(tmp_path, num_train=10, num_val=0, seed=2, **options)
    coco = json.loads(data.train_json.read_text())
    assert {k: coco["info"][k] for k in ("small_fraction", "clutter", "min_visible")} == {
        "small_fraction": 0.5, "clutter": 4, "min_visible": 0.3}
    interiors, covered_clutter = 0, 0
    for index, image in enumerate(coco["images"]):
        scene = render_scene(np.random.default_rng([2, 0, index]), **options)
        pixels, objects = render_image(np.random.default_rng([2, 0, index]), **options)
        assert np.array_equal(pixels, scene.pixels)
        assert np.array_equal(np.asarray(PIL.Image.open(data.train_images / image["file_name"])), scene.pixels)
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert [(a["category_id"], a["bbox"], a["area"]) for a in annotations] == objects
        assert len(annotations) == len(scene.objects)
        taken = np.zeros(scene.pixels.shape[:2], dtype=bool)
        for annotation, obj in zip(annotations, scene.objects):
            rows, cols = np.nonzero(obj.visible)
            x0, y0 = cols.min(), rows.min()
            assert annotation["bbox"] == [x0, y0, cols.max() + 1 - x0, rows.max() + 1 - y0]
            assert annotation["area"] == obj.visible.sum() <= obj.full_area
            assert not (taken & obj.visible).any()
            taken |= obj.visible
            core = _eroded(obj.visible)
            if core.sum() >= 4:
                colours = scene.pixels[core].astype(np.float64)
                assert np.abs(colours - np.median(colours, 0)).max() < 70
                interiors += 1
        covered_clutter += (scene.clutter & taken).any()
    assert interiors >= 30 and covered_clutter >= 1  # some clutter lies under an object (drawn before, covered)


def test_clutter_marks_are_drawn_but_never_annotated(tmp_path):
    """No objects, clutter=5: no annotation, yet the image holds palette-coloured marks; against the same seed
    without clutter (the same background, drawn before the marks), the images differ only on the marks (elsewhere at
    most by pixel noise), and the number of marks spans 0..5."""
    data = make_synthetic_dataset(tmp_path, num_train=12, num_val=0, image_size=96, seed=3, max_objects=0,
                                  clutter=5)
    coco = json.loads(data.train_json.read_text())
    assert coco["annotations"] == [] and coco["info"]["clutter"] == 5
    counts, marked = [], 0
    for index, image in enumerate(coco["images"]):
        with_marks = render_scene(np.random.default_rng([3, 0, index]), 96, max_objects=0, clutter=5)
        plain = render_scene(np.random.default_rng([3, 0, index]), 96, max_objects=0).pixels.astype(np.float64)
        pixels = np.asarray(PIL.Image.open(data.train_images / image["file_name"]), dtype=np.float64)
        assert np.array_equal(pixels, with_marks.pixels) and with_marks.objects == []
        counts.append(with_marks.num_clutter)
        difference = np.abs(pixels - plain).max(2)
        near_marks = ~_eroded(~with_marks.clutter)  # the marks grown by one pixel (their anti-aliased rim)
        assert difference[~near_marks].max() < 70  # noise only: two draws of sigma <= 8
        if with_marks.num_clutter:
            assert with_marks.clutter.any() and np.median(difference[with_marks.clutter]) > 50
            # A saturated colour: the background is muted (each channel of its gradient drawn in 50..190).
            spread = pixels[with_marks.clutter].max(1) - pixels[with_marks.clutter].min(1)
            marked += np.median(spread) > 100
        else:
            assert not with_marks.clutter.any()
    assert min(counts) == 0 and max(counts) == 5 and marked >= 3


def test_min_visible_sets_how_much_objects_may_hide_each_other():
    """min_visible=0.3 over a few crowded images: some object has less than 60% (the default floor) of its pixels
    visible, none less than 30%; at the default 0.6 none goes below 0.6."""
    fractions = {}
    for min_visible in (0.3, 0.6):
        fractions[min_visible] = np.array([
            o.area / o.full_area
            for i in range(12)
            for o in render_scene(np.random.default_rng([7, 0, i]), 96, max_objects=8, min_objects=4,
                                  empty_fraction=0.0, min_visible=min_visible).objects])
    assert fractions[0.3].min() >= 0.3 and (fractions[0.3] < 0.6).sum() >= 3
    assert fractions[0.6].min() >= 0.6


def test_min_objects_sets_the_fewest_objects_of_a_non_empty_image():
    counts = [len(render_image(np.random.default_rng([4, 0, i]), 96, max_objects=5, empty_fraction=0.0,
                               min_objects=4)[1]) for i in range(10)]
    assert min(counts) >= 3 and counts.count(5) >= 2  # 4 or 5 asked; a crowded image may find no room for one


@pytest.mark.parametrize(("argument", "value", "message"), [
    ("small_fraction", 1.5, "small_fraction must be a number in [0, 1], got 1.5"),
    ("small_fraction", -0.1, "small_fraction must be a number in [0, 1], got -0.1"),
    ("small_fraction", "0.5", "small_fraction must be a number in [0, 1], got '0.5'"),
    ("clutter", -1, "clutter must be an integer >= 0, got -1"),
    ("clutter", 2.5, "clutter must be an integer >= 0, got 2.5"),
    ("min_visible", 0.0, "min_visible must be a number in (0, 1], got 0.0"),
    ("min_visible", 1.2, "min_visible must be a number in (0, 1], got 1.2"),
    ("min_objects", 0, "min_objects must be an integer in [1, max_objects=4], got 0"),
    ("min_objects", 5, "min_objects must be an integer in [1, max_objects=4], got 5"),
])
def test_bad_knobs_raise_one_line_naming_the_argument(tmp_path, argument, value, message):
    with pytest.raises(ValueError) as raised:
        make_synthetic_dataset(tmp_path / "out", num_train=1, num_val=0, **{argument: value})
    assert str(raised.value) == message
    assert not (tmp_path / "out").exists()  # checked before anything is written
    with pytest.raises(ValueError, match=argument):
        render_image(np.random.default_rng(0), **{argument: value})


def test_make_synthetic_command_passes_the_knobs(tmp_path):
    out = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "deformable_detr", "make-synthetic", "--out", str(out),
                             "--num_train", "4", "--num_val", "2", "--image_size", "64", "--small_fraction", "0.5",
                             "--clutter", "3", "--min_visible", "0.4", "--max_objects", "8"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for split, count in (("train", 4), ("val", 2)):
        coco = json.loads((out / f"{split}.json").read_text())
        assert len(coco["images"]) == count == len(list((out / split).glob("*.png")))
        info = coco["info"]
        assert (info["small_fraction"], info["clutter"], info["min_visible"], info["max_objects"]) == (0.5, 3, 0.4, 8)
    # The same data as the Python API with the same knobs.
    make_synthetic_dataset(tmp_path / "api", num_train=4, num_val=2, image_size=64, small_fraction=0.5, clutter=3,
                           min_visible=0.4, max_objects=8)
    assert _digest(out) == _digest(tmp_path / "api")
    bad = subprocess.run([sys.executable, "-m", "deformable_detr", "make-synthetic", "--out", str(tmp_path / "bad"),
                          "--clutter", "-2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert bad.stderr.strip() == "ddetr make-synthetic: clutter must be an integer >= 0, got -2"
