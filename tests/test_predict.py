"""ddetr predict's outputs: detections.json carrying a ground-truth file's image ids (scored by pycocotools exactly as
the same detections made in-process), file-name matching and its failures, pictures of small images enlarged."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deformable_detr import build_model
from deformable_detr.config import model_config
from deformable_detr.data import build_coco_dataset, make_synthetic_dataset
from deformable_detr.inference.detector import Detector
from deformable_detr.inference.drawing import draw_detections, enlarge_for_drawing
from deformable_detr.inference.predict import GroundTruthError, match_image_ids, predict_files

TINY = dict(num_classes=5, backbone="resnet18", hidden_dim=32, nheads=8, enc_layers=1, dec_layers=2,
            dim_feedforward=64, num_queries=12)
NAMES = {0: "zero", 1: "rectangle", 2: "ellipse", 3: "triangle", 4: "cross"}


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    model, _, _ = build_model("box_refine", **TINY)
    with torch.no_grad():
        for head in model.class_embed:  # spread the scores, so that detections differ in rank
            head.bias.normal_(0.0, 2.0)
    return Detector(model, model_config("box_refine", **TINY), NAMES, val_size=64, max_size=96, score_threshold=0.0)


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory) -> tuple[Path, Path]:
    """Five synthetic images and a COCO JSON of them whose ids are neither 1..N nor in file order, and whose
    file_names carry the folder (val/000001.png), so that matching by name is what gives the right ids."""
    data = make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=0, num_val=5, image_size=64,
                                  seed=1)
    coco = json.loads(data.val_json.read_text())
    new_ids = {image["id"]: 1000 - 7 * image["id"] for image in coco["images"]}  # 993, 986, ...
    for image in coco["images"]:
        image["id"] = new_ids[image["id"]]
        image["file_name"] = f"val/{image['file_name']}"
    for annotation in coco["annotations"]:
        annotation["image_id"] = new_ids[annotation["image_id"]]
    gt_json = data.root / "gt.json"
    gt_json.write_text(json.dumps(coco))
    return data.val_images, gt_json


def _evaluate(gt_json: Path, detections: str | list[dict]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO(str(gt_json))
        evaluation = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def test_predict_with_coco_json_writes_the_ground_truth_ids_and_scores_as_in_process(detector, ground_truth,
                                                                                       tmp_path):
    images, gt_json = ground_truth
    # The detections made in-process, one image at a time, with the dataset's own ids.
    dataset = build_coco_dataset("val", images=images.parent, annotations=gt_json, transforms=None, progress=False)
    in_process = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        in_process += detector.predict(image).to_coco(int(target["image_id"]))
    # A ground truth that this untrained model does find (its own top 3 boxes per image, its labels as the
    # categories), so that the evaluation is far from 0 and would collapse with wrong image ids.
    coco = json.loads(gt_json.read_text())
    top = {}
    for result in in_process:  # by decreasing score within each image
        top.setdefault(result["image_id"], []).append(result)
    coco["annotations"] = [{"id": n + 1, "image_id": r["image_id"], "category_id": r["category_id"],
                            "bbox": r["bbox"], "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
                           for n, r in enumerate(r for found in top.values() for r in found[:3])]
    coco["categories"] = [{"id": label, "name": name} for label, name in NAMES.items()]
    own_json = tmp_path / "own.json"
    own_json.write_text(json.dumps(coco))

    # One image per forward pass, as in-process: padding in a batch changes the outputs slightly.
    summary = predict_files(detector, [str(images)], tmp_path / "out", batch_size=1, coco_json=own_json,
                            progress=False)
    assert summary.images == 5 and not summary.failed
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    id_of = {Path(image["file_name"]).name: image["id"] for image in coco["images"]}
    assert {r["image_id"] for r in written} == set(id_of.values()) == {993, 986, 979, 972, 965}
    assert all(r["image_id"] == id_of[Path(r["file_name"]).name] for r in written)
    key = ("image_id", "category_id", "bbox", "score")
    assert sorted(tuple(map(str, (r[k] for k in key))) for r in written) == sorted(
        tuple(map(str, (r[k] for k in key))) for r in in_process)

    from_file = _evaluate(own_json, str(tmp_path / "out" / "detections.json"))
    expected = _evaluate(own_json, in_process)
    np.testing.assert_array_equal(from_file.stats, expected.stats)
    assert from_file.stats[0] > 0.5, from_file.stats  # AP: the detections found their images' boxes

    # Image by image and category by category: the same detections matched to the same ground-truth boxes (by
    # ground-truth id; detection ids are list positions, which differ), the same ground truth found.
    def matches(evaluation: COCOeval) -> list:
        return [(e["image_id"], e["category_id"], e["aRng"], e["dtScores"], e["dtMatches"].tolist(),
                 (e["gtMatches"] > 0).tolist()) for e in evaluation.evalImgs if e is not None]

    assert matches(from_file) == matches(expected)


def test_inputs_without_exactly_one_ground_truth_image_are_reported_and_skipped(detector, ground_truth, tmp_path,
                                                                                capsys):
    images, gt_json = ground_truth
    extra = tmp_path / "elsewhere" / "photo.png"
    extra.parent.mkdir()
    PIL.Image.open(images / "000001.png").save(extra)
    summary = predict_files(detector, [str(images / "000002.png"), str(extra)], tmp_path / "out",
                            coco_json=gt_json, progress=False)
    assert summary.images == 1 and len(summary.failed) == 1
    assert summary.failed[0].startswith(f"{extra}: no image of {gt_json} has this file_name")
    assert "photo.png" in capsys.readouterr().err
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {r["image_id"] for r in written} == {986}

    with pytest.raises(GroundTruthError, match=r"absent.json: ground-truth file not found"):
        predict_files(detector, [str(extra)], tmp_path / "out", coco_json=tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"images": [{"id": "one", "file_name": "a.png"}]}))
    with pytest.raises(GroundTruthError, match=r"broken.json: images\[0\] needs an int 'id' and a str 'file_name'"):
        predict_files(detector, [str(extra)], tmp_path / "out", coco_json=broken)


def test_file_name_matching_rules():
    files = [Path("/data/a/x.jpg"), Path("/data/b/x.jpg"), Path("/data/a/y.jpg"), Path("/data/a/z.jpg"),
             Path("/data/a/w.jpg")]
    ground_truth = [("x.jpg", 1),  # no folder: both x.jpg inputs match it, so neither is taken
                    ("a/y.jpg", 2), ("b/y.jpg", 3),  # folders: only /data/a/y.jpg matches a/y.jpg
                    ("z.jpg", 4), (".\\a\\z.jpg", 5),  # two entries match /data/a/z.jpg
                    ]
    ids, problems = match_image_ids(files, ground_truth, "gt.json")
    assert ids == {Path("/data/a/y.jpg"): 2}
    text = "\n".join(problems)
    assert "/data/a/x.jpg: ambiguous, image id 1 of gt.json (file_name 'x.jpg') matches other inputs too: " \
           "/data/b/x.jpg" in text
    assert "/data/a/z.jpg: ambiguous, several images of gt.json match: 'z.jpg' (id 4), '.\\\\a\\\\z.jpg' (id 5)" in text
    assert "/data/a/w.jpg: no image of gt.json has this file_name" in text
    assert len(problems) == 4


# ------------------------------------------------------------------------------------------- small pictures


def test_pictures_of_small_images_are_enlarged_with_their_boxes(detector, ground_truth, tmp_path):
    image = PIL.Image.new("RGB", (64, 48), (0, 0, 0))
    picture = draw_detections(image, [[8.0, 16.0, 40.0, 40.0]], [0.9], [1], NAMES)
    assert picture.size == (512, 384)  # zoom 8: the longer side reaches 512
    pixels = np.asarray(picture)
    # The box's left edge, at x = 8 * 8, halfway down the box: coloured (the outline), black beside it.
    assert pixels[28 * 8, 8 * 8].max() > 100 and pixels[28 * 8, 8 * 8 + 20].max() == 0
    assert draw_detections(image, [[8.0, 16.0, 40.0, 40.0]], [0.9], [1], min_side=0).size == (64, 48)
    large = PIL.Image.new("RGB", (600, 300))
    assert enlarge_for_drawing(large)[1] == 1 and enlarge_for_drawing(image, 300) == (enlarge_for_drawing(
        image, 300)[0], 4)

    images, _ = ground_truth
    predict_files(detector, [str(images / "000001.png")], tmp_path / "out", progress=False)
    source = PIL.Image.open(images / "000001.png")
    zoom = 512 // max(source.size)
    assert zoom >= 8 and PIL.Image.open(tmp_path / "out" / "000001_detections.png").size == (
        source.width * zoom, source.height * zoom)
