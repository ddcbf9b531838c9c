import pytest
import torch

from ulsam_deploy.nets.reference import LoopULSAM
from ulsam_deploy.nets.ulsam import ULSAM, export_form, from_official, max_pool3x3, to_official

SHAPES = [(2, 32, 7, 7), (1, 64, 14, 14), (3, 96, 4, 4), (2, 16, 1, 1), (1, 160, 7, 5)]


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights and BN statistics so that eval mode really exercises them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.dtype != torch.float32:
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)


def _pair(channels: int, groups: int, h: int, w: int, seed: int = 0):
    ours = ULSAM(channels, groups)
    _randomise(ours, seed)
    ref = LoopULSAM(channels, channels, h, w, groups)
    ref.load_state_dict(to_official(ours.state_dict(), {"": groups}))
    return ours, ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [1, 2, 4, 8, 16, "m"])
def test_matches_official_loop_in_eval(shape, groups):
    n, m, h, w = shape
    g = m if groups == "m" else groups
    if m % g:
        pytest.skip(f"g={g} does not divide m={m}")
    ours, ref = _pair(m, g, h, w, seed=m + g)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        diff = (ours.eval()(x) - ref.eval()(x)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_equal_gradients_in_train_mode(groups):
    m, h, w = 64, 7, 7
    ours, ref = _pair(m, groups, h, w, seed=3)
    x = torch.randn(4, m, h, w, generator=torch.Generator().manual_seed(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours.train()(xa), ref.train()(xb)
    target = torch.randn_like(ya)
    (ya * target).sum().backward()
    (yb * target).sum().backward()
    assert torch.allclose(ya, yb, atol=1e-5)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    ref_grads = from_official({k: p.grad for k, p in ref.named_parameters()})
    for name, param in ours.named_parameters():
        assert torch.allclose(param.grad, ref_grads[name], atol=1e-5), name
    # running statistics follow the same (momentum 0.9) update
    ref_state = from_official(ref.state_dict())
    for name, buf in ours.named_buffers():
        if name not in ours.state_dict():   # the export forms' constants
            continue
        assert torch.allclose(buf.float(), ref_state[name].float(), atol=1e-5), name


def test_mapping_round_trips():
    ours, _ = _pair(48, 4, 3, 3)
    official = to_official(ours.state_dict(), {"": 4})
    assert "subspaces.3.conv_point.weight" in official and official["subspaces.0.conv_point.weight"].shape == (1, 12, 1, 1)
    back = from_official(official)
    assert back.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value)


def test_attention_is_a_distribution():
    ours, _ = _pair(32, 4, 5, 5)
    a = ours.eval().attention(torch.randn(2, 32, 5, 5))
    assert a.shape == (2, 4, 5, 5)
    assert torch.allclose(a.sum((2, 3)), torch.ones(2, 4), atol=1e-6)


def test_fast_pool_is_exact():
    x = torch.randn(3, 8, 9, 6)
    assert torch.equal(max_pool3x3(x), torch.nn.functional.max_pool2d(x, 3, 1, 1))


def test_onnx_node_count_does_not_grow_with_groups(tmp_path):
    import onnx

    counts = {}
    for g in (1, 4, 16, 64):
        module = ULSAM(64, g).eval()
        path = tmp_path / f"u{g}.onnx"
        torch.onnx.export(module, (torch.randn(1, 64, 7, 7),), str(path), dynamo=True, external_data=False,
                          opset_version=18, verbose=False)
        graph = onnx.load(str(path)).graph
        counts[g] = len(graph.node)
        assert not any(n.op_type == "Tile" for n in graph.node)
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [1, 4, "m"])
@pytest.mark.parametrize("form", ["spread", "spatial", "npu"])
def test_export_forms_equal_eager(tmp_path, shape, groups, form):
    """Each export form computes the eager module's function (fp32, ONNX Runtime) without 5-D tensors or an
    Add, with a node count independent of g; ``spatial`` without any Reshape or Softmax; ``npu`` also without
    a Div (a log-sum-exp instead). The form is restored after the export."""
    import onnx
    import onnxruntime as ort

    n, m, h, w = shape
    g = m if groups == "m" else groups
    if m % g:
        pytest.skip(f"g={g} does not divide m={m}")
    module = ULSAM(m, g)
    _randomise(module, seed=m + g)
    module.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 2
    path = tmp_path / f"{form}.onnx"
    with export_form(module, form):
        torch.onnx.export(module, (x,), str(path), dynamo=True, external_data=False, opset_version=18, verbose=False)
    assert module.form == "broadcast"
    ops = sorted(node.op_type for node in onnx.load(str(path)).graph.node)
    assert not {"Transpose", "Unsqueeze", "Tile", "Add"} & set(ops), ops
    assert ops.count("Conv") == 3 and ops.count("Mul") == 1, ops
    if form == "spatial":
        assert not {"Reshape", "Softmax"} & set(ops) and ops.count("Exp") == 1, ops
    if form == "npu":
        assert not {"Reshape", "Softmax", "Div"} & set(ops) and ops.count("Exp") == 2 and ops.count("Log") == 1, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert float((torch.from_numpy(out) - module(x)).abs().max()) <= 1e-5


def test_unknown_export_form_is_refused():
    with pytest.raises(ValueError, match="unknown ULSAM export form"):
        with export_form(ULSAM(8, 2), "nhwc"):
            pass
