import pytest
import torch

from ulsam_deploy.errors import InputFileError, SpecError
from ulsam_deploy.nets import build_model, load_model, save_checkpoint
from ulsam_deploy.nets.build import load_checkpoint
from ulsam_deploy.nets.ulsam import to_official
from ulsam_deploy.model.spec import ModelSpec

SPEC = ModelSpec.parse("mv2", "13,16:1", groups=4, num_classes=10, input_size=64)


@pytest.mark.parametrize("arch,positions,size", [("mv1", "8:1,9:1,11", 32), ("mv2", "13,14,16,17", 40),
                                                 ("mv2", "1:1,19:1", 33), ("mv1", "", 97)])
def test_any_size_and_classes(arch, positions, size):
    model = build_model(ModelSpec.parse(arch, positions, groups=8, width=0.5, num_classes=7, input_size=size))
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_safetensors_round_trip_keeps_spec(tmp_path):
    model = build_model(SPEC, seed=1)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    state, spec = load_checkpoint(path)
    assert spec == SPEC
    loaded = load_model(path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    assert not list(tmp_path.glob("*.part"))


def test_pth_official_layout_is_mapped(tmp_path):
    model = build_model(SPEC, seed=2)
    prefixes = {name: m.groups for name, m in model.ulsam_modules().items()}
    official = to_official(model.state_dict(), prefixes)
    assert any(".subspaces.3.conv_point.weight" in k for k in official)
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.items()}}, tmp_path / "o.pth")
    loaded = load_model(tmp_path / "o.pth", SPEC)
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    save_checkpoint(build_model(SPEC), tmp_path / "m.safetensors")
    other = SPEC.replace(num_classes=11)
    torch.save(build_model(other).state_dict(), tmp_path / "w.pth")
    with pytest.raises(InputFileError, match=r"classifier.weight has shape \(11, 1280\).*\(10, 1280\)"):
        load_model(tmp_path / "w.pth", SPEC)
    with pytest.raises(SpecError, match="holds"):
        load_model(tmp_path / "m.safetensors", other)


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(InputFileError, match="refused"):
        load_model(tmp_path / "evil.pth", SPEC)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x00" * 100])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_checkpoints(tmp_path, content, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(InputFileError):
        load_model(path, SPEC)


def test_truncated_safetensors(tmp_path):
    path = save_checkpoint(build_model(SPEC), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match="not a readable safetensors"):
        load_model(path)


def test_checkpoint_from_before_activations_loads_with_the_arch_default(tmp_path):
    import json

    from safetensors.torch import save_file

    spec = ModelSpec.parse("mv1", "8:1", groups=4, num_classes=3, input_size=32)
    old = {k: v for k, v in spec.to_dict().items() if k != "activation"}
    model = build_model(spec, seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"format": "ulsam-deploy/1", "spec": json.dumps(old)})
    loaded = load_model(tmp_path / "old.safetensors")
    assert loaded.spec == spec and loaded.spec.activation == "relu"
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("activation,module", [("relu", torch.nn.ReLU), ("relu6", torch.nn.ReLU6)])
@pytest.mark.parametrize("arch", ["mv1", "mv2"])
def test_activation_is_built(arch, activation, module):
    model = build_model(ModelSpec.parse(arch, "", width=0.25, num_classes=2, activation=activation))
    kinds = {type(m) for m in model.features.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6))}
    assert kinds == {module}
