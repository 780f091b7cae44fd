"""State-dict layout, parameter counts and the ddetr-init-v1 weights against the official checkpoint layout."""

from __future__ import annotations

import json

import pytest
import torch

from deformable_detr import build_model
from deformable_detr.config import VARIANTS
from deformable_detr.verify.reference_init import apply_ddetr_init_v1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_layout_and_counts(reference_path, variant):
    expected = json.loads((reference_path / f"state_dict_keys_{variant}.json").read_text())
    model, _, _ = build_model(variant)
    state = model.state_dict()
    assert [k["name"] for k in expected["keys"]] == list(state), "keys or their order differ from the official ones"
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for entry in expected["keys"]:
        tensor = state[entry["name"]]
        assert list(tensor.shape) == entry["shape"], entry["name"]
        assert str(tensor.dtype) == f"torch.{entry['dtype']}", entry["name"]
        assert (entry["name"] in parameters) == (entry["kind"] == "parameter"), entry["name"]
        if entry["kind"] == "parameter":
            assert parameters[entry["name"]].requires_grad == entry["trainable"], entry["name"]
    counts = expected["param_counts"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts["trainable"]
    assert sum(p.numel() for p in model.parameters()) == counts["total_params"]
    # The official model's buffers are all saved; ours also hold the position encoding's frequencies, not saved.
    assert sum(t.numel() for name, t in state.items() if name not in parameters) == counts["buffers"]
    # Tied entries are one tensor, as in the official model.
    for group in expected["tied_groups"]:
        pointers = {state[name].data_ptr() for name in group}
        assert len(pointers) == 1, group


@pytest.mark.parametrize("variant", ["deformable_detr", "two_stage"])
def test_ddetr_init_v1_matches_official_sums(reference_path, variant):
    expected = json.loads((reference_path / f"state_dict_keys_{variant}.json").read_text())
    model, _, _ = build_model(variant)
    apply_ddetr_init_v1(model)
    state = model.state_dict()
    for entry in expected["keys"]:
        total = state[entry["name"]].double().sum().item()
        assert total == pytest.approx(entry["sum"], rel=1e-12, abs=1e-12), entry["name"]


def test_official_initialisation_of_the_heads():
    model, _, _ = build_model("box_refine")
    prior_bias = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    assert torch.allclose(model.class_embed[3].bias, prior_bias.expand(91))
    assert model.bbox_embed[0].layers[-1].weight.abs().sum() == 0
    assert torch.equal(model.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert torch.equal(model.bbox_embed[1].layers[-1].bias, torch.zeros(4))
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    attention = model.transformer.encoder.layers[0].self_attn
    # Head 0 looks right (+x), head 2 (angle pi/2) down (+y), point k at distance k + 1.
    offsets = attention.sampling_offsets.bias.view(8, 4, 4, 2)
    assert torch.allclose(offsets[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.allclose(offsets[2, 1, :, 1], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert attention.sampling_offsets.weight.abs().sum() == 0
    two_stage, _, _ = build_model("two_stage")
    assert all(torch.equal(head.layers[-1].bias, torch.zeros(4)) for head in two_stage.bbox_embed)
    assert two_stage.transformer.decoder.class_embed is two_stage.class_embed
