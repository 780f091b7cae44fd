"""Progress reports of the training and evaluation loops (a bar on a terminal, log lines elsewhere) and the notice the
Numba CPU kernels print while they are prepared."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
import torch
from pycocotools.coco import COCO

from deformable_detr import build_model
from deformable_detr.training.engine import evaluate, train_one_epoch
from deformable_detr.training.optimizer import build_optimizer
from deformable_detr.training.progress import Progress
from tests.conftest import REPO_ROOT

# A per-iteration line: "epoch 3 [2/5]  eta 0:00:01  loss 2.000 (avg 1.500)  ...  12.34 it/s  mem 812 MiB".
LINE = re.compile(
    r"^(?P<description>.+?) \[\s*(?P<iteration>\d+)/(?P<total>\d+)\]  eta (?P<eta>\d+:\d\d:\d\d)  "
    r"loss (?P<loss>[\d.]+) \(avg (?P<avg>[\d.]+)\)(?P<rest>.*)$"
)
SPEED = re.compile(r"  (?P<value>\d+\.\d\d) (?P<unit>it/s|s/it)(  |$)")
MEMORY = re.compile(r"  mem (\d+) MiB$")


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _run(progress: Progress, losses: list[float]) -> None:
    with progress:
        for loss in losses:
            progress.update(loss, lr=2e-4, terms={"loss_ce": loss / 2, "loss_bbox": 0.35, "loss_giou": 0.77})


def _iteration_lines(text: str) -> list[re.Match]:
    return [match for match in map(LINE.match, text.splitlines()) if match]


def test_lines_on_a_non_terminal_stream() -> None:
    stream = io.StringIO()
    progress = Progress("epoch 3", 5, print_freq=2, stream=stream)
    assert progress.mode == "lines"
    _run(progress, [1.0, 2.0, 3.0, 4.0, 5.0])
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 4  # iterations 2 and 4 (print_freq), 5 (the last), then the summary
    matches = _iteration_lines(stream.getvalue())
    assert [m["iteration"] for m in matches] == ["2", "4", "5"]
    assert {m["description"] for m in matches} == {"epoch 3"} and {m["total"] for m in matches} == {"5"}
    assert [float(m["loss"]) for m in matches] == [2.0, 4.0, 5.0]
    assert [float(m["avg"]) for m in matches] == [1.5, 2.5, 3.0]
    for match in matches:
        hours, minutes, seconds = map(int, match["eta"].split(":"))
        assert minutes < 60 and seconds < 60
        rest = match["rest"]
        for field in ("  loss_ce ", "  loss_bbox 0.350", "  loss_giou 0.770", "  lr 2.0e-04"):
            assert field in rest
        speed = SPEED.search(rest)
        assert speed is not None and float(speed["value"]) > 0
        assert MEMORY.search(rest) is not None and int(MEMORY.search(rest)[1]) > 0
    assert matches[0]["rest"].startswith("  loss_ce 1.000  loss_bbox")  # the terms in the order given
    assert matches[-1]["eta"] == "0:00:00"
    assert lines[-1].startswith("epoch 3 done: 5 it in ") and lines[-1].endswith("loss avg 3.000")


def test_print_freq_zero_prints_no_iteration_line() -> None:
    stream = io.StringIO()
    _run(Progress("epoch 0", 5, print_freq=0, stream=stream), [1.0] * 5)
    lines = stream.getvalue().splitlines()
    assert _iteration_lines(stream.getvalue()) == []
    assert len(lines) == 1 and lines[0].startswith("epoch 0 done: 5 it in ")


def test_no_bar_on_a_terminal_writes_lines() -> None:
    stream = FakeTerminal()
    progress = Progress("eval", 4, bar=False, print_freq=2, stream=stream)
    assert progress.mode == "lines"
    _run(progress, [1.0] * 4)
    assert "\r" not in stream.getvalue()
    assert [m["iteration"] for m in _iteration_lines(stream.getvalue())] == ["2", "4"]


def test_bar_on_a_terminal() -> None:
    stream = FakeTerminal()
    progress = Progress("epoch 1", 4, print_freq=1, stream=stream)
    assert progress.mode == "bar"
    _run(progress, [1.0, 2.0, 3.0, 4.0])
    text = stream.getvalue()
    assert "\r" in text  # tqdm redraws
    assert "epoch 1" in text and "4/4" in text and "loss=4.000" in text and "lr=2.0e-04" in text
    assert _iteration_lines(text) == [] and " done: " not in text


def test_unknown_total_quiet_and_errors() -> None:
    stream = io.StringIO()
    _run(Progress("eval", None, print_freq=1, stream=stream), [1.0, 3.0])
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("eval [1]  loss 1.000 (avg 1.000)") and "eta" not in stream.getvalue()
    assert lines[1].startswith("eval [2]  loss 3.000 (avg 2.000)")

    quiet = io.StringIO()
    _run(Progress("epoch 0", 3, print_freq=1, stream=quiet, quiet=True), [1.0] * 3)
    assert quiet.getvalue() == ""

    # An error inside the loop ends the report without the summary line (the epoch did not complete).
    failed = io.StringIO()
    with pytest.raises(RuntimeError), Progress("epoch 0", 3, print_freq=1, stream=failed) as progress:
        progress.update(1.0)
        raise RuntimeError("boom")
    assert len(failed.getvalue().splitlines()) == 1 and " done: " not in failed.getvalue()

    with pytest.raises(ValueError, match="print_freq"):
        Progress("epoch 0", 3, print_freq=-1)


def _tiny_setup(num_batches: int):
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(
        "box_refine", num_classes=5, backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
        dim_feedforward=64, num_queries=10,
    )
    generator = torch.Generator().manual_seed(1)
    batches = []
    # Two images per batch.
    for index in range(num_batches):
        targets = []
        for image in range(2):
            boxes = torch.cat([0.3 + 0.4 * torch.rand(2, 2, generator=generator),
                               0.1 + 0.2 * torch.rand(2, 2, generator=generator)], 1)
            targets.append({"boxes": boxes, "labels": torch.tensor([1 + index % 4, 2]),
                            "image_id": torch.tensor(2 * index + image + 1), "orig_size": torch.tensor([64, 64])})
        batches.append((torch.randn(2, 3, 64, 64, generator=generator), torch.zeros(2, 64, 64, dtype=torch.bool),
                        targets))
    return model, criterion, postprocessors, batches


def test_train_one_epoch_writes_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    model, criterion, _, batches = _tiny_setup(3)
    optimizer = build_optimizer(model)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    stats = train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), epoch=2, progress=True,
                            print_freq=2)
    # StringIO is no terminal: lines, not a bar, even with progress=True. The Numba notice may share the stream.
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("epoch 2")]
    matches = _iteration_lines("\n".join(lines))
    assert [m["iteration"] for m in matches] == ["2", "3"] and {m["total"] for m in matches} == {"3"}
    for match in matches:
        assert re.search(r"  loss_ce [\d.]+  loss_bbox [\d.]+  loss_giou [\d.]+  lr 2\.0e-04  ", match["rest"])
        assert SPEED.search(match["rest"]) and MEMORY.search(match["rest"])
    assert float(matches[-1]["avg"]) == pytest.approx(stats["loss"], abs=1e-3)
    assert len(lines) == 3 and lines[-1].startswith("epoch 2 done: 3 it in ")
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "lr", "grad_norm"} <= set(stats)


def test_evaluate_writes_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    model, criterion, postprocessors, batches = _tiny_setup(4)
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i + 1, "width": 64, "height": 64, "file_name": f"{i}.jpg"} for i in range(8)],
        "annotations": [{"id": i + 1, "image_id": i + 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0,
                         "category_id": 1} for i in range(8)],
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 5)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    stream = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stream)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' summary
        stats, _ = evaluate(model, criterion, postprocessors, batches, coco, torch.device("cpu"), progress=False,
                            print_freq=3)
    # progress=False on a terminal: lines, no bar.
    text = "\n".join(line for line in stream.getvalue().splitlines() if line.startswith("eval"))
    assert "\r" not in text
    matches = _iteration_lines(text)
    assert [m["iteration"] for m in matches] == ["3", "4"] and {m["description"] for m in matches} == {"eval"}
    assert all("  lr " not in m["rest"] for m in matches)  # no learning rate in evaluation
    assert float(matches[-1]["avg"]) == pytest.approx(stats["loss"], abs=1e-3)
    assert len(stats["coco_eval_bbox"]) == 12


NOTICE_SCRIPT = """
import torch
from deformable_detr.ops import ms_deform_attn

value = torch.rand(1, 20, 2, 8, requires_grad=True)
locations = torch.rand(1, 6, 2, 2, 2, 2)
weights = torch.rand(1, 6, 2, 2, 2)
for _ in range(2):
    output = ms_deform_attn(value, [(4, 4), (2, 2)], torch.tensor([0, 16]), locations, weights, backend="cpu")
    output.sum().backward()
print("done")
"""


@pytest.mark.slow  # compiles the kernels from scratch in a fresh process
def test_numba_notice_printed_once(tmp_path) -> None:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", NOTICE_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    lines = result.stderr.splitlines()
    preparing = [i for i, line in enumerate(lines) if line.startswith("deformable attention: preparing the Numba")]
    ready = [i for i, line in enumerate(lines) if re.fullmatch(
        r"deformable attention: Numba CPU kernels ready in \d+\.\d s", line)]
    assert len(preparing) == 1 and len(ready) == 1 and preparing[0] < ready[0], result.stderr
    assert "compiled on first use, then loaded from the cache" in lines[preparing[0]]
    assert any(tmp_path.iterdir())  # the kernels went to the (empty) cache directory given
