"""``ddetr verify``: rerun the official procedure behind a reference file and compare every array.

A reference file (``../shared/reference/*.npz``, made by the official implementation) is one of:

* a model-variant file (``meta.variant``): ddetr-init-v1 weights, eval mode, forward, criterion, backward of the
  weighted total loss, post-processing; plus intermediate values (``dbg.*``) recorded by forward hooks; the DETR
  files (made by facebookresearch/detr) run the same procedure in ``deformable_detr.verify.detr``;
* the MSDA core case (``msda.*``): the op's output and its three input gradients, in float64;
* the eval-transform cases (``c<i>.*``): the official target preparation and validation transform on regenerated
  synthetic images (``deformable_detr.verify.eval_transform``).

Tolerances are those the reference README recommends for an independent float32 implementation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import numpy as np
import torch

from deformable_detr.config import VARIANTS
from deformable_detr.model.build import build_model
from deformable_detr.ops import ms_deform_attn
from deformable_detr.verify.comparison import Check, ReferenceFileError, exact, max_rel, rel_l2, require
from deformable_detr.verify.detr import DETR_VARIANTS, compare_detr, run_detr_case
from deformable_detr.verify.eval_transform import compare_eval_transform, run_eval_transform_case
from deformable_detr.verify.recording import record_gradients_and_detections, record_losses
from deformable_detr.verify.recording import to_numpy as _numpy
from deformable_detr.verify.reference_init import apply_ddetr_init_v1

# Gradients of these parameters flow through the MSDA sampling locations, whose bilinear derivative jumps at
# pixel borders: float32 rounding moves samples across borders, so they get the README's looser bounds. pos_trans
# (two-stage) turns the proposals into the first decoder layer's queries, from which its sampling offsets come.
UPSTREAM_OF_SAMPLING = ("backbone.", "input_proj.", "level_embed", "sampling_offsets", "reference_points",
                        "query_embed", "pos_trans")

OUTPUT_REL_TOL = 2e-5
LOSS_REL_TOL = 3e-5
LOSS_TOTAL_REL_TOL = 1e-5
GRAD_UPSTREAM_REL_L2 = 1e-2
GRAD_UPSTREAM_REL_MAX = 3e-2
GRAD_HEAD_REL_MAX = 1e-4
POST_SCORE_ABS_TOL = 1e-5
POST_BOX_REL_TOL = 1e-3
MSDA_REL_TOL = 1e-10


def _stats(tensor: torch.Tensor) -> np.ndarray:
    """[sum, sum|x|, sum x^2, min, max] in float64, as the reference's ``stats`` vectors."""
    x = tensor.detach().double()
    return np.array([x.sum().item(), x.abs().sum().item(), (x * x).sum().item(), x.min().item(), x.max().item()])


def _stats_error(computed: np.ndarray, reference: np.ndarray) -> float:
    """Error of a stats vector relative to the scale of each statistic: sums against sum|x| (a signed sum can
    cancel to ~0), sum x^2 against itself, min and max against max(|min|, |max|)."""
    computed = np.asarray(computed, dtype=np.float64).reshape(-1, 5)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1, 5)
    if computed.shape != reference.shape:
        return math.inf
    errors = []
    for c, r in zip(computed, reference):
        abs_scale = max(abs(r[1]), 1e-30)
        extreme_scale = max(abs(r[3]), abs(r[4]), 1e-30)
        errors += [abs(c[0] - r[0]) / abs_scale, abs(c[1] - r[1]) / abs_scale,
                   abs(c[2] - r[2]) / max(abs(r[2]), 1e-30) / 2,  # x^2 doubles the relative error of x
                   abs(c[3] - r[3]) / extreme_scale, abs(c[4] - r[4]) / extreme_scale]
    return float(max(errors))


class UnsupportedReferenceError(ReferenceFileError):
    """A valid reference file of a model this version does not implement (none at present: kept for callers)."""


def load_reference(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ReferenceFileError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as error:
        raise ReferenceFileError(f"{path}: not a numpy .npz archive ({error})") from error


def reference_kind(reference: dict[str, np.ndarray], source: str = "reference") -> str:
    """'model' (a Deformable DETR variant file), 'detr' (a DETR variant file), 'msda' (the MSDA core case) or
    'eval_transform'."""
    if "meta.variant" in reference:
        variant = str(reference["meta.variant"])
        if variant in DETR_VARIANTS:
            return "detr"
        if variant not in VARIANTS:
            raise ReferenceFileError(f"{source}: meta.variant is {variant!r}, not one of {', '.join(VARIANTS)}")
        return "model"
    if "msda.value" in reference:
        return "msda"
    if any(k.startswith("c0.in.") for k in reference):
        return "eval_transform"
    raise ReferenceFileError(
        f"{source}: not a reference file: expected 'meta.variant' (model variant), 'msda.value' (MSDA core) or "
        f"'c0.in.*' (eval transform) among its arrays, found {sorted(reference)[:6]}"
    )


# --------------------------------------------------------------------------------------------------- MSDA core


def run_msda_case(reference: dict[str, np.ndarray], device: str = "cpu", backend: str = "auto"
                  ) -> dict[str, np.ndarray]:
    """The op's output and gradients for the stored inputs, in the stored dtype (float64)."""
    require(reference, ["msda.value", "msda.spatial_shapes", "msda.level_start_index", "msda.sampling_locations",
                         "msda.attention_weights", "msda.grad_output"], "MSDA core case")

    def tensor(key: str, grad: bool = False) -> torch.Tensor:
        return torch.from_numpy(reference[key]).to(device).requires_grad_(grad)

    value = tensor("msda.value", True)
    locations = tensor("msda.sampling_locations", True)
    weights = tensor("msda.attention_weights", True)
    shapes = [tuple(int(s) for s in hw) for hw in reference["msda.spatial_shapes"]]
    output = ms_deform_attn(value, shapes, tensor("msda.level_start_index"), locations, weights, backend=backend)
    output.backward(tensor("msda.grad_output"))
    return {"msda.output": _numpy(output), "msda.grad_value": _numpy(value.grad),
            "msda.grad_sampling_locations": _numpy(locations.grad),
            "msda.grad_attention_weights": _numpy(weights.grad)}


def compare_msda(computed: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> list[Check]:
    checks = []
    for key in ("msda.output", "msda.grad_value", "msda.grad_sampling_locations", "msda.grad_attention_weights"):
        error = max_rel(computed[key], reference[key])
        checks.append(Check(key, error, MSDA_REL_TOL, error <= MSDA_REL_TOL, "rel-max"))
    return checks


# ------------------------------------------------------------------------------------------------ model variant


def _targets(reference: dict[str, np.ndarray], batch: int, device: str) -> list[dict[str, torch.Tensor]]:
    require(reference, [f"tgt.{b}.{k}" for b in range(batch) for k in ("boxes", "labels")], "targets")
    return [{"boxes": torch.from_numpy(reference[f"tgt.{b}.boxes"]).to(device),
             "labels": torch.from_numpy(reference[f"tgt.{b}.labels"]).to(device)} for b in range(batch)]


def run_model_case(reference: dict[str, np.ndarray], device: str = "cpu", backend: str = "auto"
                   ) -> dict[str, np.ndarray]:
    """Runs the official procedure of a variant file and returns every array under the file's key names."""
    require(reference, ["meta.variant", "in.images", "in.mask", "post.target_sizes", "grad.names"], "variant file")
    variant = str(reference["meta.variant"])
    model, criterion, postprocessors = build_model(variant, num_classes=91, msda_backend=backend)
    apply_ddetr_init_v1(model)
    model.to(device).eval()

    images = torch.from_numpy(reference["in.images"]).to(device)
    mask = torch.from_numpy(reference["in.mask"]).to(device)
    batch = images.shape[0]
    targets = _targets(reference, batch, device)
    computed: dict[str, np.ndarray] = {}

    def record_backbone(module, args, output) -> None:
        features, _ = output
        for index, (level_features, _) in enumerate(features):
            computed[f"dbg.backbone.{index}.shape"] = np.array(level_features.shape, dtype=np.int64)
            computed[f"dbg.backbone.{index}.stats"] = _stats(level_features)
            computed[f"dbg.backbone.{index}.px00"] = _numpy(level_features[:, :, 0, 0])

    def record_transformer_inputs(module, args) -> None:
        srcs, masks, pos_embeds = args[:3]
        for level, (src, level_mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            computed[f"dbg.lvl.{level}.mask"] = _numpy(level_mask)
            computed[f"dbg.lvl.{level}.src.stats"] = _stats(src)
            computed[f"dbg.lvl.{level}.src.px00"] = _numpy(src[:, :, 0, 0])
            computed[f"dbg.lvl.{level}.pos.stats"] = _stats(pos)
            computed[f"dbg.lvl.{level}.pos.px00"] = _numpy(pos[:, :, 0, 0])

    def record_encoder(module, args, output) -> None:
        _, spatial_shapes, level_start_index, valid_ratios = args[:4]
        computed["dbg.spatial_shapes"] = np.array(spatial_shapes, dtype=np.int64)
        computed["dbg.level_start_index"] = _numpy(level_start_index)
        computed["dbg.valid_ratios"] = _numpy(valid_ratios)
        computed["dbg.memory.stats"] = _stats(output)
        computed["dbg.memory.tok0_3"] = _numpy(output[:, :4])

    def record_transformer_outputs(module, args, output) -> None:
        computed["dbg.hs.stats"] = np.stack([_stats(layer) for layer in output.hs])
        computed["dbg.hs.q0"] = _numpy(output.hs[:, :, 0])
        computed["dbg.init_reference"] = _numpy(output.init_reference)
        computed["dbg.inter_references"] = _numpy(output.inter_references)

    hooks = [model.backbone.register_forward_hook(record_backbone),
             model.transformer.register_forward_pre_hook(record_transformer_inputs),
             model.transformer.encoder.register_forward_hook(record_encoder),
             model.transformer.register_forward_hook(record_transformer_outputs)]
    try:
        outputs = model(images, mask)
    finally:
        for hook in hooks:
            hook.remove()

    computed["out.pred_logits"] = _numpy(outputs.pred_logits)
    computed["out.pred_boxes"] = _numpy(outputs.pred_boxes)
    for layer, aux in enumerate(outputs.aux_outputs):
        stored = reference.get(f"out.aux.{layer}.pred_logits")
        num_queries = stored.shape[1] if stored is not None else aux["pred_logits"].shape[1]
        # The reference keeps only the first queries of the auxiliary layers (file size).
        computed[f"out.aux.{layer}.pred_logits"] = _numpy(aux["pred_logits"][:, :num_queries])
        computed[f"out.aux.{layer}.pred_boxes"] = _numpy(aux["pred_boxes"][:, :num_queries])
    if outputs.enc_outputs is not None:
        computed["out.enc.pred_logits"] = _numpy(outputs.enc_outputs["pred_logits"])
        computed["out.enc.pred_boxes"] = _numpy(outputs.enc_outputs["pred_boxes"])

    losses, indices = criterion(outputs, targets, return_indices=True)
    total = record_losses(computed, criterion, losses, targets, images.device)

    binary_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    calls = [("match", outputs, targets, indices["final"])]
    calls += [(f"match.aux.{j}", aux, targets, idx) for j, (aux, idx) in enumerate(zip(outputs.aux_outputs,
                                                                                      indices["aux"]))]
    if outputs.enc_outputs is not None:
        calls.append(("match.enc", outputs.enc_outputs, binary_targets, indices["enc"]))
    for prefix, call_outputs, call_targets, call_indices in calls:
        costs = criterion.matcher.cost_matrices(call_outputs, call_targets)
        for b, (cost, (src, tgt)) in enumerate(zip(costs, call_indices)):
            computed[f"{prefix}.{b}.src"] = _numpy(src)
            computed[f"{prefix}.{b}.tgt"] = _numpy(tgt)
            computed[f"{prefix}.{b}.cost"] = _numpy(cost)

    total.backward()
    record_gradients_and_detections(computed, reference, model, outputs, postprocessors, variant, device)
    return computed


def _gradient_checks(name: str, computed: np.ndarray, reference: np.ndarray, num_layers: dict[str, int]
                     ) -> list[Check]:
    """The heads' bound for a parameter that feeds no sampling location, the two upstream bounds otherwise."""
    if not _feeds_sampling_locations(name.removeprefix("grad."), num_layers):
        error = max_rel(computed, reference)
        return [Check(name, error, GRAD_HEAD_REL_MAX, error <= GRAD_HEAD_REL_MAX, "rel-max")]
    l2_error, rel_max = rel_l2(computed, reference), max_rel(computed, reference)
    return [Check(name, l2_error, GRAD_UPSTREAM_REL_L2, l2_error <= GRAD_UPSTREAM_REL_L2, "rel-l2"),
            Check(name, rel_max, GRAD_UPSTREAM_REL_MAX, rel_max <= GRAD_UPSTREAM_REL_MAX, "rel-max")]


def _feeds_sampling_locations(name: str, num_layers: dict[str, int]) -> bool:
    """Whether parameter ``name`` influences a later MSDA sampling location (so that its gradient carries the
    bilinear derivative's jumps): the upstream names above, and every parameter of an encoder or decoder layer
    but the last, since a layer's output is the next layer's query, from which its offsets are computed."""
    if any(part in name for part in UPSTREAM_OF_SAMPLING):
        return True
    for part in ("encoder", "decoder"):
        prefix = f"transformer.{part}.layers."
        if name.startswith(prefix):
            return int(name[len(prefix):].split(".")[0]) < num_layers[part] - 1
    return False


def _post_checks(computed: dict[str, np.ndarray], reference: dict[str, np.ndarray], batch: int) -> list[Check]:
    """Detections compared as a set: equal scores may come in any order, so each reference detection is
    matched with an unused computed one of the same label, score within 1e-5 and box within 1e-3 * image size."""
    checks = []
    for b in range(batch):
        ref_scores, ref_labels, ref_boxes = (reference[f"post.{b}.{k}"] for k in ("scores", "labels", "boxes"))
        scores, labels, boxes = (computed[f"post.{b}.{k}"] for k in ("scores", "labels", "boxes"))
        score_error = (float(np.abs(np.sort(scores) - np.sort(ref_scores)).max())
                       if scores.shape == ref_scores.shape else math.inf)
        checks.append(Check(f"post.{b}.scores", score_error, POST_SCORE_ABS_TOL, score_error <= POST_SCORE_ABS_TOL,
                            "abs-max"))
        height, width = reference["post.target_sizes"][b]
        box_tolerance = POST_BOX_REL_TOL * float(max(height, width))
        used = np.zeros(len(scores), dtype=bool)
        unmatched = 0
        worst_box = 0.0
        for score, label, box in zip(ref_scores, ref_labels, ref_boxes):
            candidates = np.flatnonzero(~used & (labels == label) & (np.abs(scores - score) <= POST_SCORE_ABS_TOL))
            if len(candidates) == 0:
                unmatched += 1
                continue
            box_errors = np.abs(boxes[candidates] - box).max(1)
            best = candidates[int(np.argmin(box_errors))]
            if box_errors.min() > box_tolerance:
                unmatched += 1
                continue
            used[best] = True
            worst_box = max(worst_box, float(box_errors.min()))
        checks.append(Check(f"post.{b}.detections unmatched (label, score, box)", float(unmatched), 0.0,
                            unmatched == 0, "count"))
        checks.append(Check(f"post.{b}.boxes of matched detections", worst_box, box_tolerance,
                            worst_box <= box_tolerance, "abs-max"))
    return checks


def compare_model(computed: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> list[Check]:
    """One check per reference array (two for upstream gradients), with the README's tolerances."""
    checks: list[Check] = []
    batch = reference["in.images"].shape[0]
    names = [str(n) for n in reference["gradnorm.names"]]
    num_layers = {part: 1 + max(int(n.split(".")[3]) for n in names if n.startswith(f"transformer.{part}.layers."))
                  for part in ("encoder", "decoder")}

    def add(name: str, error: float, tolerance: float, measure: str) -> None:
        checks.append(Check(name, error, tolerance, error <= tolerance, measure))

    for key in sorted(reference, key=list(reference).index):
        if key.startswith(("meta.", "in.", "tgt.", "post.")) or key in ("grad.names", "gradnorm.names"):
            continue
        if key not in computed:
            add(key, math.inf, 0.0, "missing")
            continue
        ours, theirs = computed[key], reference[key]
        if key.endswith((".src", ".tgt", ".mask", ".shape")) or key in ("dbg.spatial_shapes", "dbg.level_start_index",
                                                                          "loss.keys", "loss.weighted_keys"):
            add(key, exact(ours, theirs), 0.0, "exact")
        elif key.endswith(".stats"):
            add(key, _stats_error(ours, theirs), OUTPUT_REL_TOL, "rel-stats")
        elif key.startswith("loss."):
            tolerance = LOSS_TOTAL_REL_TOL if key == "loss.total" else LOSS_REL_TOL
            error = abs(float(ours) - float(theirs)) / max(abs(float(theirs)), 1e-30)
            add(key, error if error > 0 or float(ours) == float(theirs) else math.inf, tolerance, "rel")
        elif key.startswith("grad."):
            checks.extend(_gradient_checks(key, ours, theirs, num_layers))
        elif key == "gradnorm.values":
            add("gradnorm.names", exact(computed["gradnorm.names"], reference["gradnorm.names"]), 0.0, "exact")
            if len(ours) == len(theirs):
                for name, mine, official in zip(names, ours, theirs):
                    upstream = _feeds_sampling_locations(name, num_layers)
                    tolerance = GRAD_UPSTREAM_REL_L2 if upstream else GRAD_HEAD_REL_MAX
                    add(f"gradnorm.{name}", abs(mine - official) / max(abs(official), 1e-30), tolerance, "rel")
        elif key == "gradnorm.total":
            add(key, abs(float(ours) - float(theirs)) / float(theirs), GRAD_UPSTREAM_REL_L2, "rel")
        else:
            add(key, max_rel(ours, theirs), OUTPUT_REL_TOL, "rel-max")
    checks.extend(_post_checks(computed, reference, batch))
    return checks


# ------------------------------------------------------------------------------------------------------ driver


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """float32 convolutions and matrix products without TensorFloat-32 for the duration. cuDNN allows TF32 by
    default, and on an Ampere or later GPU its 10-bit mantissa moves the backbone's outputs by about 2e-4 relative,
    ten times the float32 tolerances of the reference files (measured on an H200: every model file fails from
    ``dbg.backbone.0`` on). The reference files were made in float32 on the CPU."""
    cudnn_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    matmul_precision = torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32
        torch.set_float32_matmul_precision(matmul_precision)


def verify_reference(reference: dict[str, np.ndarray], device: str = "cpu", backend: str = "auto",
                     source: str = "reference") -> tuple[list[Check], dict[str, np.ndarray]]:
    """Runs and compares one reference file's case, in strict float32 (``strict_float32``); returns the checks and
    the computed arrays."""
    with strict_float32():
        return _verify_reference(reference, device, backend, source)


def _verify_reference(reference: dict[str, np.ndarray], device: str, backend: str, source: str
                      ) -> tuple[list[Check], dict[str, np.ndarray]]:
    kind = reference_kind(reference, source)
    if kind == "msda":
        computed = run_msda_case(reference, device, backend)
        return compare_msda(computed, reference), computed
    if kind == "eval_transform":
        computed = run_eval_transform_case(reference)
        return compare_eval_transform(computed, reference), computed
    if kind == "detr":  # no deformable attention: the backend does not apply
        computed = run_detr_case(reference, device)
        return compare_detr(computed, reference), computed
    computed = run_model_case(reference, device, backend)
    return compare_model(computed, reference), computed


def iter_report(checks: list[Check], only_failures: bool = False) -> Iterator[str]:
    for check in checks:
        if not only_failures or not check.passed:
            yield check.line()


def verify_files(paths: list[str], device: str = "cpu", backend: str = "auto", save: str | None = None,
                 print_fn: Callable[[str], None] = print, only_failures: bool = False,
                 skip_unsupported: Collection[str] = ()) -> bool:
    """The ``ddetr verify`` command: returns True when every check of every file passes. A file of
    ``skip_unsupported`` (those found in a folder) that holds a model this version does not implement is reported
    and skipped; named alone, it is an error."""
    all_passed = True
    saved: dict[str, np.ndarray] = {}
    for path in paths:
        reference = load_reference(path)
        try:
            checks, computed = verify_reference(reference, device, backend, source=str(path))
        except UnsupportedReferenceError as error:
            if path not in skip_unsupported:
                raise
            print_fn(f"== SKIP {error}")
            continue
        print_fn(f"== {path} ({len(checks)} checks, device {device}, MSDA backend {backend})")
        for line in iter_report(checks, only_failures):
            print_fn(line)
        failed = [c for c in checks if not c.passed]
        print_fn(f"== {path}: {len(checks) - len(failed)} passed, {len(failed)} failed")
        all_passed &= not failed
        prefix = f"{Path(path).stem}/" if len(paths) > 1 else ""
        saved.update({prefix + k: v for k, v in computed.items()})
    if save:
        np.savez_compressed(save, **saved)
        print_fn(f"wrote {len(saved)} computed arrays to {save}")
    return all_passed
