"""``ddetr verify`` of the DETR reference files (``detr.npz``, ``detr_dc5.npz``, made by facebookresearch/detr):
the same procedure as the Deformable DETR files (ddetr-init-v1 weights, eval mode, forward, criterion, backward of
the weighted total, post-processing), compared with the tolerances of ``DETR_README.md``.

Under ddetr-init-v1 DETR's 100 queries are nearly identical, so some matcher calls are decided by cost differences
near float32 noise. As the README recommends, the losses and gradients are computed with the reference's stored
assignments (so they are checked independently of the matching), and the matcher is checked on its own: our
assignment must equal the stored one in every call whose margin (second-best minus best total cost, on the stored
cost matrix) is at least :data:`FRAGILE_MARGIN`; in a call below it, another assignment passes when its total cost on
the stored matrix is within :data:`FRAGILE_MARGIN` of the stored optimum.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from deformable_detr.loss.matcher import HungarianMatcher, Indices
from deformable_detr.model.build import build_model
from deformable_detr.verify.comparison import Check, ReferenceFileError, exact, max_rel, rel_l2, require
from deformable_detr.verify.recording import record_gradients_and_detections, record_losses
from deformable_detr.verify.recording import to_numpy as _numpy
from deformable_detr.verify.reference_init import apply_ddetr_init_v1

DETR_VARIANTS = ("detr", "detr_dc5")

# DETR_README.md "Suggested checks for an independent float32 re-implementation".
OUTPUT_REL_TOL = 1e-5
LOSS_REL_TOL = 2e-6
LOSS_TOTAL_REL_TOL = 5e-7
GRAD_TOLERANCES = {"backbone": (0.02, 0.003), "transformer": (0.005, 0.0005), "heads": (1e-5, 1e-5)}
GRADNORM_REL_TOL = 3e-4
# The exact gradient of decoder layer 0's self-attention in_proj_weight is 0 (its input is all zeros): only tiny.
ZERO_GRADIENT = "transformer.decoder.layers.0.self_attn.in_proj_weight"
ZERO_GRADIENT_REL = 1e-6
POST_SCORE_ABS_TOL = 1e-6
FRAGILE_MARGIN = 1e-5
HEAD_PREFIXES = ("class_embed.", "bbox_embed.", "transformer.decoder.norm.")


def _stats(tensor: torch.Tensor) -> np.ndarray:
    """[sum, sum|x|, sum x^2, min, max] in float64, as the reference's ``stats`` vectors."""
    x = tensor.detach().double()
    return np.array([x.sum().item(), x.abs().sum().item(), (x * x).sum().item(), x.min().item(), x.max().item()])


class _StoredAssignments(HungarianMatcher):
    """A matcher that answers with the reference's assignments: the criterion's losses and gradients are then
    those of the official run's matching, whatever our own float32 matcher decides in the near-ties."""

    def __init__(self, matcher: HungarianMatcher, layers: list[Indices]) -> None:
        super().__init__(matcher.cost_class, matcher.cost_bbox, matcher.cost_giou, class_cost=matcher.class_cost)
        self.layers = layers

    @torch.no_grad()
    def match_layers(self, layers) -> list[Indices]:
        self.host_cost_matrices(layers)  # the same input checks as the real matcher
        if len(layers) != len(self.layers):
            raise ReferenceFileError(f"the criterion matched {len(layers)} layers, the file has {len(self.layers)}")
        return self.layers


def _stored_indices(reference: dict[str, np.ndarray], prefix: str, batch: int) -> Indices:
    require(reference, [f"{prefix}.{b}.{k}" for b in range(batch) for k in ("src", "tgt")], "matcher indices")
    return [(torch.from_numpy(reference[f"{prefix}.{b}.src"]), torch.from_numpy(reference[f"{prefix}.{b}.tgt"]))
            for b in range(batch)]


@contextlib.contextmanager
def reference_summation_order(device: str) -> Iterator[None]:
    """The convolutions summed as close to the reference's order as the device allows, for the duration. On the CPU
    one torch thread, as the reference files were made (DETR_README.md "torch threads: 1"). The backbone's weight
    gradients are sums over every pixel, whose float32 rounding depends on how they are split: with 2 threads they
    moved by up to 8e-4 relative (gradnorm of layer2.2.conv1, detr.npz), beyond the README's 3e-4, while one thread
    reproduces the reference to its own float32-vs-float64 deviation (5.8e-4 rel-l2 for layer2.0.conv1, as the
    README's table). On CUDA, PyTorch's own convolutions instead of cuDNN's: on an H200 cuDNN's backward (with or
    without cudnn.deterministic) gave that gradnorm at 3.8e-4 relative, PyTorch's passes every check."""
    if torch.device(device).type != "cpu":
        with torch.backends.cudnn.flags(enabled=False):
            yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_detr_case(reference: dict[str, np.ndarray], device: str = "cpu") -> dict[str, np.ndarray]:
    """Runs the official procedure of a DETR variant file and returns every array under the file's key names
    (``match.*.src/tgt``: our matcher's assignments; losses and gradients: with the stored assignments), with one
    CPU thread, or without cuDNN on CUDA (:func:`reference_summation_order`)."""
    with reference_summation_order(device):
        return _run_detr_case(reference, device)


def _run_detr_case(reference: dict[str, np.ndarray], device: str) -> dict[str, np.ndarray]:
    require(reference, ["meta.variant", "in.images", "in.mask", "post.target_sizes", "grad.names",
                        "gradnorm.names"], "DETR variant file")
    variant = str(reference["meta.variant"])
    if variant not in DETR_VARIANTS:
        raise ReferenceFileError(f"meta.variant is {variant!r}, not one of {', '.join(DETR_VARIANTS)}")
    model, criterion, postprocessors = build_model(variant, num_classes=91)
    apply_ddetr_init_v1(model)
    model.to(device).eval()
    criterion.to(device)

    images = torch.from_numpy(reference["in.images"]).to(device)
    mask = torch.from_numpy(reference["in.mask"]).to(device)
    batch = images.shape[0]
    require(reference, [f"tgt.{b}.{k}" for b in range(batch) for k in ("boxes", "labels")], "targets")
    targets = [{"boxes": torch.from_numpy(reference[f"tgt.{b}.boxes"]).to(device),
                "labels": torch.from_numpy(reference[f"tgt.{b}.labels"]).to(device)} for b in range(batch)]
    computed: dict[str, np.ndarray] = {}
    encoder_layers: list[torch.Tensor] = []
    decoder_layers: list[torch.Tensor] = []

    def record_backbone(module, args, output) -> None:
        features, _ = output
        level_features = features[0][0]
        computed["dbg.backbone.0.shape"] = np.array(level_features.shape, dtype=np.int64)
        computed["dbg.backbone.0.stats"] = _stats(level_features)
        computed["dbg.backbone.0.px00"] = _numpy(level_features[:, :, 0, 0])

    def record_transformer_inputs(module, args) -> None:
        src, level_mask, _, pos = args[:4]
        computed["dbg.lvl.0.mask"] = _numpy(level_mask)
        computed["dbg.lvl.0.src.stats"] = _stats(src)
        computed["dbg.lvl.0.src.px00"] = _numpy(src[:, :, 0, 0])
        computed["dbg.lvl.0.pos.stats"] = _stats(pos)
        computed["dbg.lvl.0.pos.px00"] = _numpy(pos[:, :, 0, 0])

    def record_memory(module, args, output) -> None:
        computed["dbg.memory.stats"] = _stats(output)
        computed["dbg.memory.tok0_3"] = _numpy(output[:4].transpose(0, 1))  # (HW, B, C) -> (B, 4, C)

    def record_transformer_outputs(module, args, output) -> None:
        computed["dbg.hs.stats"] = np.stack([_stats(layer) for layer in output.hs])
        computed["dbg.hs.q0"] = _numpy(output.hs[:, :, 0])

    transformer = model.transformer
    hooks = [model.backbone.register_forward_hook(record_backbone),
             transformer.register_forward_pre_hook(record_transformer_inputs),
             transformer.encoder.register_forward_hook(record_memory),
             transformer.register_forward_hook(record_transformer_outputs)]
    hooks += [layer.register_forward_hook(lambda module, args, output: encoder_layers.append(output))
              for layer in transformer.encoder.layers]
    hooks += [layer.register_forward_hook(lambda module, args, output: decoder_layers.append(output))
              for layer in transformer.decoder.layers]
    try:
        outputs = model(images, mask)
    finally:
        for hook in hooks:
            hook.remove()
    computed["dbg.enc.stats"] = np.stack([_stats(x) for x in encoder_layers])
    computed["dbg.dec.raw.stats"] = np.stack([_stats(x) for x in decoder_layers])
    computed["dbg.dec.raw.q0"] = np.stack([_numpy(x[0]) for x in decoder_layers])  # (L, B, C), query 0

    computed["out.pred_logits"] = _numpy(outputs.pred_logits)
    computed["out.pred_boxes"] = _numpy(outputs.pred_boxes)
    for layer, aux in enumerate(outputs.aux_outputs):
        computed[f"out.aux.{layer}.pred_logits"] = _numpy(aux["pred_logits"])
        computed[f"out.aux.{layer}.pred_boxes"] = _numpy(aux["pred_boxes"])

    # Our matcher's assignments and cost matrices, per call, in the official order (final layer, then aux layers).
    calls = [("match", outputs)] + [(f"match.aux.{j}", aux) for j, aux in enumerate(outputs.aux_outputs)]
    matcher = criterion.matcher
    for (prefix, call_outputs), call_indices, costs in zip(
            calls, matcher.match_layers([(o, targets) for _, o in calls]),
            matcher.host_cost_matrices([(o, targets) for _, o in calls])):
        for b, (cost, (src, tgt)) in enumerate(zip(costs, call_indices)):
            computed[f"{prefix}.{b}.src"] = _numpy(src)
            computed[f"{prefix}.{b}.tgt"] = _numpy(tgt)
            computed[f"{prefix}.{b}.cost"] = _numpy(cost)

    criterion.matcher = _StoredAssignments(matcher, [_stored_indices(reference, prefix, batch) for prefix, _ in calls])
    losses = criterion(outputs, targets)
    total = record_losses(computed, criterion, losses, targets, images.device)

    total.backward()
    record_gradients_and_detections(computed, reference, model, outputs, postprocessors, variant, device)
    return computed


def assignment_margin(cost: np.ndarray) -> float:
    """Total cost of the second-best assignment minus that of the best, for a (Q, n) cost matrix (inf when there
    is no other assignment). The second best differs from the best in at least one pair, so it is the best
    assignment with one of the best's pairs forbidden, for some pair."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.size == 0:
        return math.inf
    rows, cols = linear_sum_assignment(cost)
    best = cost[rows, cols].sum()
    second = math.inf
    for row, col in zip(rows, cols):
        forbidden = cost.copy()
        forbidden[row, col] = np.inf
        try:
            other_rows, other_cols = linear_sum_assignment(forbidden)
        except ValueError:  # no assignment avoids that pair
            continue
        second = min(second, forbidden[other_rows, other_cols].sum())
    return float(second - best)


def _stats_error(computed: np.ndarray, reference: np.ndarray) -> float:
    """sum|x|, sum x^2, min and max compared relatively (the signed sum is left out: it can cancel to ~0); min and
    max against max(|min|, |max|)."""
    computed = np.asarray(computed, dtype=np.float64).reshape(-1, 5)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1, 5)
    if computed.shape != reference.shape:
        return math.inf
    errors = []
    for c, r in zip(computed, reference):
        extreme = max(abs(r[3]), abs(r[4]), 1e-30)
        errors += [abs(c[1] - r[1]) / max(abs(r[1]), 1e-30), abs(c[2] - r[2]) / max(abs(r[2]), 1e-30),
                   abs(c[3] - r[3]) / extreme, abs(c[4] - r[4]) / extreme]
    return float(max(errors))


def gradient_tier(name: str) -> str:
    """backbone, heads (class_embed, bbox_embed, the shared decoder norm) or transformer (the rest)."""
    if name.startswith("backbone."):
        return "backbone"
    return "heads" if name.startswith(HEAD_PREFIXES) else "transformer"


def _match_checks(prefix: str, computed: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> list[Check]:
    """``prefix.src`` and ``prefix.tgt``, judged as one assignment: exact for a call with a margin >=
    FRAGILE_MARGIN; a near-tied call may pick another assignment whose total cost on the stored matrix is within
    FRAGILE_MARGIN of the stored optimum."""
    names = [f"{prefix}.src", f"{prefix}.tgt"]
    src, tgt = computed.get(names[0]), computed.get(names[1])
    if src is None or tgt is None:
        return [Check(name, math.inf, 0.0, False, "missing") for name in names]
    ref_src, ref_tgt = reference[names[0]], reference[names[1]]
    if exact(src, ref_src) == 0 and exact(tgt, ref_tgt) == 0:
        return [Check(name, 0.0, 0.0, True, "exact") for name in names]
    cost = np.asarray(reference[f"{prefix}.cost"], dtype=np.float64)
    margin = assignment_margin(cost)
    valid = (src.shape == ref_src.shape and tgt.shape == ref_tgt.shape and len(set(src.tolist())) == len(src)
             and sorted(tgt.tolist()) == sorted(ref_tgt.tolist()))
    if margin >= FRAGILE_MARGIN or not valid:
        return [Check(f"{name} (margin {margin:.2e})", 1.0, 0.0, False, "exact") for name in names]
    excess = float(cost[src, tgt].sum() - cost[ref_src, ref_tgt].sum())
    return [Check(f"{name} (near tie, margin {margin:.2e}): cost over the optimum", excess, FRAGILE_MARGIN,
                  excess <= FRAGILE_MARGIN, "abs") for name in names]


def compare_detr(computed: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> list[Check]:
    """One check per reference array (two per gradient), with DETR_README.md's tolerances."""
    checks: list[Check] = []

    def add(name: str, error: float, tolerance: float, measure: str) -> None:
        checks.append(Check(name, error, tolerance, error <= tolerance, measure))

    total_norm = float(reference["gradnorm.total"])
    for key in reference:
        if key.startswith(("meta.", "in.", "tgt.")) or key in ("grad.names", "gradnorm.names", "post.target_sizes"):
            continue
        if key not in computed:
            add(key, math.inf, 0.0, "missing")
            continue
        ours, theirs = computed[key], reference[key]
        if key.startswith("match.") and key.endswith(".src"):
            checks.extend(_match_checks(key.removesuffix(".src"), computed, reference))
        elif key.startswith("match.") and key.endswith(".tgt"):
            continue  # checked with .src
        elif key.endswith((".mask", ".shape", ".labels")) or key in ("loss.keys", "loss.weighted_keys",
                                                                     "loss.num_boxes"):
            add(key, exact(ours, theirs), 0.0, "exact")
        elif key.startswith("loss.") and ("class_error" in key or "cardinality_error" in key):
            add(key, exact(ours, theirs), 0.0, "exact")
        elif key.endswith(".stats"):
            add(key, _stats_error(ours, theirs), OUTPUT_REL_TOL, "rel-stats")
        elif key.startswith("loss."):
            tolerance = LOSS_TOTAL_REL_TOL if key == "loss.total" else LOSS_REL_TOL
            add(key, abs(float(ours) - float(theirs)) / max(abs(float(theirs)), 1e-30), tolerance, "rel")
        elif key.startswith("grad."):
            tol_max, tol_l2 = GRAD_TOLERANCES[gradient_tier(key.removeprefix("grad."))]
            add(key, max_rel(ours, theirs), tol_max, "rel-max")
            add(key, rel_l2(ours, theirs), tol_l2, "rel-l2")
        elif key == "gradnorm.values":
            add("gradnorm.names", exact(computed["gradnorm.names"], reference["gradnorm.names"]), 0.0, "exact")
            if len(ours) != len(theirs):
                continue
            for name, mine, official in zip((str(n) for n in reference["gradnorm.names"]), ours, theirs):
                if name == ZERO_GRADIENT:
                    add(f"gradnorm.{name} (exactly 0: / gradnorm.total)", abs(mine) / total_norm, ZERO_GRADIENT_REL,
                        "abs/total")
                else:
                    add(f"gradnorm.{name}", abs(mine - official) / max(abs(official), 1e-30), GRADNORM_REL_TOL,
                        "rel")
        elif key == "gradnorm.total":
            add(key, abs(float(ours) - float(theirs)) / float(theirs), GRADNORM_REL_TOL, "rel")
        elif key.startswith("post.") and key.endswith(".scores"):
            error = float(np.abs(ours.astype(np.float64) - theirs).max()) if ours.shape == theirs.shape else math.inf
            add(key, error, POST_SCORE_ABS_TOL, "abs-max")
        else:  # out.*, dbg.* arrays, post.*.boxes, match.*.cost
            add(key, max_rel(ours, theirs), OUTPUT_REL_TOL, "rel-max")
    return checks
