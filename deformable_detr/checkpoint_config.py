"""Which model a checkpoint holds: the :class:`ModelConfig` to rebuild it, from its stored configs or its weights.

Checkpoints of ``ddetr train`` carry the run's configs (``deformable_detr.checkpoint.stored_configs``), and the model
is rebuilt from them exactly as training built it. The official checkpoints carry the official ``main.py``
Namespace, and other files a bare state_dict: there the architecture is read off the weights (which keys exist,
their shapes), and the settings the weights cannot tell (DC5's dilation, the number of heads, the two-stage proposal
count) come from the official Namespace when there is one, else from ``variant`` and the official defaults.
Training (``--resume``, ``--finetune``), evaluation and inference all read models through this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

import torch

from deformable_detr.checkpoint import CheckpointError, stored_configs
from deformable_detr.config import VARIANTS, ModelConfig, model_config

# Keys every Deformable DETR state_dict has, whatever the variant.
REQUIRED_KEYS = ("backbone.0.body.conv1.weight", "input_proj.0.0.weight", "transformer.level_embed",
                 "class_embed.0.weight", "bbox_embed.0.layers.0.weight")
# Keys every DETR state_dict has (facebookresearch/detr: single heads, one 1x1 input projection, a final decoder norm).
DETR_REQUIRED_KEYS = ("backbone.0.body.conv1.weight", "input_proj.weight", "query_embed.weight", "class_embed.weight",
                      "bbox_embed.layers.0.weight", "transformer.decoder.norm.weight")
ARCHITECTURE_NAMES = {"deformable_detr": "Deformable DETR", "detr": "DETR"}
TWO_STAGE_KEY = "transformer.decoder.class_embed.0.weight"
BOX_REFINE_KEY = "transformer.decoder.bbox_embed.0.layers.0.weight"

# Layer3 blocks identify the ResNet depth: (bottleneck?, blocks) -> name.
_RESNET_BY_LAYER3 = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}


def weights_architecture(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``deformable_detr`` or ``detr`` by the keys of ``state_dict``; None when it is neither."""
    if all(key in state_dict for key in REQUIRED_KEYS):
        return "deformable_detr"
    if all(key in state_dict for key in DETR_REQUIRED_KEYS):
        return "detr"
    return None


def describe_weights(state_dict: dict[str, torch.Tensor]) -> str:
    """What architecture ``state_dict`` holds, with the keys that show it, for error messages."""
    def shape(key: str) -> tuple[int, ...]:
        return tuple(state_dict[key].shape)

    if weights_architecture(state_dict) == "detr":
        return (f"DETR weights (Carion et al. 2020: 'transformer.encoder.layers.0.self_attn.in_proj_weight', "
                f"'query_embed.weight' {shape('query_embed.weight')}, 'class_embed.weight' "
                f"{shape('class_embed.weight')} = {shape('class_embed.weight')[0] - 1} classes + no-object)")
    return (f"Deformable DETR weights ('transformer.level_embed' {shape('transformer.level_embed')}, "
            f"'class_embed.0.weight' {shape('class_embed.0.weight')}, no no-object class)")


def check_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raises :class:`CheckpointError` naming what was found when ``state_dict`` is neither a Deformable DETR nor a
    DETR one."""
    if weights_architecture(state_dict) is None:
        keys = list(state_dict)
        missing = [key for key in REQUIRED_KEYS if key not in state_dict]
        raise CheckpointError(
            f"{source}: not a Deformable DETR checkpoint (nor a DETR one): its 'model' state_dict has {len(keys)} "
            f"key(s) (first: {keys[:6]}) and lacks {missing} (expected the official parameter names, e.g. "
            "'backbone.0.body.conv1.weight', 'transformer.level_embed', 'class_embed.0.weight'; DETR: "
            "'input_proj.weight', 'query_embed.weight', 'class_embed.weight')"
        )


def _count(state_dict: dict[str, torch.Tensor], pattern: str) -> int:
    """How many distinct indices N the keys matching ``pattern`` (a regex with one group for N) have."""
    regex = re.compile(pattern)
    return len({match.group(1) for key in state_dict if (match := regex.match(key))})


def _check_variant(variant: str, found: dict[str, Any], what: str, weights: dict[str, torch.Tensor]) -> None:
    """Raises :class:`CheckpointError` when ``found`` (architecture, num_feature_levels, with_box_refine, two_stage,
    and dilation where known) contradicts the preset of ``variant``."""
    implied = {"architecture": "deformable_detr", "num_feature_levels": 4, "with_box_refine": False,
               "two_stage": False, "dilation": False, **VARIANTS[variant]}
    if found["architecture"] != implied["architecture"]:
        others = [name for name, preset in VARIANTS.items()
                  if preset.get("architecture", "deformable_detr") == found["architecture"]]
        raise CheckpointError(f"variant {variant!r} is {ARCHITECTURE_NAMES[implied['architecture']]}, but the "
                              f"checkpoint holds {describe_weights(weights)}: use --variant {' or '.join(others)}, "
                              "or none")
    found = {k: v for k, v in found.items() if k != "architecture" and k in implied}
    # Multi-scale variants differ from single-scale ones in having several levels, whatever their number.
    found = {**found, "num_feature_levels": 1 if found["num_feature_levels"] == 1 else 4}
    clashes = {k: (implied[k], v) for k, v in found.items() if implied[k] != v}
    if clashes:
        raise CheckpointError(f"variant {variant!r} does not fit the checkpoint's {what}: "
                              + ", ".join(f"{k}: variant {a}, {what} {b}" for k, (a, b) in clashes.items()))


def _from_weights(state_dict: dict[str, torch.Tensor], args: argparse.Namespace | None, variant: str | None,
                  hints: dict[str, Any]) -> ModelConfig:
    """Reads the architecture off the weights; what they cannot tell comes from ``hints``, then ``args``, then
    ``variant``, then the official defaults."""

    def flag(name: str, default: Any) -> Any:
        if name in hints:
            return hints[name]
        return getattr(args, name, default) if args is not None else default

    architecture = weights_architecture(state_dict)
    two_stage = TWO_STAGE_KEY in state_dict
    with_box_refine = BOX_REFINE_KEY in state_dict
    num_feature_levels = 1 if architecture == "detr" else _count(state_dict, r"input_proj\.(\d+)\.")
    preset = VARIANTS[variant] if variant else {}
    if variant:
        _check_variant(variant, {"architecture": architecture, "num_feature_levels": num_feature_levels,
                                 "with_box_refine": with_box_refine, "two_stage": two_stage}, "weights", state_dict)
    backbone = _resnet_of(state_dict)
    if architecture == "detr":
        return _detr_from_weights(state_dict, backbone, variant, flag)
    hidden_dim = int(state_dict["transformer.level_embed"].shape[1])
    nheads = int(flag("nheads", 8))
    levels_heads = num_feature_levels * nheads

    def points(key: str) -> int:
        outputs = int(state_dict[key].shape[0])
        if outputs % levels_heads:
            raise CheckpointError(f"{key} has {outputs} outputs, not a multiple of num_feature_levels x nheads = "
                                  f"{num_feature_levels} x {nheads}; pass the checkpoint's nheads")
        return outputs // levels_heads

    enc_layers = _count(state_dict, r"transformer\.encoder\.layers\.(\d+)\.")
    dec_layers = _count(state_dict, r"transformer\.decoder\.layers\.(\d+)\.")
    options: dict[str, Any] = dict(
        num_classes=int(state_dict["class_embed.0.weight"].shape[0]), backbone=backbone,
        dilation=bool(preset.get("dilation")) or bool(flag("dilation", False)),
        position_embedding_scale=float(flag("position_embedding_scale", ModelConfig.position_embedding_scale)),
        num_feature_levels=num_feature_levels, enc_layers=enc_layers, dec_layers=dec_layers,
        dim_feedforward=int(state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0])
        if enc_layers else int(state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0]),
        hidden_dim=hidden_dim, nheads=nheads,
        num_queries=int(state_dict["query_embed.weight"].shape[0]) if not two_stage
        else int(flag("num_queries", ModelConfig.num_queries)),
        with_box_refine=with_box_refine, two_stage=two_stage,
    )
    if enc_layers:
        options["enc_n_points"] = points("transformer.encoder.layers.0.self_attn.attention_weights.weight")
    if dec_layers:
        options["dec_n_points"] = points("transformer.decoder.layers.0.cross_attn.attention_weights.weight")
    return model_config("deformable_detr", **options)


def _resnet_of(state_dict: dict[str, torch.Tensor]) -> str:
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
    layer3_blocks = _count(state_dict, r"backbone\.0\.body\.layer3\.(\d+)\.")
    backbone = _RESNET_BY_LAYER3.get((bottleneck, layer3_blocks))
    if backbone is None:
        raise CheckpointError(f"the backbone weights are no known ResNet ({layer3_blocks} blocks in layer3, "
                              f"{'bottleneck' if bottleneck else 'basic'} blocks); expected one of "
                              f"{sorted(set(_RESNET_BY_LAYER3.values()))}")
    return backbone


def _detr_from_weights(state_dict: dict[str, torch.Tensor], backbone: str, variant: str | None,
                       flag: Any) -> ModelConfig:
    """A DETR checkpoint's architecture: DETR's preset (``variant``'s, else ``detr``) with what the weights show;
    ``flag(name, default)``: a setting the weights cannot tell."""
    enc_layers = _count(state_dict, r"transformer\.encoder\.layers\.(\d+)\.")
    dec_layers = _count(state_dict, r"transformer\.decoder\.layers\.(\d+)\.")
    query_embed = state_dict["query_embed.weight"]
    preset = VARIANTS[variant or "detr"]
    return model_config(
        variant or "detr", num_classes=int(state_dict["class_embed.weight"].shape[0]) - 1, backbone=backbone,
        dilation=bool(preset.get("dilation")) or bool(flag("dilation", False)),
        position_embedding_scale=float(flag("position_embedding_scale", ModelConfig.position_embedding_scale)),
        enc_layers=enc_layers, dec_layers=dec_layers,
        dim_feedforward=int(state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0]),
        hidden_dim=int(query_embed.shape[1]), nheads=int(flag("nheads", 8)), num_queries=int(query_embed.shape[0]),
    )


# Settings of the model that its weights do not show: for a checkpoint without stored settings, they come from the
# settings given by the user (hints), else from the official Namespace, else the official defaults.
WEIGHTS_CANNOT_TELL = ("dilation", "nheads", "position_embedding_scale", "num_queries")


def config_from_checkpoint(checkpoint: dict[str, Any], source: str, variant: str | None = None,
                           msda_backend: str | None = None, hints: dict[str, Any] | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of the model in ``checkpoint`` (a dict from ``read_checkpoint``).

    Args:
        checkpoint: ``{"model": state_dict, ...}``, with the configs of ``ddetr train`` or the official ``args``.
        source: the file's name, for error messages.
        variant: an official variant name (``config.VARIANTS``) for what the weights cannot tell, chiefly DC5
            (``single_scale_dc5``), when the checkpoint has no settings; it must agree with the checkpoint.
        msda_backend: the deformable attention backend to build the model with (not necessarily the one it was
            trained with); None keeps the checkpoint's.
        hints: settings given by the user; for a checkpoint without stored settings, those of
            :data:`WEIGHTS_CANNOT_TELL` are taken from here (``dilation=True`` for an official DC5 checkpoint).
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    state_dict = checkpoint["model"]
    check_state_dict(state_dict, source)
    stored = stored_configs(checkpoint, source)
    try:
        if stored is not None:
            config = stored.model
            if variant is not None:
                _check_variant(variant, {name: getattr(config, name) for name in ("architecture",
                               "num_feature_levels", "with_box_refine", "two_stage", "dilation")}, "settings",
                               state_dict)
        else:
            args = checkpoint.get("args")
            told = {name: value for name, value in (hints or {}).items() if name in WEIGHTS_CANNOT_TELL}
            config = _from_weights(state_dict, args if isinstance(args, argparse.Namespace) else None, variant, told)
    except (ValueError, KeyError) as error:
        if isinstance(error, CheckpointError):
            raise CheckpointError(f"{source}: {error}") from error
        raise CheckpointError(f"{source}: cannot rebuild the model from this checkpoint ({error})") from error
    return config if msda_backend is None else dataclasses.replace(config, msda_backend=msda_backend)
