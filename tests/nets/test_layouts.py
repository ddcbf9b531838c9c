"""Checkpoint layouts: torchvision and timm fixtures give those libraries' own logits; every layout round-trips."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ulsam_deploy.errors import InputFileError, SpecError
from ulsam_deploy.nets import build_model, load_model
from ulsam_deploy.nets.build import read_checkpoint
from ulsam_deploy.nets.layouts import BY_NAME, LAYOUTS, detect, to_ours, unwrap
from ulsam_deploy.model.spec import ModelSpec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# fixture file -> (the spec it is, the layout it is in)
CASES = {
    "torchvision_mv2_050_c10.pth": (ModelSpec.parse("mv2", "", width=0.5, num_classes=10), "torchvision-mv2"),
    "timm_mv2_035_c10.safetensors": (ModelSpec.parse("mv2", "", width=0.35, num_classes=10), "timm-mv2"),
    "timm_mv1_100_c10_ddp.pth": (ModelSpec.parse("mv1", "", num_classes=10, activation="relu6"), "timm-mv1"),
}


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURES / "expected.safetensors"))


def _raw(path: Path) -> dict:
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_logits_match_the_library(name, expected):
    spec, layout = CASES[name]
    model = load_model(FIXTURES / name, spec)
    with torch.no_grad():
        logits = model(expected["input"])
    reference = expected[f"logits.{Path(name).stem}"]
    spread = float(reference.max() - reference.min())
    assert spread > 0.5                                       # the fixture's logits are not all alike
    assert float((logits - reference).abs().max()) <= 1e-5 * spread
    assert read_checkpoint(FIXTURES / name).layout.name == layout


@pytest.mark.parametrize("name", sorted(CASES))
def test_mapping_renames_and_never_touches_values(name):
    spec, layout_name = CASES[name]
    raw = unwrap(_raw(FIXTURES / name), name)
    ours, layout = to_ours(raw, name)
    assert layout.name == layout_name and len(ours) == len(raw)
    assert set(ours) == set(build_model(spec).state_dict())
    assert {id(t) for t in ours.values()} == {id(t) for t in raw.values()}   # the same tensor objects
    back = layout.from_ours(ours, spec)
    assert list(back) == list(raw) and all(back[k] is raw[k] for k in raw)


ROUND_TRIP = [
    ("ours", ModelSpec.parse("mv2", "13,16:1", groups=4, width=0.5, num_classes=7)),
    ("ours", ModelSpec.parse("mv1", "8:1,11", groups=8, num_classes=5, activation="relu6")),
    ("official", ModelSpec.parse("mv2", "13,14,16,17", groups=4, width=0.75, num_classes=3)),
    ("official", ModelSpec.parse("mv1", "8:1,9:1,11", groups=4, num_classes=3)),
    *[("torchvision-mv2", ModelSpec.parse("mv2", "", width=w, num_classes=6)) for w in (0.35, 0.5, 0.75, 1.0, 1.4)],
    *[("timm-mv2", ModelSpec.parse("mv2", "", width=w, num_classes=6)) for w in (0.35, 0.5, 0.75, 1.0, 1.4)],
    *[("timm-mv1", ModelSpec.parse("mv1", "", width=w, num_classes=6, activation="relu6")) for w in (0.5, 1.0, 1.25)],
]


@pytest.mark.parametrize("layout_name,spec", ROUND_TRIP, ids=lambda v: v if isinstance(v, str) else v.name)
def test_round_trip_every_layout(layout_name, spec):
    state = build_model(spec, seed=3).state_dict()
    foreign = BY_NAME[layout_name].from_ours(state, spec)
    if layout_name not in ("ours",):
        assert set(foreign) != set(state)
    assert detect(foreign, "x").name == layout_name
    back, layout = to_ours(foreign, "x")
    assert layout.name == layout_name
    assert list(back) == list(state) or set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_timm_stage_numbering_matches_the_fixtures():
    for name in ("timm_mv2_035_c10.safetensors", "timm_mv1_100_c10_ddp.pth"):
        spec, layout = CASES[name]
        raw = unwrap(_raw(FIXTURES / name), name)
        ours = to_ours(raw, name)[0]
        assert set(BY_NAME[layout].from_ours(ours, spec)) == set(raw)


def test_foreign_layouts_have_no_ulsam_names():
    spec = ModelSpec.parse("mv2", "13", width=0.5)
    with pytest.raises(SpecError, match="ULSAM"):
        BY_NAME["torchvision-mv2"].from_ours(build_model(spec).state_dict(), spec)


CONTAINERS = {
    "bare": lambda s: s,
    "state_dict": lambda s: {"state_dict": s, "epoch": 3},
    "model": lambda s: {"model": s, "optimizer": {"lr": 0.1}},
    "model_ema": lambda s: {"model_ema": s},
    "net": lambda s: {"net": s},
    "ddp": lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
    "ddp bare": lambda s: {f"module.{k}": v for k, v in s.items()},
}


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_containers_are_unwrapped(tmp_path, container):
    spec, _ = CASES["torchvision_mv2_050_c10.pth"]
    raw = torch.load(FIXTURES / "torchvision_mv2_050_c10.pth", weights_only=True)
    torch.save(CONTAINERS[container](raw), tmp_path / "c.pt")
    checkpoint = read_checkpoint(tmp_path / "c.pt")
    assert checkpoint.layout.name == "torchvision-mv2" and len(checkpoint.state) == len(raw)


def test_safetensors_with_a_ddp_prefix(tmp_path):
    raw = load_file(str(FIXTURES / "timm_mv2_035_c10.safetensors"))
    save_file({f"module.{k}": v for k, v in raw.items()}, str(tmp_path / "t.safetensors"))
    assert read_checkpoint(tmp_path / "t.safetensors").layout.name == "timm-mv2"


@pytest.mark.parametrize("obj,needle", [
    ({"state_dict": 5}, "keys state_dict"), ({"epoch": 1, "optimizer": {"lr": 0.1}}, "keys epoch, optimizer"),
    ([torch.zeros(1)], "a list"), ({}, "a dict"), ({"state_dict": {"w": torch.zeros(1), "note": "x"}}, "keys"),
])
def test_corrupt_containers_are_refused(tmp_path, obj, needle):
    torch.save(obj, tmp_path / "bad.pth")
    with pytest.raises(InputFileError, match="does not hold a state dict of tensors") as info:
        read_checkpoint(tmp_path / "bad.pth")
    assert needle in info.value.one_line() and "\n" not in info.value.one_line()


def test_unknown_layout_names_layouts_tried_and_misfits(tmp_path):
    raw = torch.load(FIXTURES / "torchvision_mv2_050_c10.pth", weights_only=True)
    raw["aux_head.fc.weight"] = torch.zeros(2, 2)
    torch.save(raw, tmp_path / "odd.pth")
    with pytest.raises(InputFileError) as info:
        read_checkpoint(tmp_path / "odd.pth")
    line = info.value.one_line()
    assert all(layout.title in line for layout in LAYOUTS)
    assert "closest is torchvision mobilenet_v2" in line and "aux_head.fc.weight" in line


def test_layout_arch_and_activation_are_checked():
    with pytest.raises(SpecError) as info:
        load_model(FIXTURES / "timm_mv1_100_c10_ddp.pth", ModelSpec.parse("mv1", "", num_classes=10))
    assert "uses ReLU6; the spec says ReLU (pass --activation relu6)" in info.value.one_line()
    with pytest.raises(SpecError) as info:
        load_model(FIXTURES / "torchvision_mv2_050_c10.pth", ModelSpec.parse("mv1", "", width=0.5, num_classes=10))
    assert "pass --arch mv2" in info.value.one_line()


def test_wrong_class_count_or_width_is_refused_on_a_strict_load():
    path = FIXTURES / "torchvision_mv2_050_c10.pth"
    with pytest.raises(InputFileError, match=r"classifier.weight has shape \(10, 1280\).*\(11, 1280\)"):
        load_model(path, ModelSpec.parse("mv2", "", width=0.5, num_classes=11))
    with pytest.raises(InputFileError, match="features.layer1.0.weight"):
        load_model(path, ModelSpec.parse("mv2", "", width=0.75, num_classes=10))
