"""One training step of a tiny model on a fixed global batch of 4 images, in this process alone or as one rank of
a gloo process group (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the environment), each rank taking its share of
the batch. Rank 0 writes the weights before and after the step to the path given as argument."""

from __future__ import annotations

import sys

import torch

from deformable_detr import build_model
from deformable_detr.training.distributed import init_distributed
from deformable_detr.training.engine import train_one_epoch
from deformable_detr.training.optimizer import build_optimizer


def global_batch() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    mask = torch.zeros(4, 64, 64, dtype=torch.bool)
    targets = []
    # Unequal box counts per rank (3 and 4), so the loss normaliser must be averaged across processes.
    for count in (2, 1, 0, 4):  # one image without objects
        centres = 0.25 + 0.5 * torch.rand(count, 2, generator=generator)
        sizes = 0.1 + 0.2 * torch.rand(count, 2, generator=generator)
        targets.append({"boxes": torch.cat([centres, sizes], 1),
                        "labels": torch.randint(1, 5, (count,), generator=generator)})
    return images, mask, targets


def main(out: str) -> None:
    info = init_distributed("env://", "cpu")
    torch.manual_seed(0)
    model, criterion, _ = build_model("box_refine", num_classes=5, backbone="resnet18", hidden_dim=32, nheads=4,
                                      enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=10, dropout=0.0)
    optimizer = build_optimizer(model, lr=0.1, lr_backbone=0.1, sgd=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model)
    images, mask, targets = global_batch()
    share = slice(info.rank * 4 // info.world_size, (info.rank + 1) * 4 // info.world_size)
    batch = [(images[share], mask[share], targets[share])]
    train_one_epoch(model, criterion, batch, optimizer, torch.device("cpu"), epoch=0, max_norm=0.1, progress=False)
    if info.is_main:
        after = (model.module if info.enabled else model).state_dict()
        torch.save({"before": before, "after": after}, out)


if __name__ == "__main__":
    main(sys.argv[1])
