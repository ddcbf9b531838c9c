import pytest
from hypothesis import given, settings, strategies as st

from ulsam_deploy.errors import SpecError
from ulsam_deploy.model.spec import ModelSpec, Placement, parse_positions


def test_grammar_mixed_order_and_spaces():
    spec = ModelSpec.parse("mv1", " 11 ,8:1, 9:1")
    assert spec.placements == (Placement(8, "insert"), Placement(9, "insert"), Placement(11, "substitute"))
    assert spec.positions == "8:1,9:1,11"
    assert ModelSpec.parse("mv1", "8:1, 9:1,11") == spec


@pytest.mark.parametrize("text", ["", "  ", "none", "-"])
def test_empty_means_vanilla(text):
    assert ModelSpec.parse("mv2", text).placements == ()


@pytest.mark.parametrize("arch,positions", [
    ("mv1", "11:1"), ("mv1", "12:1"), ("mv1", "13:1"), ("mv1", "8:1,9:1,11"),
    ("mv2", "17:1"), ("mv2", "13"), ("mv2", "16"), ("mv2", "9,13"), ("mv2", "14,17"),
    ("mv2", "16,17"), ("mv2", "13,14,16,17"), ("mv2", "1:1,19:1"), ("mv1", "14,4,6"),
])
def test_paper_and_other_legal_positions(arch, positions):
    spec = ModelSpec.parse(arch, positions, groups=4)
    assert ModelSpec.from_json(spec.to_json()) == spec


MALFORMED = [
    ("mv2", "0", 4, "no layer 0"), ("mv2", "20:1", 4, "no layer 20"), ("mv1", "15", 4, "no layer 15"),
    ("mv2", "19", 4, "cannot be substituted"), ("mv2", "2", 4, "32 to 16"), ("mv2", "3", 4, "stride is 2"),
    ("mv1", "13", 4, "stride is 2"), ("mv1", "1", 4, "cannot be substituted"), ("mv2", "13,,14", 4, "empty position"),
    ("mv2", "13:2", 4, "':1'"), ("mv2", "13:0", 4, "':1'"), ("mv2", "-3", 4, "'-3'"), ("mv2", "1e9", 4, "'1e9'"),
    ("mv2", "13,13", 4, "twice"), ("mv2", "13:1,13:1", 4, "twice"), ("mv2", "13,13:1", 4, "contradict"),
    ("mv2", "13 14", 4, "'13 14'"), ("mv2", "x", 4, "'x'"), ("mv2", "١٣", 4, "'١٣'"), ("mv2", "13;14", 4, "'13;14'"),
    ("mv2", "13,", 4, "empty position"), ("mv2", ",13", 4, "empty position"), ("mv2", "13", 5, "96 channels"),
    ("mv2", "16", 3, "160 channels"), ("mv1", "8:1", 3, "512 channels"), ("mv2", "13", 0, "groups 0"),
    ("mv2", "13", -4, "groups -4"), ("mv2", ",".join(["13"] * 10_000), 4, "characters long"),
    ("mv3", "", 4, "'mv3'"), ("mv2", "99999", 4, "'99999'"), ("mv2", "13:1:1", 4, "'13:1:1'"),
    ("mv2", "+13", 4, "'+13'"), ("mv2", "13.0", 4, "'13.0'"),
]


@pytest.mark.parametrize("arch,positions,groups,needle", MALFORMED)
def test_malformed_specs_name_the_token(arch, positions, groups, needle):
    with pytest.raises(SpecError) as info:
        ModelSpec.parse(arch, positions, groups=groups)
    line = info.value.one_line()
    assert needle in line and "\n" not in line


@pytest.mark.parametrize("field,value", [("width", 0), ("width", -1.0), ("width", float("nan")), ("width", 1e9),
                                         ("num_classes", 0), ("input_size", 1), ("input_size", 10**6),
                                         ("input_size", 31), ("num_classes", 2.5)])
def test_absurd_sizes(field, value):
    with pytest.raises(SpecError, match=field.replace("_", "-")):
        ModelSpec.parse("mv2", "", **{field: value})


def test_groups_checked_at_scaled_channels():
    ModelSpec.parse("mv2", "13", groups=16, width=1.0)  # 96 channels
    with pytest.raises(SpecError, match="48 channels"):
        ModelSpec.parse("mv2", "13", groups=32, width=0.5)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_grammar_never_crashes(text):
    try:
        ModelSpec.parse("mv2", text, groups=1)
    except SpecError as exc:
        assert "\n" not in exc.one_line()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 19), st.booleans()), max_size=6, unique_by=lambda t: t[0]))
def test_legal_lists_round_trip(items):
    table = {l.number: l for l in ModelSpec.parse("mv2").layers}
    items = [(k, ins) for k, ins in items if ins or table[k].substitutable]
    text = ",".join(f"{k}:1" if ins else str(k) for k, ins in items)
    spec = ModelSpec.parse("mv2", text, groups=1)
    assert parse_positions(spec.positions) == spec.placements
    assert len(spec.placements) == len(items)


def test_activation_defaults_per_arch_and_is_part_of_the_spec():
    assert ModelSpec.parse("mv1").activation == "relu" and ModelSpec.parse("mv2").activation == "relu6"
    assert ModelSpec.parse("mv1") == ModelSpec.parse("mv1", activation="relu")
    timm_mv1 = ModelSpec.parse("mv1", "", num_classes=10, activation="ReLU6")
    assert timm_mv1.activation == "relu6" and timm_mv1.name == "mv1-relu6-c10"
    assert ModelSpec.parse("mv2", activation="relu").name == "mv2-relu"
    assert ModelSpec.from_json(timm_mv1.to_json()) == timm_mv1 and timm_mv1.to_dict()["activation"] == "relu6"
    assert timm_mv1.vanilla().activation == "relu6"


def test_a_stored_spec_without_activation_takes_the_arch_default():
    assert ModelSpec.from_dict({"arch": "mv1", "positions": "8:1"}).activation == "relu"
    assert ModelSpec.from_dict({"arch": "mv2"}).activation == "relu6"


def test_another_arch_takes_its_own_activation():
    assert ModelSpec.parse("mv1", activation="relu6").replace(arch="mv2").activation == "relu6"
    assert ModelSpec.parse("mv2", activation="relu").replace(arch="mv1").activation == "relu"
    assert ModelSpec.parse("mv1", activation="relu6").replace(width=0.5).activation == "relu6"


@pytest.mark.parametrize("value", ["gelu", "relu7", "6"])
def test_unknown_activation(value):
    with pytest.raises(SpecError, match=f"activation '{value}' is unknown"):
        ModelSpec.parse("mv2", activation=value)
