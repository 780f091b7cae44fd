"""Hugging Face format: transformers' ``DeformableDetrForObjectDetection`` folders <-> our checkpoints.

A Hugging Face folder holds ``config.json`` (the architecture, ``id2label``) and ``model.safetensors`` (or the older
``pytorch_model.bin``) with transformers' parameter names. Reading one (:func:`read_hf_checkpoint`, which
``read_checkpoint``, ``load_checkpoint``, ``Detector.from_checkpoint`` and ``ddetr predict/eval`` call for such a
path) gives a checkpoint dict as ``ddetr train`` writes it: the official state_dict names, a :class:`ModelConfig`,
the class names from ``id2label``. Writing one (:func:`export_hf`, ``ddetr export hf``) gives a folder that
``transformers.DeformableDetrForObjectDetection.from_pretrained(DIR)`` loads with no missing or unexpected keys.

What maps to what:

* the transformer, heads and input projections one to one (``fc1`` = ``linear1``, ``encoder_attn`` = ``cross_attn``,
  ...), except the decoder self-attention, whose separate ``q_proj``/``k_proj``/``v_proj`` are the rows of the
  official ``in_proj_weight``/``in_proj_bias`` (query, key, value, in that order);
* the backbone in either of transformers' forms: timm's ResNet (``use_timm_backbone``, what the SenseTime Hub
  checkpoints use; its names are torchvision's) or transformers' own ResNet (``embedder``/``stages``/``shortcut``),
  whose tensors map one to one onto torchvision's;
* the names transformers 5 uses in memory (``backbone.model``, ``self_attn.o_proj``, ``mlp.fc1``) and the legacy
  names its ``save_pretrained`` still writes (``backbone.conv_encoder.model``, ``self_attn.out_proj``, ``fc1``) are
  both read; the legacy ones (transformers 4's names) are written;
* tied heads: a folder may list a head once where the model uses it several times (``save_pretrained`` drops tied
  copies: the box-refinement heads inside the decoder, the two-stage class heads, and the class (and, without box
  refinement, box) heads of layers 1.. tied to layer 0); the missing copies are filled from their ties. Exports
  list every copy, as the model's own ``state_dict`` does;
* ``num_labels``/``id2label`` are our ``num_classes``/class names (transformers' placeholder names ``LABEL_<i>`` mean
  no name); two-stage takes its query count from ``two_stage_num_proposals``, as transformers does.

The settings of the loss and the matcher stay the official ones on reading (transformers' defaults differ: see the
README); an export writes ours into ``config.json``. This module imports neither transformers nor timm.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deformable_detr.checkpoint import CheckpointError, make_checkpoint, read_checkpoint
from deformable_detr.config import DataConfig, ModelConfig, RunConfigs, TrainConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
PREPROCESSOR_NAME = "preprocessor_config.json"
MODEL_TYPE = "deformable_detr"
ARCHITECTURE = "DeformableDetrForObjectDetection"
BACKBONE_FORMS = ("timm", "transformers")
"""How an export writes the ResNet: timm's (the Hub checkpoints' form; transformers then needs timm to load it, and
DC5 needs it) or transformers' own ResNet (no timm needed)."""

# Class names of other transformers object detectors, for the message naming what a folder holds.
_OTHER_DETECTORS = {"detr": "DETR", "conditional_detr": "Conditional DETR", "deta": "DETA", "dab_detr": "DAB-DETR",
                    "rt_detr": "RT-DETR", "rt_detr_v2": "RT-DETRv2", "d_fine": "D-FINE", "yolos": "YOLOS",
                    "table-transformer": "Table Transformer", "grounding-dino": "Grounding DINO",
                    "owlv2": "OWLv2", "owlvit": "OWL-ViT"}
_HF_PREFIXES = ("model.backbone.", "model.encoder.layers.", "model.decoder.layers.", "model.input_proj.")
_RESNET_DEPTHS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
                  "resnet50": ("bottleneck", [3, 4, 6, 3]), "resnet101": ("bottleneck", [3, 4, 23, 3])}
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ name mapping


@dataclass(frozen=True)
class _Rule:
    """One parameter name in both layouts: ``{field}`` matches a name part; fields in ``plus_one`` count from 1 in
    ours (torchvision's ``layer1``, ``conv1``) and from 0 in transformers' (``stages.0``, ``layer.0``)."""

    ours: str
    theirs: str
    plus_one: tuple[str, ...] = ()


@functools.cache
def _regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(f"(?P<{p[1:-1]}>[A-Za-z0-9_]+)" if p.startswith("{") else re.escape(p)
                              for p in parts))


def _convert(key: str, rules: tuple[_Rule, ...], to_theirs: bool) -> str | None:
    for rule in rules:
        source, target = (rule.ours, rule.theirs) if to_theirs else (rule.theirs, rule.ours)
        match = _regex(source).fullmatch(key)
        if match:
            values = match.groupdict()
            for name in rule.plus_one:
                if not values[name].isdigit():
                    return None
                values[name] = str(int(values[name]) + (-1 if to_theirs else 1))
            return target.format(**values)
    return None


_TRANSFORMER_RULES = (
    _Rule("transformer.level_embed", "model.level_embed"),
    _Rule("input_proj.{level}.{layer}.{param}", "model.input_proj.{level}.{layer}.{param}"),
    _Rule("query_embed.weight", "model.query_position_embeddings.weight"),
    _Rule("transformer.reference_points.{param}", "model.reference_points.{param}"),
    _Rule("transformer.enc_output.{param}", "model.enc_output.{param}"),
    _Rule("transformer.enc_output_norm.{param}", "model.enc_output_norm.{param}"),
    _Rule("transformer.pos_trans.{param}", "model.pos_trans.{param}"),
    _Rule("transformer.pos_trans_norm.{param}", "model.pos_trans_norm.{param}"),
    _Rule("transformer.encoder.layers.{n}.self_attn.{module}.{param}",
          "model.encoder.layers.{n}.self_attn.{module}.{param}"),
    _Rule("transformer.encoder.layers.{n}.norm1.{param}", "model.encoder.layers.{n}.self_attn_layer_norm.{param}"),
    _Rule("transformer.encoder.layers.{n}.linear1.{param}", "model.encoder.layers.{n}.fc1.{param}"),
    _Rule("transformer.encoder.layers.{n}.linear2.{param}", "model.encoder.layers.{n}.fc2.{param}"),
    _Rule("transformer.encoder.layers.{n}.norm2.{param}", "model.encoder.layers.{n}.final_layer_norm.{param}"),
    _Rule("transformer.decoder.layers.{n}.cross_attn.{module}.{param}",
          "model.decoder.layers.{n}.encoder_attn.{module}.{param}"),
    _Rule("transformer.decoder.layers.{n}.norm1.{param}", "model.decoder.layers.{n}.encoder_attn_layer_norm.{param}"),
    _Rule("transformer.decoder.layers.{n}.self_attn.out_proj.{param}",
          "model.decoder.layers.{n}.self_attn.out_proj.{param}"),
    _Rule("transformer.decoder.layers.{n}.norm2.{param}", "model.decoder.layers.{n}.self_attn_layer_norm.{param}"),
    _Rule("transformer.decoder.layers.{n}.linear1.{param}", "model.decoder.layers.{n}.fc1.{param}"),
    _Rule("transformer.decoder.layers.{n}.linear2.{param}", "model.decoder.layers.{n}.fc2.{param}"),
    _Rule("transformer.decoder.layers.{n}.norm3.{param}", "model.decoder.layers.{n}.final_layer_norm.{param}"),
    _Rule("transformer.decoder.class_embed.{n}.{param}", "model.decoder.class_embed.{n}.{param}"),
    _Rule("transformer.decoder.bbox_embed.{n}.layers.{k}.{param}", "model.decoder.bbox_embed.{n}.layers.{k}.{param}"),
    _Rule("class_embed.{n}.{param}", "class_embed.{n}.{param}"),
    _Rule("bbox_embed.{n}.layers.{k}.{param}", "bbox_embed.{n}.layers.{k}.{param}"),
)
_HF_BACKBONE = "model.backbone.conv_encoder.model."
_BACKBONE_RULES = {
    # timm's ResNet has torchvision's names
    "timm": (_Rule("backbone.0.body.{layer}.{block}.{name}.{param}", _HF_BACKBONE + "{layer}.{block}.{name}.{param}"),
             _Rule("backbone.0.body.{layer}.{block}.downsample.{k}.{param}",
                   _HF_BACKBONE + "{layer}.{block}.downsample.{k}.{param}"),
             _Rule("backbone.0.body.{name}.{param}", _HF_BACKBONE + "{name}.{param}")),
    "transformers": (
        _Rule("backbone.0.body.conv1.weight", _HF_BACKBONE + "embedder.embedder.convolution.weight"),
        _Rule("backbone.0.body.bn1.{param}", _HF_BACKBONE + "embedder.embedder.normalization.{param}"),
        _Rule("backbone.0.body.layer{stage}.{block}.conv{conv}.weight",
              _HF_BACKBONE + "encoder.stages.{stage}.layers.{block}.layer.{conv}.convolution.weight",
              ("stage", "conv")),
        _Rule("backbone.0.body.layer{stage}.{block}.bn{conv}.{param}",
              _HF_BACKBONE + "encoder.stages.{stage}.layers.{block}.layer.{conv}.normalization.{param}",
              ("stage", "conv")),
        _Rule("backbone.0.body.layer{stage}.{block}.downsample.0.weight",
              _HF_BACKBONE + "encoder.stages.{stage}.layers.{block}.shortcut.convolution.weight", ("stage",)),
        _Rule("backbone.0.body.layer{stage}.{block}.downsample.1.{param}",
              _HF_BACKBONE + "encoder.stages.{stage}.layers.{block}.shortcut.normalization.{param}", ("stage",)),
    ),
}
_QKV = ("q_proj", "k_proj", "v_proj")
_IN_PROJ = re.compile(r"transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)")
_HF_QKV = re.compile(r"model\.decoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")


def legacy_name(key: str) -> str:
    """A transformers parameter name in the legacy form ``save_pretrained`` writes (transformers 5 renames these at
    load time): ``model.backbone.model`` -> ``model.backbone.conv_encoder.model``, ``self_attn.o_proj`` ->
    ``self_attn.out_proj``, ``layers.N.mlp.fcK`` -> ``layers.N.fcK``."""
    if key.startswith("model.backbone.") and not key.startswith("model.backbone.conv_encoder."):
        key = "model.backbone.conv_encoder." + key[len("model.backbone."):]
    key = key.replace(".self_attn.o_proj.", ".self_attn.out_proj.")
    return re.sub(r"\.layers\.(\d+)\.mlp\.(fc\d)\.", r".layers.\1.\2.", key)


def official_to_hf(state_dict: dict[str, torch.Tensor], backbone_form: str) -> dict[str, torch.Tensor]:
    """Our (official-name) state_dict -> transformers' legacy names, every tied copy listed, each tensor its own
    contiguous copy (safetensors refuses shared storage)."""
    rules = _BACKBONE_RULES[backbone_form] + _TRANSFORMER_RULES
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        tensor = tensor.detach().to("cpu").clone().contiguous()
        match = _IN_PROJ.fullmatch(key)
        if match:
            layer, param = match.groups()
            for name, part in zip(_QKV, tensor.chunk(3, dim=0)):
                converted[f"model.decoder.layers.{layer}.self_attn.{name}.{param}"] = part.clone().contiguous()
            continue
        name = _convert(key, rules, to_theirs=True)
        if name is None:
            raise CheckpointError(f"parameter {key!r} has no counterpart in transformers' DeformableDetr")
        converted[name] = tensor
    return converted


def _tie_candidates(key: str, two_stage: bool) -> list[str]:
    """Our name ``key``, then the names whose tensor it shares in transformers' model (see the module docstring)."""
    candidates = [key]
    match = re.fullmatch(r"(transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
    if match:
        inside, head, index, rest = match.groups()
        candidates.append(f"{head}.{index}.{rest}" if inside else f"transformer.decoder.{head}.{index}.{rest}")
        if not two_stage and index != "0":
            candidates += [f"{head}.0.{rest}", f"transformer.decoder.{head}.0.{rest}"]
    return candidates


def hf_to_official(hf_state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], backbone_form: str,
                   two_stage: bool, source: str) -> dict[str, torch.Tensor]:
    """transformers' state_dict (either naming) -> ours, with exactly the keys of ``expected`` (our model's
    state_dict); tied copies the file lists once are filled from their ties. Tensors left over or keys missing are
    a :class:`CheckpointError` naming a few of them (in the file's names) and their count."""
    rules = _BACKBONE_RULES[backbone_form] + _TRANSFORMER_RULES
    ours: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in hf_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        legacy = legacy_name(key)
        match = _HF_QKV.fullmatch(legacy)
        if match:
            layer, name, param = match.groups()
            qkv.setdefault((layer, param), {})[name] = tensor
            continue
        name = _convert(legacy, rules, to_theirs=False)
        if name is None or name not in expected:
            unexpected.append(key)
        else:
            ours[name] = tensor
    for (layer, param), parts in qkv.items():
        name = f"transformer.decoder.layers.{layer}.self_attn.in_proj_{param}"
        if name in expected and len(parts) == 3:
            ours[name] = torch.cat([parts[part] for part in _QKV], 0)
        elif name not in expected:
            unexpected += [f"model.decoder.layers.{layer}.self_attn.{part}.{param}" for part in parts]
    state: dict[str, torch.Tensor] = {}
    missing = []
    for key in expected:
        found = next((ours[name] for name in _tie_candidates(key, two_stage) if name in ours), None)
        if found is None:
            missing.append(key)
        else:
            state[key] = found
    if missing or unexpected:
        missing_hf = []
        for key in missing:
            match = _IN_PROJ.fullmatch(key)
            if match:
                missing_hf += [f"model.decoder.layers.{match.group(1)}.self_attn.{part}.{match.group(2)}"
                               for part in _QKV if part not in qkv.get((match.group(1), match.group(2)), {})]
            else:
                missing_hf.append(_convert(key, rules, to_theirs=True) or key)
        raise CheckpointError(
            f"{source}: the weights do not fit the model its config.json describes: {_few(missing_hf)} missing, "
            f"{_few(unexpected)} unexpected (a truncated or edited file, or weights of another config?)")
    return state


def _few(names: list[str], shown: int = 3) -> str:
    if not names:
        return "no tensor"
    listed = ", ".join(repr(name) for name in names[:shown])
    return f"{len(names)} tensor(s) ({listed}{', ...' if len(names) > shown else ''})"


def _check_shared_heads(state: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Without box refinement the official model has one class head and one box head for all decoder layers; a
    file whose per-layer copies differ does not describe such a model."""
    if config.with_box_refine:
        return
    for key, tensor in state.items():
        match = re.fullmatch(r"(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
        if match and match.group(2) != "0":
            first = state[f"{match.group(1)}.0.{match.group(3)}"]
            if not torch.equal(first, tensor):
                raise CheckpointError(f"{source}: {key} differs from {match.group(1)}.0.{match.group(3)}, but "
                                      "without box refinement (with_box_refine false) every decoder layer shares "
                                      "one head")


# ------------------------------------------------------------------------------------------------------ config


def _config_error(source: str, message: str) -> CheckpointError:
    return CheckpointError(f"{source}: {message}")


def _timm_resnet(name: Any, source: str) -> str:
    """``resnet50``, ``timm/resnet50.a1_in1k`` -> ``resnet50``; other timm models are an error naming them."""
    base = str(name).split("/")[-1].split(".")[0]
    if base not in _RESNET_DEPTHS:
        raise _config_error(source, f"backbone {name!r} is not one of the ResNets this library builds "
                                    f"({', '.join(_RESNET_DEPTHS)})")
    return base


def _hf_resnet(backbone: dict[str, Any], source: str) -> str:
    """The torchvision name of transformers' ResNet described by ``backbone`` (its ``backbone_config``)."""
    layer_type = backbone.get("layer_type", "bottleneck")
    depths = list(backbone.get("depths", [3, 4, 6, 3]))
    width = 64 if layer_type == "basic" else 256
    for name, (kind, blocks) in _RESNET_DEPTHS.items():
        if (kind, blocks) == (layer_type, depths):
            expected_sizes = [width * 2 ** k for k in range(4)]
            sizes = list(backbone.get("hidden_sizes", expected_sizes))
            stem = backbone.get("embedding_size", 64)
            if sizes != expected_sizes or stem != 64 or backbone.get("downsample_in_first_stage", False) or \
                    backbone.get("downsample_in_bottleneck", False) or backbone.get("hidden_act", "relu") != "relu":
                break
            return name
    raise _config_error(source, f"backbone_config describes a ResNet ({layer_type} blocks {depths}, hidden_sizes "
                                f"{backbone.get('hidden_sizes')}) that is not torchvision's resnet18/34/50/101")


def _backbone_of(config: dict[str, Any], source: str) -> tuple[str, str, bool, list[int] | None]:
    """(form, torchvision ResNet name, dilation, the stages it returns or None) from a transformers config, in the
    form transformers 4 writes (``use_timm_backbone``, ``backbone``) or 5 (``backbone_config``)."""
    backbone = config.get("backbone_config")
    if isinstance(backbone, dict):
        kind = backbone.get("model_type")
        if kind == "timm_backbone":
            stride = backbone.get("output_stride")
            return ("timm", _timm_resnet(backbone.get("backbone"), source),
                    bool(config.get("dilation")) or stride == 16, backbone.get("out_indices"))
        if kind == "resnet":
            # transformers' ResNet has no dilation: it ignores the top-level flag, and so do we.
            stages = [int(s[len("stage"):]) for s in backbone.get("out_features") or [] if s.startswith("stage")]
            return "transformers", _hf_resnet(backbone, source), False, stages or backbone.get("out_indices")
        raise _config_error(source, f"backbone_config of model_type {kind!r}: only a ResNet (timm_backbone or "
                                    "resnet) maps onto this library's backbones")
    if backbone is not None:
        raise _config_error(source, f"backbone_config must be a dict, found {type(backbone).__name__}")
    if config.get("use_timm_backbone", True):
        return "timm", _timm_resnet(config.get("backbone") or "resnet50", source), bool(config.get("dilation")), None
    # transformers 4 without timm and without a backbone_config: its default ResNetConfig, ResNet-50
    return "transformers", "resnet50", False, None


def model_config_from_hf(config: dict[str, Any], source: str) -> tuple[ModelConfig, str, dict[int, str]]:
    """(our ModelConfig, the backbone form, class names) from the dict of a transformers ``config.json``. The loss
    and matcher settings stay the official defaults; settings transformers has and we do not are an error."""
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        known = f" ({_OTHER_DETECTORS[model_type]})" if model_type in _OTHER_DETECTORS else ""
        raise _config_error(source, f"a Hugging Face model of model_type {model_type!r}{known}, not Deformable DETR "
                                    f"(expected model_type {MODEL_TYPE!r})")
    architectures = config.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in architectures:
        raise _config_error(source, f"holds {', '.join(map(str, architectures))}, not {ARCHITECTURE} (a model "
                                    "without the detection heads cannot detect)")
    for name, supported in (("position_embedding_type", "sine"), ("activation_function", "relu")):
        if config.get(name, supported) != supported:
            raise _config_error(source, f"{name} {config[name]!r} is not supported (only {supported!r}, as in the "
                                        "official model)")
    for ours, theirs in (("dim_feedforward", ("encoder_ffn_dim", "decoder_ffn_dim")),
                         ("nheads", ("encoder_attention_heads", "decoder_attention_heads"))):
        values = {config.get(name, 1024 if "ffn" in name else 8) for name in theirs}
        if len(values) > 1:
            raise _config_error(source, f"{theirs[0]} and {theirs[1]} differ ({sorted(values)}); this library has one "
                                        f"{ours} for both")
    form, backbone, dilation, stages = _backbone_of(config, source)
    levels = int(config.get("num_feature_levels", 4))
    wanted = [2, 3, 4] if levels > 1 else [4]
    if stages is not None and list(stages) != wanted:
        raise _config_error(source, f"the backbone returns stages {list(stages)}, but a model of {levels} feature "
                                    f"level(s) reads {wanted}")
    id2label = config.get("id2label") or {}
    num_labels = int(config.get("num_labels", len(id2label) or 91))
    if id2label and len(id2label) != num_labels:
        raise _config_error(source, f"num_labels {num_labels} but id2label has {len(id2label)} entries")
    names = {int(k): str(v) for k, v in id2label.items() if str(v) != f"LABEL_{int(k)}"}
    two_stage = bool(config.get("two_stage", False))
    try:
        model = ModelConfig(
            num_classes=num_labels, backbone=backbone, dilation=dilation, num_feature_levels=levels,
            enc_layers=int(config.get("encoder_layers", 6)), dec_layers=int(config.get("decoder_layers", 6)),
            dim_feedforward=int(config.get("encoder_ffn_dim", 1024)), hidden_dim=int(config.get("d_model", 256)),
            dropout=float(config.get("dropout", 0.1)), nheads=int(config.get("encoder_attention_heads", 8)),
            num_queries=int(config.get("two_stage_num_proposals" if two_stage else "num_queries", 300)),
            dec_n_points=int(config.get("decoder_n_points", 4)), enc_n_points=int(config.get("encoder_n_points", 4)),
            with_box_refine=bool(config.get("with_box_refine", False)), two_stage=two_stage)
    except ValueError as error:
        raise _config_error(source, f"does not describe a model this library builds ({error})") from error
    if two_stage and not model.with_box_refine:
        raise _config_error(source, "two_stage without with_box_refine (the official two-stage model refines boxes; "
                                    "transformers refuses this config too)")
    return model, form, names


def hf_config_from_model(config: ModelConfig, class_names: dict[int, str], backbone_form: str) -> dict[str, Any]:
    """The ``config.json`` of transformers for our ``config`` (the transformers 4 form, which 5 reads as well)."""
    if backbone_form not in BACKBONE_FORMS:
        raise ValueError(f"backbone_form must be one of {', '.join(BACKBONE_FORMS)}, got {backbone_form!r}")
    if not math.isclose(config.position_embedding_scale, 2 * math.pi, rel_tol=0, abs_tol=1e-12):
        raise ValueError(f"position_embedding_scale {config.position_embedding_scale} cannot be written: "
                         "transformers fixes it to 2 pi")
    if config.dilation and backbone_form != "timm":
        raise ValueError("a DC5 model (dilation) needs the timm backbone form: transformers' own ResNet has no "
                         "dilation")
    num_classes = int(config.num_classes)
    id2label = {str(i): class_names.get(i, f"LABEL_{i}") for i in range(num_classes)}

    def number(value: float) -> int | float:  # transformers types its integral costs as int
        return int(value) if float(value).is_integer() else float(value)

    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "d_model": config.hidden_dim, "encoder_layers": config.enc_layers, "decoder_layers": config.dec_layers,
        "encoder_ffn_dim": config.dim_feedforward, "decoder_ffn_dim": config.dim_feedforward,
        "encoder_attention_heads": config.nheads, "decoder_attention_heads": config.nheads,
        "num_queries": config.num_queries, "two_stage_num_proposals": config.num_queries,
        "num_feature_levels": config.num_feature_levels, "encoder_n_points": config.enc_n_points,
        "decoder_n_points": config.dec_n_points, "with_box_refine": config.with_box_refine,
        "two_stage": config.two_stage, "activation_function": "relu", "position_embedding_type": "sine",
        # The official model drops out after the activation and in the decoder self-attention too.
        "dropout": config.dropout, "attention_dropout": config.dropout, "activation_dropout": config.dropout,
        "auxiliary_loss": config.aux_loss, "class_cost": number(config.set_cost_class),
        "bbox_cost": number(config.set_cost_bbox), "giou_cost": number(config.set_cost_giou),
        "bbox_loss_coefficient": number(config.bbox_loss_coef), "giou_loss_coefficient": number(config.giou_loss_coef),
        "focal_alpha": config.focal_alpha, "dilation": config.dilation,
        "num_labels": num_classes, "id2label": id2label, "label2id": {name: int(i) for i, name in id2label.items()},
    }
    if backbone_form == "timm":
        hf.update(use_timm_backbone=True, backbone=config.backbone, use_pretrained_backbone=False)
    else:
        layer_type, depths = _RESNET_DEPTHS[config.backbone]
        width = 64 if layer_type == "basic" else 256
        hf.update(use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config={
            "model_type": "resnet", "layer_type": layer_type, "depths": depths, "embedding_size": 64,
            "hidden_sizes": [width * 2 ** k for k in range(4)], "hidden_act": "relu",
            "downsample_in_first_stage": False, "downsample_in_bottleneck": False,
            "out_features": ["stage2", "stage3", "stage4"] if config.num_feature_levels > 1 else ["stage4"]})
    return hf


# ----------------------------------------------------------------------------------------------------- reading


def hf_folder_of(path: str | Path) -> Path | None:
    """The Hugging Face folder ``path`` names (the folder, its ``config.json``, or a ``.safetensors`` file in it),
    or None when ``path`` is no such thing (an ordinary checkpoint)."""
    path = Path(path)
    if path.is_dir():
        return path if (path / CONFIG_NAME).is_file() else None
    if path.name == CONFIG_NAME or path.suffix == ".safetensors":
        return path.parent
    return None


def looks_like_hf_state_dict(state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` has transformers' DeformableDetr parameter names (and not the official ones)."""
    return any(isinstance(key, str) and key.startswith(_HF_PREFIXES) for key in state_dict)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: unreadable safetensors file ({line[:200]}; a truncated download?)") from error


def _load_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin``, loaded with ``weights_only=True`` (no code from the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load reports bytes that are no checkpoint in many ways
        line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: unreadable weights file ({line[:200]})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict (names -> tensors), found {type(state).__name__}")
    return state


def _load_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights of a Hugging Face folder: ``model.safetensors``, else ``pytorch_model.bin``."""
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        weights = folder / name
        if weights.is_file():
            return weights, (_load_safetensors(weights) if name == WEIGHTS_NAME else _load_torch_weights(weights))
    found = sorted(p.name for p in folder.iterdir())
    sharded = " (sharded weights are not supported)" if any(n.endswith(".index.json") for n in found) else ""
    raise CheckpointError(f"{folder}: a Hugging Face folder without weights: no {WEIGHTS_NAME} or "
                          f"{LEGACY_WEIGHTS_NAME} (found {found[:8]}){sharded}")


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The dict of ``folder/config.json``; a file that is no JSON object is a one-line :class:`CheckpointError`."""
    path = Path(folder) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: no such file (a Hugging Face folder has config.json beside its weights)") \
            from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable, not a JSON file ({error})") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _eval_sizes(folder: Path) -> DataConfig:
    """The eval resize from ``preprocessor_config.json`` when there is one (shortest/longest edge), else ours."""
    path = folder / PREPROCESSOR_NAME
    if not path.is_file():
        return DataConfig()
    try:
        size = json.loads(path.read_text()).get("size") or {}
        return DataConfig(val_size=int(size["shortest_edge"]), max_size=int(size["longest_edge"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return DataConfig()  # another resize than the official one: the official sizes, as for any checkpoint


def read_hf_checkpoint(path: str | Path, state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """A checkpoint dict in ``ddetr train``'s format (official names, our configs, class names) from a Hugging
    Face folder, its ``config.json``, or its weights file (``.safetensors``, or a ``pytorch_model.bin`` whose
    tensors ``read_checkpoint`` loaded: ``state``). A ``.safetensors`` file with official names and no
    ``config.json`` beside it is read as a bare state_dict, whose model its weights tell."""
    from deformable_detr.model.build import build_from_config

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = None if path.is_dir() or path.name == CONFIG_NAME else path
    if weights is not None and state is None:
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {weights}: no such file")
        state = _load_safetensors(weights)
    if weights is not None and not (folder / CONFIG_NAME).is_file():
        if not looks_like_hf_state_dict(state):
            return {"model": state}
        raise CheckpointError(f"checkpoint {weights}: Hugging Face transformers weights (DeformableDetr parameter "
                              f"names, e.g. {next(iter(state))!r}) without the {CONFIG_NAME} that describes their "
                              "model; give the folder that holds both")
    config_path = folder / CONFIG_NAME
    model_cfg, form, names = model_config_from_hf(read_hf_config(folder), str(config_path))
    if weights is None:
        weights, hf_state = _load_weights(folder)
    else:
        hf_state = state
    bad = sorted({str(t.dtype) for t in hf_state.values() if t.dtype not in _FLOAT_DTYPES and t.dtype != torch.int64})
    if bad:
        raise CheckpointError(f"{weights}: tensors of dtype {', '.join(bad)}; expected floating-point weights")
    if not looks_like_hf_state_dict(hf_state):
        raise CheckpointError(f"{weights}: no transformers DeformableDetr parameter names (first: "
                              f"{list(hf_state)[:3]}); expected e.g. 'model.backbone.conv_encoder.model.conv1.weight'")
    model, _, _ = build_from_config(model_cfg)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = hf_to_official(hf_state, expected, form, model_cfg.two_stage, str(weights))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{weights}: tensor for {key!r} has shape {tuple(tensor.shape)}, the model of "
                                  f"{CONFIG_NAME} expects {tuple(expected[key].shape)}")
    state = {key: tensor.to(torch.float32) if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
             for key, tensor in state.items()}
    _check_shared_heads(state, model_cfg, str(weights))
    checkpoint = make_checkpoint(state, RunConfigs(model_cfg, TrainConfig(), _eval_sizes(folder)), names)
    checkpoint["source_format"] = "huggingface"
    return checkpoint


# ----------------------------------------------------------------------------------------------------- writing


def export_hf(checkpoint: str | Path, out: str | Path, *, backbone_form: str = "timm", variant: str | None = None,
              trusted: bool = False) -> Path:
    """Writes the model of ``checkpoint`` (ours, official, or a Hugging Face folder) as a transformers folder
    ``out``: ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` (the eval resize and
    normalisation). Returns ``out``. The weights are those ``ddetr predict`` runs (the EMA weights of a checkpoint
    of ``ddetr train --ema``). ``variant``: as for ``ddetr predict``, for checkpoints without settings."""
    from deformable_detr.checkpoint import model_weights, stored_configs
    from deformable_detr.checkpoint_config import config_from_checkpoint
    from deformable_detr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from deformable_detr.inference.detector import class_names_of

    if backbone_form not in BACKBONE_FORMS:
        raise ValueError(f"backbone form must be one of {', '.join(BACKBONE_FORMS)}, got {backbone_form!r}")
    data = read_checkpoint(checkpoint, trusted=trusted)
    config = config_from_checkpoint(data, str(checkpoint), variant=variant)
    stored = stored_configs(data, str(checkpoint))
    sizes = stored.data if stored is not None else DataConfig()
    hf_config = hf_config_from_model(config, class_names_of(data, config.num_classes), backbone_form)
    tensors = official_to_hf(model_weights(data)[0], backbone_form)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    preprocessor = {
        "image_processor_type": "DeformableDetrImageProcessor", "format": "coco_detection",
        "do_resize": True, "size": {"shortest_edge": sizes.val_size, "longest_edge": sizes.max_size},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_convert_annotations": True,
        "do_pad": True}
    _write_atomic(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(hf_config, indent=2) + "\n"))
    _write_atomic(out / PREPROCESSOR_NAME, lambda p: p.write_text(json.dumps(preprocessor, indent=2) + "\n"))
    from safetensors.torch import save_file

    _write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return out


def _write_atomic(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
