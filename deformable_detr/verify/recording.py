"""What a verify run records after its losses, the same for every model file: the gradients the reference lists,
the gradient norms of the trainable parameters, and the post-processed detections."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from deformable_detr.verify.comparison import ReferenceFileError


def to_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def record_losses(computed: dict[str, np.ndarray], criterion: nn.Module, losses: dict[str, Tensor],
                  targets: list[dict], device: torch.device) -> Tensor:
    """``loss.*`` of the reference (each loss, the weighted total, the key lists, the averaged box count) written into
    ``computed``; returns the weighted total, for the backward."""
    total = criterion.total_loss(losses)
    for key, value in losses.items():
        computed[f"loss.{key}"] = np.float32(value.item())
    computed["loss.total"] = np.float32(total.item())
    computed["loss.keys"] = np.array(list(losses))
    computed["loss.weighted_keys"] = np.array([k for k in losses if k in criterion.weight_dict])
    computed["loss.num_boxes"] = np.float32(criterion.average_num_boxes(targets, device))
    return total


def record_gradients_and_detections(computed: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                                    model: nn.Module, outputs: dict, postprocessors: dict[str, nn.Module],
                                    variant: str, device: torch.device) -> None:
    """After the backward: ``grad.<name>`` for each name of the reference's ``grad.names`` (tied names included),
    ``gradnorm.*`` over the trainable parameters, and ``post.<b>.*`` of the ``bbox`` post-processor at the reference's
    ``post.target_sizes``; written into ``computed``."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for name in (str(n) for n in reference["grad.names"]):
        if name not in parameters:
            raise ReferenceFileError(f"grad.names lists {name!r}, which is not a parameter of the {variant} model")
        grad = parameters[name].grad
        computed[f"grad.{name}"] = to_numpy(grad) if grad is not None else np.zeros(tuple(parameters[name].shape),
                                                                                      np.float32)
    computed["grad.names"] = np.array([str(n) for n in reference["grad.names"]])
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    computed["gradnorm.names"] = np.array([n for n, _ in trainable])
    norms = [p.grad.detach().norm(2) if p.grad is not None else torch.zeros((), device=device)
             for _, p in trainable]
    computed["gradnorm.values"] = np.array([n.item() for n in norms], dtype=np.float64)
    computed["gradnorm.total"] = np.float32(torch.norm(torch.stack(norms), 2).item())

    target_sizes = torch.from_numpy(reference["post.target_sizes"]).to(device)
    computed["post.target_sizes"] = to_numpy(target_sizes)
    for b, result in enumerate(postprocessors["bbox"](outputs, target_sizes)):
        for key in ("scores", "labels", "boxes"):
            computed[f"post.{b}.{key}"] = to_numpy(result[key])
