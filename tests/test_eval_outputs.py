"""Evaluation outputs: per-class AP against pycocotools restricted to one category, faster-coco-eval against
pycocotools, COCOeval once on the main process of two gloo processes, and ``ddetr eval``'s eval.json and eval.pth.

Run as a script (``python tests/test_eval_outputs.py WORKDIR``) this file is one rank of the distributed test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from deformable_detr.training.evaluation import STAT_NAMES, CocoEvaluator, official_eval_dict

# A category with detections but no ground truth (its AP is pycocotools' -1, ours None).
CATEGORIES = {1: "circle", 3: "square", 7: "triangle", 9: "unseen"}


def _random_coco(rng: np.random.Generator, num_images: int) -> COCO:
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(200, 400)), int(rng.integers(150, 300))
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(0, 6))):
            # Sides from 4 to half the image: objects of all three COCO area ranges.
            w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": int(rng.random() < 0.05),
                                "category_id": int(rng.choice([1, 3, 7]))})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i, "name": name} for i, name in CATEGORIES.items()]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _random_detections(rng: np.random.Generator, coco: COCO) -> dict[int, dict[str, torch.Tensor]]:
    """Jittered copies of the ground truth (a fifth with another class) plus random boxes of any category."""
    detections = {}
    for image_id, image in coco.imgs.items():
        boxes, scores, labels = [], [], []
        for annotation in coco.imgToAnns[image_id]:
            x, y, w, h = annotation["bbox"]
            jitter = rng.normal(0, 0.12, 4) * [w, h, w, h]
            boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            scores.append(rng.uniform(0.2, 1.0))
            labels.append(annotation["category_id"] if rng.random() < 0.8 else int(rng.choice(list(CATEGORIES))))
        for _ in range(int(rng.integers(0, 8))):
            x0, y0 = rng.uniform(0, image["width"] * 0.8), rng.uniform(0, image["height"] * 0.8)
            boxes.append([x0, y0, x0 + rng.uniform(3, 80), y0 + rng.uniform(3, 80)])
            scores.append(rng.uniform(0, 0.6))
            labels.append(int(rng.choice(list(CATEGORIES))))
        detections[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                "scores": torch.tensor(scores, dtype=torch.float32),
                                "labels": torch.tensor(labels, dtype=torch.int64)}
    return detections


def _result_dicts(detections: dict[int, dict[str, torch.Tensor]]) -> list[dict]:
    """The detections as COCO result dicts, converted by hand (xyxy -> xywh)."""
    results = []
    for image_id, d in detections.items():
        for (x0, y0, x1, y1), score, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score})
    return results


def _pycocotools(coco: COCO, results: list[dict], cat_ids: list[int] | None = None) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iouType="bbox")
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _evaluated(coco: COCO, detections: dict, evaluator: str = "pycocotools") -> CocoEvaluator:
    coco_evaluator = CocoEvaluator(coco, evaluator)
    coco_evaluator.update(detections)
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.summarize()
    return coco_evaluator


def test_per_class_ap_equals_pycocotools_evaluated_on_that_category_alone():
    rng = np.random.default_rng(0)
    coco = _random_coco(rng, num_images=60)
    detections = _random_detections(rng, coco)
    ours = _evaluated(coco, detections)
    results = _result_dicts(detections)
    assert [row.id for row in ours.per_class] == sorted(CATEGORIES)
    assert [row.name for row in ours.per_class] == [CATEGORIES[i] for i in sorted(CATEGORIES)]
    for row in ours.per_class:
        alone = _pycocotools(coco, results, cat_ids=[row.id]).stats
        if row.id == 9:  # no ground truth: pycocotools says -1
            assert alone[0] == alone[1] == -1 and row.AP is None and row.AP50 is None
        else:
            # The same precision entries averaged in the same order: bit-equal.
            assert (row.AP, row.AP50) == (alone[0], alone[1]), row
            assert 0.05 < row.AP < row.AP50 < 1
    # The categories differ, and their mean over the categories with ground truth is the overall AP.
    aps = [row.AP for row in ours.per_class if row.AP is not None]
    assert len(set(aps)) == 3
    np.testing.assert_allclose(np.mean(aps), ours.stats[0], rtol=1e-12)
    table = ours.report()
    assert table["num_images"] == 60 and table["num_detections"] == len(results)
    assert list(table["bbox"]) == list(STAT_NAMES) and list(table["bbox"].values()) == ours.stats.tolist()


def test_faster_coco_eval_gives_pycocotools_numbers_on_random_detections():
    """300 images, about 1,800 detections. Measured over 15 such seeds: the 12 numbers and per-class AP are equal
    bit for bit; entries of the precision array differ by at most 2.2e-16 (pycocotools' tp / (tp + fp + eps) with
    eps = np.spacing(1) gives 0.9999999999999998 where faster-coco-eval gives 1.0), and on other data (the
    benchmark's) the means do differ, by up to 2.2e-16: the tolerance is 1e-15, absolute."""
    rng = np.random.default_rng(1)
    coco = _random_coco(rng, num_images=300)
    detections = _random_detections(rng, coco)
    slow, fast = _evaluated(coco, detections), _evaluated(coco, detections, "faster-coco-eval")
    # Ours against pycocotools called directly.
    np.testing.assert_array_equal(slow.stats, _pycocotools(coco, _result_dicts(detections)).stats)
    np.testing.assert_allclose(fast.stats, slow.stats, rtol=0, atol=1e-15)
    assert 0.1 < slow.stats[0] < slow.stats[1] < 1 and slow.num_detections > 1500
    for a, b in zip(slow.per_class, fast.per_class):
        assert (a.id, a.name) == (b.id, b.name)
        if a.AP is None:
            assert b.AP is None and b.AP50 is None
        else:
            np.testing.assert_allclose([b.AP, b.AP50], [a.AP, a.AP50], rtol=0, atol=1e-15)
    precision_slow, precision_fast = slow.coco_eval.eval["precision"], fast.coco_eval.eval["precision"]
    assert precision_slow.shape == precision_fast.shape == (10, 101, 4, 4, 3)
    np.testing.assert_allclose(precision_fast, precision_slow, rtol=0, atol=3e-16)
    # The summary is pycocotools' 12 lines, whichever ran.
    assert slow.summary.splitlines()[0] == fast.summary.splitlines()[0]
    assert len(fast.summary.splitlines()) == 12


def test_eval_pth_holds_the_official_arrays_whichever_evaluator_ran(tmp_path):
    rng = np.random.default_rng(2)
    coco = _random_coco(rng, num_images=20)
    detections = _random_detections(rng, coco)
    reference = _pycocotools(coco, _result_dicts(detections))
    for evaluator in ("pycocotools", "faster-coco-eval"):
        ours = _evaluated(coco, detections, evaluator)
        ours.save(tmp_path / "eval.json", [tmp_path / "eval.pth"], {"test_loss": 1.5})
        saved = torch.load(tmp_path / "eval.pth", weights_only=False)
        assert list(saved) == ["params", "counts", "date", "precision", "recall", "scores"]
        assert isinstance(saved["params"], Params) and saved["params"].catIds == [1, 3, 7, 9]
        assert saved["params"].imgIds == list(range(1, 21)) and saved["counts"] == [10, 101, 4, 4, 3]
        np.testing.assert_allclose(saved["precision"], reference.eval["precision"], rtol=0, atol=3e-16)
        np.testing.assert_array_equal(saved["recall"], reference.eval["recall"])
        written = json.loads((tmp_path / "eval.json").read_text())
        assert written["test_loss"] == 1.5 and written["evaluator"] == evaluator
        assert written["per_class"][3] == {"id": 9, "name": "unseen", "AP": None, "AP50": None}
        assert official_eval_dict(ours.coco_eval)["params"].iouThrs.tolist() == reference.params.iouThrs.tolist()


def test_asking_for_faster_coco_eval_without_it_is_one_line_saying_how_to_install(tmp_path):
    # The package made unimportable, as on a machine without it; the check runs before any work.
    code = ("import sys; sys.modules['faster_coco_eval'] = None; from deformable_detr.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "train", "--train_images", str(tmp_path), "--train_json",
                             str(tmp_path / "t.json"), "--val_images", str(tmp_path), "--val_json",
                             str(tmp_path / "v.json"), "--evaluator", "faster-coco-eval", "--output_dir",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("ddetr train: --evaluator faster-coco-eval needs the faster-coco-eval package: "
                                     "pip install faster-coco-eval (or pip install 'deformable-detr[faster-eval]')")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- two gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(workdir: Path) -> None:
    """One rank: its share of the images (rank 1 also gets rank 0's first image, as a padded sampler gives it),
    then synchronize and summarize; writes what it saw and how often COCOeval.evaluate ran here."""
    from deformable_detr.training.distributed import init_distributed

    calls = []
    original = COCOeval.evaluate
    COCOeval.evaluate = lambda self: (calls.append(1), original(self))[1]
    info = init_distributed(device="cpu")
    data = torch.load(workdir / "data.pt", weights_only=False)
    coco = COCO()
    coco.dataset = data["coco"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    ids = sorted(data["detections"])
    share = ids[info.rank::2] + ([ids[0]] if info.rank == 1 else [])
    evaluator = CocoEvaluator(coco)
    evaluator.update({i: data["detections"][i] for i in share})
    evaluator.synchronize_between_processes()
    held = len(evaluator.results)
    evaluator.summarize()
    (workdir / f"rank{info.rank}.json").write_text(json.dumps({
        "evaluate_calls": len(calls), "stats": evaluator.stats.tolist(), "held_after_sync": held,
        "per_class": evaluator.report()["per_class"], "has_coco_eval": evaluator.coco_eval is not None}))
    if info.enabled:
        # Leave together and tear the group down: a gloo process group left to interpreter exit can abort there.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def test_two_processes_run_cocoeval_once_on_rank_0_and_both_report_the_single_process_numbers(tmp_path):
    rng = np.random.default_rng(3)
    coco = _random_coco(rng, num_images=40)
    detections = _random_detections(rng, coco)
    torch.save({"coco": coco.dataset, "detections": detections}, tmp_path / "data.pt")
    single = _evaluated(coco, detections)

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, __file__, str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (zero["evaluate_calls"], one["evaluate_calls"]) == (1, 0)
    assert (zero["has_coco_eval"], one["has_coco_eval"]) == (True, False)
    # Every detection reached rank 0 once (the image both ranks saw counted once); rank 1 kept none.
    assert zero["held_after_sync"] == single.num_detections and one["held_after_sync"] == 0
    assert zero["stats"] == one["stats"] == single.stats.tolist()
    assert zero["per_class"] == one["per_class"] == single.report()["per_class"]


# ------------------------------------------------------------------------------------------ the user's path


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@pytest.mark.slow  # trains a tiny model for one epoch, then evaluates it: two ddetr processes
def test_ddetr_eval_prints_the_per_class_table_and_writes_what_it_printed(tmp_path):
    from helpers.tiny import TINY_MODEL_FLAGS, TINY_RUN_FLAGS, data_flags, user_environment

    from deformable_detr.data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_train=8, num_val=6, image_size=64, seed=0,
                                  colour_by_class=True)

    def ddetr(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(["ddetr", *args], capture_output=True, text=True, env=user_environment(),
                                cwd=tmp_path, timeout=600)
        assert result.returncode == 0, f"ddetr {' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    ddetr("train", *TINY_MODEL_FLAGS, *TINY_RUN_FLAGS, *data_flags(data), "--epochs", "1", "--lr", "1e-3",
          "--output_dir", "run", "--no_progress")
    # The official layout of ddetr train: run/eval/latest.pth, and 000.pth (epoch 0 is a multiple of 50).
    trained = torch.load(tmp_path / "run" / "eval" / "latest.pth", weights_only=False)
    assert (tmp_path / "run" / "eval" / "000.pth").is_file()
    log = json.loads((tmp_path / "run" / "log.txt").read_text().splitlines()[-1])

    printed = ddetr("eval", "run/checkpoint.pth", "--output_dir", "out", "--no_progress",
                    "--evaluator", "faster-coco-eval").stdout
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    # The 12 numbers as printed (pycocotools' summary lines, 3 decimals) are the ones written.
    shown = [float(v) for v in re.findall(r"^ Average .*= (-?[0-9.]+)$", printed, flags=re.M)]
    assert len(shown) == 12 and shown == [round(v, 3) for v in written["test_coco_eval_bbox"]]
    assert list(written["bbox"].values()) == written["test_coco_eval_bbox"]
    # The same model and data as the training run's evaluation, with the other evaluator: the same numbers.
    np.testing.assert_allclose(written["test_coco_eval_bbox"], log["test_coco_eval_bbox"], rtol=0, atol=1e-15)
    assert written["evaluator"] == "faster-coco-eval" and written["num_images"] == 6
    # Top-100 per image over queries x classes: the tiny model's 10 queries x (largest category id + 1) logits.
    largest_id = max(c["id"] for c in json.loads(data.val_json.read_text())["categories"])
    assert written["num_detections"] == 6 * min(100, 10 * (largest_id + 1))
    assert max(written["test_coco_eval_bbox"]) > 0  # the model did find something
    # The per-class table: one line per category, sorted by id, the written AP and AP50 to 3 decimals.
    table = printed.split("per-class AP")[1].splitlines()[2:]
    categories = json.loads(data.val_json.read_text())["categories"]
    assert len(table) == len(categories) == len(written["per_class"])
    for line, row, category in zip(table, written["per_class"], sorted(categories, key=lambda c: c["id"])):
        assert (row["id"], row["name"]) == (category["id"], category["name"])
        assert line.split() == [str(row["id"]), row["name"], _shown(row["AP"]), _shown(row["AP50"])]
    saved = torch.load(tmp_path / "out" / "eval.pth", weights_only=False)
    np.testing.assert_allclose(saved["precision"], trained["precision"], rtol=0, atol=3e-16)


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
