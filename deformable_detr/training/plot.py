"""``ddetr plot OUTPUT_DIR``: loss and AP curves from ``log.txt`` (one JSON line per epoch) to a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    """The epochs of a log.txt; a malformed line is an error naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (ddetr train writes OUTPUT_DIR/log.txt)")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a JSON object ({error})") from error
    if not entries:
        raise ValueError(f"{path}: no epoch logged yet")
    return entries


def plot_logs(output_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Draws train/test loss, the main loss terms and COCO AP / AP50 per epoch for each run; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_log(Path(d) / "log.txt")) for d in output_dirs]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for directory, entries in runs:
        name = directory.name or str(directory)
        epochs = [e["epoch"] for e in entries]
        axes[0].plot(epochs, [e.get("train_loss") for e in entries], label=f"{name} train")
        tested = [e for e in entries if "test_loss" in e]
        if tested:
            axes[0].plot([e["epoch"] for e in tested], [e["test_loss"] for e in tested], "o--", label=f"{name} test")
        for term in ("loss_ce", "loss_bbox", "loss_giou"):
            axes[1].plot(epochs, [e.get(f"train_{term}_unscaled") for e in entries], label=f"{name} {term}")
        evaluated = [e for e in entries if "test_coco_eval_bbox" in e]
        if evaluated:
            axes[2].plot([e["epoch"] for e in evaluated], [e["test_coco_eval_bbox"][0] for e in evaluated], "o-",
                         label=f"{name} AP")
            axes[2].plot([e["epoch"] for e in evaluated], [e["test_coco_eval_bbox"][1] for e in evaluated], "s--",
                         label=f"{name} AP50")
    for axis, title in zip(axes, ("weighted total loss", "loss terms (unweighted, final layer)", "COCO bbox AP")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[2].set_ylim(0, 1)
    figure.tight_layout()
    out = Path(out) if out else runs[0][0] / "curves.png"
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
