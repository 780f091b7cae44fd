"""``ddetr plot OUTPUT_DIR``: loss and AP curves from ``log.txt`` (one JSON line per epoch) to a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


# Above the largest AP / AP50 plotted, the AP axis leaves this fraction of it as headroom (a fixed [0, 1] axis drew the
# few-percent APs of early epochs and small data sets as a flat line at the bottom).
AP_HEADROOM = 0.15
# The AP axis of a run whose APs are all 0 (or absent) still spans a visible range; AP never exceeds 1, so the axis
# need not go much beyond.
MIN_AP_TOP = 0.01
MAX_AP_TOP = 1.05


def build_figure(output_dirs: list[str | Path]) -> Figure:
    """The figure ``plot_logs`` saves: three axes (weighted total loss, the main unweighted loss terms, COCO AP and
    AP50) against the epoch, one set of lines per run in ``output_dirs``. Every line has markers, so that a run of
    one epoch (one point) shows; epoch ticks are integers; the AP axis spans 0 to a bit above the largest AP / AP50.
    The caller closes it (``matplotlib.pyplot.close``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [(Path(d), read_log(Path(d) / "log.txt")) for d in output_dirs]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ap_values: list[float] = []
    for directory, entries in runs:
        name = directory.name or str(directory)
        epochs = [e["epoch"] for e in entries]
        axes[0].plot(epochs, [e.get("train_loss") for e in entries], "o-", markersize=4, label=f"{name} train")
        tested = [e for e in entries if "test_loss" in e]
        if tested:
            axes[0].plot([e["epoch"] for e in tested], [e["test_loss"] for e in tested], "s--", markersize=4,
                         label=f"{name} test")
        for term, marker in (("loss_ce", "o-"), ("loss_bbox", "s-"), ("loss_giou", "^-")):
            axes[1].plot(epochs, [e.get(f"train_{term}_unscaled") for e in entries], marker, markersize=4,
                         label=f"{name} {term}")
        evaluated = [e for e in entries if "test_coco_eval_bbox" in e]
        if evaluated:
            ap = [e["test_coco_eval_bbox"][0] for e in evaluated]
            ap50 = [e["test_coco_eval_bbox"][1] for e in evaluated]
            axes[2].plot([e["epoch"] for e in evaluated], ap, "o-", markersize=4, label=f"{name} AP")
            axes[2].plot([e["epoch"] for e in evaluated], ap50, "s--", markersize=4, label=f"{name} AP50")
            ap_values.extend(ap + ap50)
    for axis, title in zip(axes, ("weighted total loss", "loss terms (unweighted, final layer)", "COCO bbox AP")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        # min_n_ticks=1: the default (2) falls back to fractional ticks when the view holds one integer (one epoch).
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    # pycocotools reports -1 where there is nothing to evaluate: such entries do not stretch the axis.
    largest = max((value for value in ap_values if value is not None and value >= 0), default=0.0)
    axes[2].set_ylim(0, min(max(largest * (1 + AP_HEADROOM), MIN_AP_TOP), MAX_AP_TOP))
    figure.tight_layout()
    return figure


def plot_logs(output_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Draws train/test loss, the main loss terms and COCO AP / AP50 per epoch for each run (see ``build_figure``)
    into ``out`` (default: ``curves.png`` in the first run's directory); returns the PNG path."""
    figure = build_figure(output_dirs)
    import matplotlib.pyplot as plt  # after build_figure has chosen the Agg backend

    out = Path(out) if out else Path(output_dirs[0]) / "curves.png"
    try:
        figure.savefig(out, dpi=110)
    finally:
        plt.close(figure)
    return out
