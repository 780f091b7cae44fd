"""The typed configs: official defaults, validation naming the field, plain-data round trips, precedence."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from deformable_detr.config import (
    ARCHITECTURE_FIELDS,
    CONFIG_CLASSES,
    OFFICIAL_FIXED_FLAGS,
    OFFICIAL_IGNORED_FLAGS,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_architecture,
    field_docs,
    from_dict,
    merge_data,
    model_config,
    settings_from_namespace,
    to_dict,
)

DATA = Path(__file__).parent / "data"


def test_defaults_equal_the_official_main_py():
    official = json.loads((DATA / "official_main_defaults.json").read_text())
    del official["_source"]
    # Two deliberate differences: data must be named (no silent ./data/coco), and the device follows the machine.
    assert official.pop("coco_path") == "./data/coco" and DataConfig().coco_path is None
    assert official.pop("device") == "cuda" and TrainConfig().device == "auto"
    del official["eval"]  # a mode of the command, not a setting
    settings = settings_from_namespace(official)
    for kind, cls in CONFIG_CLASSES.items():
        default = cls()
        for name, value in settings[kind].items():
            assert getattr(default, name) == value, (kind, name)
    # Every official flag is a setting of ours, fixed, or ignored: none is forgotten.
    ours = {f.name for cls in CONFIG_CLASSES.values() for f in dataclasses.fields(cls)}
    assert set(official) <= ours | set(OFFICIAL_FIXED_FLAGS) | set(OFFICIAL_IGNORED_FLAGS) | {"aux_loss"}
    assert DataConfig().train_scales == tuple(range(480, 801, 32))


def test_field_names_are_unique_and_documented():
    names = [f.name for cls in CONFIG_CLASSES.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)), "a flag name would belong to two configs"
    for cls in CONFIG_CLASSES.values():
        undocumented = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
        assert not undocumented, (cls.__name__, undocumented)


@pytest.mark.parametrize(("cls", "values", "message"), [
    (TrainConfig, {"lr": -1e-4}, "lr must be a finite number >= 0, got -0.0001"),
    (TrainConfig, {"lr": math.nan}, "lr must be a finite number >= 0"),
    (TrainConfig, {"batch_size": 0}, "batch_size must be a positive int, got 0"),
    (TrainConfig, {"amp": "fp8"}, "amp must be one of bf16, fp16"),
    (TrainConfig, {"drop_class_heads": True}, "drop_class_heads applies to --finetune"),
    (TrainConfig, {"resume": "a.pth", "finetune": "b.pth"}, "either resume"),
    (DataConfig, {"val_size": 1400}, r"val_size \(1400\) must not exceed max_size \(1333\)"),
    (DataConfig, {"crop_size": (600, 384)}, "crop_size must be two ints MIN <= MAX"),
    (DataConfig, {"coco_path": "coco", "val_json": "v.json"}, "either coco_path"),
    (ModelConfig, {"num_classes": 0}, "num_classes must be a positive int"),
    (ModelConfig, {"hidden_dim": 100, "nheads": 4}, "hidden_dim must be a multiple of 32"),
    (ModelConfig, {"msda_backend": "cuda"}, "msda_backend must be one of auto, reference, cpu, triton"),
])
def test_a_value_out_of_range_names_the_field(cls, values, message):
    with pytest.raises(ConfigError, match=message):
        cls(**values)


def test_plain_data_round_trip():
    configs = [model_config("two_stage", num_classes=7, hidden_dim=64),
               TrainConfig(lr_drop_epochs=(3, 5), amp="bf16"), DataConfig(train_scales=(64, 96), crop_size=(32, 48))]
    for config in configs:
        data = to_dict(config)
        assert json.loads(json.dumps(data)) == data  # plain data only
        assert all(not isinstance(v, tuple) for v in data.values())
        assert from_dict(type(config), data) == config
    # An older file lacks a field: its default. A newer one has a field we do not know: an error naming it.
    data = to_dict(TrainConfig())
    del data["print_freq"]
    assert from_dict(TrainConfig, data).print_freq == 10
    with pytest.raises(ConfigError, match=r"unknown TrainConfig field\(s\) \['warmup'\].*newer version"):
        from_dict(TrainConfig, {**data, "warmup": 5}, "config.train")
    with pytest.raises(ConfigError, match="config.train: batch_size must be a positive int"):
        from_dict(TrainConfig, {**data, "batch_size": -2}, "config.train")


def test_explicit_settings_win_over_the_variant_preset():
    assert model_config("single_scale", num_feature_levels=4).num_feature_levels == 4
    assert model_config("single_scale").num_feature_levels == 1


def test_a_setting_that_contradicts_the_weights_names_both_values():
    stored = model_config("deformable_detr", num_classes=5)
    with pytest.raises(ConfigError, match=r"enc_layers 3 here, 6 in the checkpoint"):
        check_architecture(dataclasses.replace(stored, enc_layers=3), stored, "ckpt.pth")
    with pytest.raises(ConfigError, match=r"num_classes 9 here, 5 in the checkpoint.*--drop_class_heads"):
        check_architecture(dataclasses.replace(stored, num_classes=9), stored, "ckpt.pth")
    check_architecture(dataclasses.replace(stored, num_classes=9), stored, "ckpt.pth", allow_num_classes=True)
    # Settings the weights do not depend on may differ.
    check_architecture(dataclasses.replace(stored, msda_backend="reference", dropout=0.0, num_detections=10),
                       stored, "ckpt.pth")
    assert "msda_backend" not in ARCHITECTURE_FIELDS


def test_data_given_explicitly_replaces_the_stored_source():
    stored = DataConfig(train_images="t", train_json="t.json", val_images="v", val_json="v.json", val_size=64,
                        max_size=96)
    assert merge_data(stored, {"coco_path": "coco"}) == DataConfig(coco_path="coco", val_size=64, max_size=96)
    assert merge_data(stored, {"val_size": 80}).val_json == "v.json"


def test_official_flags_with_other_values_are_refused():
    with pytest.raises(ConfigError, match="--position_embedding 'learned' is not supported"):
        settings_from_namespace({"position_embedding": "learned"})
    assert settings_from_namespace({"lr_backbone": 0.0})["model"] == {"train_backbone": False}
