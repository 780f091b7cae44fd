"""One training epoch and one evaluation pass: the official loops, with AMP and progress reports (a bar on a terminal,
log lines elsewhere: see ``progress.py``)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from pycocotools.coco import COCO
from torch import Tensor, nn

from deformable_detr.loss.criterion import SetCriterion
from deformable_detr.training.distributed import is_main_process, reduce_dict
from deformable_detr.training.evaluation import CocoEvaluator
from deformable_detr.training.progress import Progress

if TYPE_CHECKING:
    from deformable_detr.training.ema import ModelEMA

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The loss terms a progress line shows (weighted, final decoder layer, as the official log keys); the rest of the
# official keys (auxiliary layers, unscaled terms) go to log.txt only.
PROGRESS_TERMS = ("loss_ce", "loss_bbox", "loss_giou")


class NonFiniteLossError(FloatingPointError):
    """The loss, the predictions, the gradients or the weights became inf or nan: training stops before the step
    is applied; the checkpoints already written stay as they are."""


def _non_finite_outputs(outputs: dict) -> str:
    """Which predictions hold nan/inf, e.g. ``pred_boxes (1200 of 1200 values)``: the error path only."""
    found = []
    for name in ("pred_logits", "pred_boxes"):
        bad = int((~torch.isfinite(outputs[name])).sum())
        if bad:
            found.append(f"{name} ({bad} of {outputs[name].numel()} values)")
    return ", ".join(found) or "none of pred_logits, pred_boxes (an auxiliary or encoder output)"


def _stop(what: str, epoch: int, iteration: int, logs: dict[str, float] | None = None) -> NonFiniteLossError:
    terms = f" Loss terms: { {k: round(v, 4) for k, v in logs.items()} }" if logs else ""
    return NonFiniteLossError(
        f"{what} at epoch {epoch}, iteration {iteration}: the model diverged (try a lower --lr, or "
        f"--clip_max_norm); training stopped before this step was applied, the checkpoints written so far are "
        f"intact.{terms}")


class DivergenceGuard:
    """Recognises a loss that explodes while staying finite: a step whose loss exceeds ``factor`` times the median
    loss of the run's first ``warmup`` steps (of fewer while fewer were taken). The reference is this run's own:
    a resumed or fine-tuned run measures it again from its first steps. ``factor`` 0: never. One guard lives for the
    whole run; in a distributed run every process sees the same (averaged) loss, so all stop together."""

    def __init__(self, factor: float = 1000.0, warmup: int = 10) -> None:
        self.factor, self.warmup = factor, warmup
        self.first_losses: list[float] = []

    def problem(self, loss: float) -> str | None:
        """Why the step of this loss must not be applied, or None."""
        if self.first_losses and self.factor:
            reference = statistics.median(self.first_losses)
            if loss > self.factor * reference:
                return (f"loss {loss:.4g} is more than {self.factor:g} times this run's starting loss "
                        f"({reference:.4g}, the median of its first {len(self.first_losses)} steps; "
                        f"--divergence_factor)")
        if len(self.first_losses) < self.warmup:
            self.first_losses.append(loss)
        return None


class EpochAverages:
    """Running averages of scalar metrics over an epoch (the official logs report these global averages)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.sums[name] += float(value)
            self.counts[name] += 1

    def averages(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


def _to_device(images: Tensor, mask: Tensor, targets: list[dict[str, Tensor]], device: torch.device):
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
               for t in targets]
    return images.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets


def _length(data_loader: Iterable) -> int | None:
    """The number of batches, where the loader knows it (a DataLoader, a list); None for a plain iterable."""
    try:
        return len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _float_outputs(outputs) -> dict:
    """The detector's outputs in float32, so that the loss is computed in full precision under AMP."""
    def cast(x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.float() for k, v in x.items()}

    result = {"pred_logits": outputs["pred_logits"].float(), "pred_boxes": outputs["pred_boxes"].float()}
    if "aux_outputs" in outputs:
        result["aux_outputs"] = [cast(aux) for aux in outputs["aux_outputs"]]
    if "enc_outputs" in outputs and outputs["enc_outputs"] is not None:
        result["enc_outputs"] = cast(outputs["enc_outputs"])
    return result


def _loss_logs(criterion: SetCriterion, losses: dict[str, Tensor]) -> tuple[float, dict[str, float]]:
    """The official log entries: the weighted total, each weighted term, each raw term as ``<name>_unscaled``,
    ``class_error``; averaged over processes."""
    reduced = reduce_dict(losses)
    scaled = {k: v * criterion.weight_dict[k] for k, v in reduced.items() if k in criterion.weight_dict}
    total = sum(scaled.values())
    # One read of everything (each value as its own .item() would give it), not one device wait per term.
    names = ["loss", *scaled, *(f"{k}_unscaled" for k in reduced), "class_error"]
    values = torch.stack([total, *scaled.values(), *reduced.values(), reduced["class_error"]]).float().tolist()
    logs = dict(zip(names, values))
    return logs.pop("loss"), logs


def train_one_epoch(model: nn.Module, criterion: SetCriterion, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, max_norm: float = 0.1, amp: str | None = None,
                    scaler: torch.amp.GradScaler | None = None, progress: bool = True,
                    print_freq: int = 10, divergence: DivergenceGuard | None = None,
                    ema: ModelEMA | None = None) -> dict[str, float]:
    """One pass over ``data_loader`` (batches of (images, mask, targets)); returns the epoch averages of the
    official log keys (``loss``, ``loss_ce``, ..., ``class_error``, ``lr``, ``grad_norm``).

    A step stops with :class:`NonFiniteLossError`, before it is applied, when the predictions, the loss or (without
    a gradient scaler) the gradients are nan/inf, or when ``divergence`` says the loss exploded.

    Progress goes to stderr on the main process: with ``progress`` a bar when stderr is a terminal, else (or without
    ``progress``) a line every ``print_freq`` iterations (0: none) and at the last, then a summary line.

    ``ema``: updated from ``model`` after every optimizer step applied (not after one the fp16 scaler skipped)."""
    model.train()
    criterion.train()
    averages = EpochAverages()
    with Progress(f"epoch {epoch}", _length(data_loader), bar=progress, print_freq=print_freq, device=device,
                  quiet=not is_main_process()) as report:
        for iteration, (images, mask, targets) in enumerate(data_loader):
            images, mask, targets = _to_device(images, mask, targets, device)
            with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp is not None):
                outputs = model(images, mask)
            outputs = _float_outputs(outputs)
            try:
                # The matcher's input checks (which synchronise anyway) recognise nan/inf predictions.
                losses = criterion(outputs, targets)
            except FloatingPointError as error:
                raise _stop(f"non-finite predictions: {_non_finite_outputs(outputs)} ({error})", epoch,
                            iteration) from error
            loss = criterion.total_loss(losses)
            loss_value, logs = _loss_logs(criterion, losses)  # the one read of the loss per step
            if not math.isfinite(loss_value):
                raise _stop(f"loss is {loss_value}", epoch, iteration, logs)
            exploded = divergence.problem(loss_value) if divergence is not None else None
            if exploded:
                raise _stop(exploded, epoch, iteration, logs)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            parameters = [p for p in model.parameters() if p.grad is not None]
            # clip_grad_norm_ with an infinite bound still returns the norm, which the official logs report.
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf).item()
            if scaler is not None:
                scale = scaler.get_scale() if ema is not None else 0.0
                scaler.step(optimizer)  # skips a step with inf/nan gradients and lowers the scale: fp16's normal
                scaler.update()
                # A fused optimizer skips on the device, with no sign on the host but the lowered scale: one read,
                # with --ema only (grad_norm's read has synchronised already before the step).
                stepped = ema is None or scaler.get_scale() >= scale
            elif not math.isfinite(grad_norm):
                raise _stop(f"the gradient norm is {grad_norm} (loss {loss_value:.4g})", epoch, iteration, logs)
            else:
                optimizer.step()
                stepped = True
            if ema is not None and stepped:
                ema.update(model)
            lr = optimizer.param_groups[0]["lr"]
            averages.update(loss=loss_value, lr=lr, grad_norm=grad_norm, **logs)
            report.update(loss_value, lr=lr, terms={k: logs[k] for k in PROGRESS_TERMS if k in logs})
    return averages.averages()


@torch.no_grad()
def evaluate(model: nn.Module, criterion: SetCriterion, postprocessors: dict[str, nn.Module], data_loader: Iterable,
             coco_gt: COCO, device: torch.device, amp: str | None = None, progress: bool = True, print_freq: int = 10,
             evaluator: str = "pycocotools") -> tuple[dict[str, float | list[float]], CocoEvaluator]:
    """Losses and COCO bbox AP over ``data_loader``; returns the official log entries (``loss``, ...,
    ``coco_eval_bbox``: the 12 COCO numbers) and the evaluator (its ``summary`` is pycocotools' table, its
    ``per_class`` the per-class AP). ``evaluator``: pycocotools or faster-coco-eval, run on the main process only;
    the other processes send it their detections and receive its numbers.

    Progress is reported as in ``train_one_epoch``, under the name ``eval``."""
    model.eval()
    criterion.eval()
    averages = EpochAverages()
    coco_evaluator = CocoEvaluator(coco_gt, evaluator)
    with Progress("eval", _length(data_loader), bar=progress, print_freq=print_freq, device=device,
                  quiet=not is_main_process()) as report:
        for images, mask, targets in data_loader:
            images, mask, targets = _to_device(images, mask, targets, device)
            with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp is not None):
                outputs = model(images, mask)
            outputs = _float_outputs(outputs)
            losses = criterion(outputs, targets)
            loss_value, logs = _loss_logs(criterion, losses)
            averages.update(loss=loss_value, **logs)
            original_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
            detections = postprocessors["bbox"](outputs, original_sizes)
            coco_evaluator.update({int(t["image_id"]): d for t, d in zip(targets, detections)})
            report.update(loss_value, terms={k: logs[k] for k in PROGRESS_TERMS if k in logs})
    coco_evaluator.synchronize_between_processes()
    stats: dict[str, float | list[float]] = dict(averages.averages())
    stats["coco_eval_bbox"] = coco_evaluator.summarize().tolist()
    return stats, coco_evaluator
