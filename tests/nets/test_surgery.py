"""ULSAM surgery on a pretrained backbone, and what a checkpoint's tensors say about its network."""

from pathlib import Path

import pytest
import torch

from ulsam_deploy.errors import InputFileError, SpecError
from ulsam_deploy.nets import build_model, save_checkpoint
from ulsam_deploy.nets.build import read_checkpoint
from ulsam_deploy.nets.surgery import infer_width, layer_channels, source_fields, transplant
from ulsam_deploy.model.spec import ModelSpec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TV = FIXTURES / "torchvision_mv2_050_c10.pth"


@pytest.fixture(scope="module")
def tv():
    return read_checkpoint(TV)


@pytest.mark.parametrize("name,fields", [
    ("torchvision_mv2_050_c10.pth", {"arch": "mv2", "width": 0.5, "num_classes": 10, "positions": ""}),
    ("timm_mv2_035_c10.safetensors", {"arch": "mv2", "width": 0.35, "num_classes": 10, "positions": ""}),
    ("timm_mv1_100_c10_ddp.pth", {"arch": "mv1", "width": 1.0, "num_classes": 10, "positions": ""}),
])
def test_fixtures_say_what_they_are(name, fields):
    assert source_fields(read_checkpoint(FIXTURES / name)) == fields   # never an activation: it must be asked for


@pytest.mark.parametrize("arch,width", [("mv2", w) for w in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)] +
                         [("mv1", w) for w in (0.25, 0.5, 0.75, 1.0, 1.25)])
def test_width_is_read_back_from_channel_counts(arch, width):
    state = build_model(ModelSpec.parse(arch, "", width=width)).state_dict()
    assert infer_width(arch, layer_channels(state)) == width


def test_positions_and_groups_are_read_from_our_pth(tmp_path):
    spec = ModelSpec.parse("mv2", "13,17:1", groups=8, width=0.5, num_classes=4)
    torch.save(build_model(spec).state_dict(), tmp_path / "ours.pth")
    fields = source_fields(read_checkpoint(tmp_path / "ours.pth"))
    assert fields == {"arch": "mv2", "width": 0.5, "num_classes": 4, "positions": "13,17:1", "groups": 8}


def test_surgery_drops_substituted_layers_and_creates_ulsams(tv):
    spec = ModelSpec.parse("mv2", "13,14,16,17", groups=4, width=0.5, num_classes=10)
    model, report = transplant(tv, spec)
    substituted = {"13", "14", "16", "17"}
    expected_dropped = sorted(k for k in tv.state if k.split(".")[1].removeprefix("layer") in substituted)
    dropped = sorted(k for row in report.layers for k in row.dropped)
    new = sorted(k for row in report.layers for k in row.new)
    assert dropped == expected_dropped and len(dropped) == 4 * 18
    assert new == sorted(f"features.layer{n}.{m}.{p}" for n in substituted
                         for m, params in (("dw", ("weight", "bias")), ("pw", ("weight", "bias")),
                                           ("dw_bn", ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
                                           ("pw_bn", ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")))
                         for p in params)
    assert (report.loaded, report.dropped, report.new) == (314 - 72, 72, 56)
    state = model.state_dict()
    kept = [k for k in tv.state if k not in expected_dropped]
    assert all(torch.equal(state[k], tv.state[k]) for k in kept)
    rows = {row.layer: row for row in report.layers}
    assert rows["13"].checkpoint == "inverted residual" and rows["13"].model == "ULSAM g=4" and rows["13"].loaded == 0
    assert rows["12"].loaded == 18 and not rows["12"].dropped and not rows["12"].new


def test_surgery_with_an_insertion_and_another_class_count(tv):
    model, report = transplant(tv, ModelSpec.parse("mv2", "17:1", groups=4, width=0.5, num_classes=3))
    rows = {row.layer: row for row in report.layers}
    assert rows["17:1"].checkpoint == "-" and rows["17:1"].model == "ULSAM g=4" and len(rows["17:1"].new) == 14
    assert rows["classifier"].dropped == ["classifier.weight", "classifier.bias"]
    assert rows["classifier"].new == ["classifier.weight", "classifier.bias"]
    assert rows["classifier"].checkpoint == "linear 1280->10" and rows["classifier"].model == "linear 1280->3"
    assert report.dropped == 2 and report.new == 16


def test_a_plain_conversion_loads_everything(tv):
    model, report = transplant(tv, ModelSpec.parse("mv2", "", width=0.5, num_classes=10))
    assert (report.loaded, report.dropped, report.new) == (314, 0, 0)


def test_our_ulsam_with_other_groups_is_reinitialised(tmp_path):
    spec = ModelSpec.parse("mv2", "13", groups=4, width=0.5, num_classes=4, input_size=64)
    path = save_checkpoint(build_model(spec, seed=1), tmp_path / "m.safetensors")
    model, report = transplant(read_checkpoint(path), spec.replace(groups=8), seed=2)
    rows = {row.layer: row for row in report.layers}
    # the depthwise half keeps its shapes (and the scalar BN counters); the grouped half is new
    assert rows["13"].loaded == 8 and sorted(rows["13"].new) == sorted(
        f"features.layer13.{k}" for k in ("pw.weight", "pw.bias", "pw_bn.weight", "pw_bn.bias", "pw_bn.running_mean",
                                          "pw_bn.running_var"))


@pytest.mark.parametrize("spec,needle", [
    (ModelSpec.parse("mv2", "13", width=0.75, num_classes=10), "has width 0.5 (16 channels at layer 1); --width 0.75 has 24"),
    (ModelSpec.parse("mv1", "", width=0.5, num_classes=10), "pass --arch mv2"),
    (ModelSpec.parse("mv2", "", width=0.5, num_classes=10, activation="relu"), "pass --activation relu6"),
])
def test_contradictions_are_named(tv, spec, needle):
    with pytest.raises(SpecError) as info:
        transplant(tv, spec)
    assert needle in info.value.one_line()


def test_stored_spec_contradiction_is_named(tmp_path):
    spec = ModelSpec.parse("mv1", "", width=0.5, num_classes=4, input_size=64)
    path = save_checkpoint(build_model(spec), tmp_path / "m.safetensors")
    with pytest.raises(SpecError, match="width 0.5; the options ask for 1.0"):
        transplant(read_checkpoint(path), spec.replace(width=1.0))


def test_a_backbone_tensor_of_another_shape_is_refused(tmp_path):
    spec = ModelSpec.parse("mv2", "", width=0.5, num_classes=10)
    state = build_model(spec).state_dict()
    state["features.layer5.conv.1.0.weight"] = torch.zeros(1, 1, 5, 5)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(InputFileError, match="features.layer5.conv.1.0.weight has shape"):
        transplant(read_checkpoint(tmp_path / "odd.pth"), spec)
