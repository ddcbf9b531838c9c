"""Quantisation-aware fine-tuning (``train --qat``): fake quantisation in the loop, ranges after ReLU6's clamp,
the fine-tuned weights written back into the model, resume, and the refusals."""

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="the ExecuTorch extra is not installed: pip install 'ulsam-deploy[executorch]'")

from ulsam_deploy.data import digits  # noqa: E402
from ulsam_deploy.model.spec import ModelSpec  # noqa: E402
from ulsam_deploy.nets import build_model, save_checkpoint  # noqa: E402
from ulsam_deploy.training.data import reference_data  # noqa: E402
from ulsam_deploy.training.distributed import World  # noqa: E402
from ulsam_deploy.training.qat import prepare  # noqa: E402
from ulsam_deploy.training.train import Hooks, Interrupted, TrainConfig, train  # noqa: E402

SPEC = ModelSpec.parse("mv2", "13", groups=4, width=0.5, num_classes=10, input_size=32)
CPU = torch.device("cpu")


def small_data(count=256):
    data = reference_data(digits, "digits", 32, digits.preprocessing(32), 2, False, seed=0)
    data.train.count = count
    return data


def images(n=64):
    x, _ = digits.load("test", 32)
    return torch.from_numpy(np.array(x[:n]))


@pytest.mark.slow
def test_the_simulation_quantises_and_the_trained_weights_go_back_into_the_model(tmp_path):
    model = build_model(SPEC, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    net = prepare(model, torch.zeros(2, 3, 32, 32))
    train(net, small_data(), TrainConfig(epochs=1, batch_size=32, lr=0.01, workers=0, qat=True), tmp_path, World(), CPU)
    net.eval()
    model.eval()
    with torch.no_grad():
        simulated = net(images())
    net.write_back(model)
    state = model.state_dict()
    changed = [k for k in state if state[k].is_floating_point() and not torch.equal(state[k], start[k])]
    assert "classifier.weight" in changed and any(k.endswith("running_mean") for k in changed)
    with torch.no_grad():
        floated = model(images())
    # the simulation is the float model with INT8 rounding: close to it, never identical
    assert not torch.equal(simulated, floated)
    assert (simulated.argmax(1) == floated.argmax(1)).float().mean() >= 0.9


def test_relu6_outputs_are_fake_quantised_on_their_clamped_range():
    net = prepare(build_model(SPEC, seed=0), torch.zeros(2, 3, 32, 32))
    with torch.no_grad():
        net(images() * 20)      # pre-activations far beyond 6
    clamped = [m for m in net.graph.modules()
               if type(getattr(m, "activation_post_process", None)).__name__.startswith("Clamped")]
    assert len(clamped) >= 5
    for fake_quant in clamped:
        observer = fake_quant.activation_post_process
        assert 0.0 <= float(observer.min_val) and float(observer.max_val) <= 6.0


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    config = TrainConfig(epochs=2, batch_size=32, lr=0.02, workers=0, qat=True)
    data = small_data()
    whole = prepare(build_model(SPEC, seed=0), torch.zeros(2, 3, 32, 32))
    train(whole, data, config, tmp_path / "a", World(), CPU)

    def stop_in_epoch_two(epoch, step, steps, loss):
        if epoch == 2 and step == 3:
            raise KeyboardInterrupt

    stopped = prepare(build_model(SPEC, seed=0), torch.zeros(2, 3, 32, 32))
    with pytest.raises(Interrupted):
        train(stopped, data, config, tmp_path / "b", World(), CPU, hooks=Hooks(on_step=stop_in_epoch_two))
    resumed = prepare(build_model(SPEC, seed=0), torch.zeros(2, 3, 32, 32))   # fresh ranges, of other shapes
    result = train(resumed, data, config, tmp_path / "b", World(), CPU, resume=True)
    assert result.resumed_from_epoch == 1 and len(result.history) == 2
    a, b = whole.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("extra, words", [
    ((), "--start-from"),
    (("--start-from", "MODEL", "--amp", "bf16"), "--amp"),
    (("--start-from", "MODEL", "--freeze-backbone-epochs", "1"), "--freeze-backbone-epochs"),
])
def test_refusals_are_one_line_and_write_nothing(cli, tmp_path, extra, words):
    model = save_checkpoint(build_model(SPEC, seed=0), tmp_path / "m.safetensors")
    out = tmp_path / "out"
    code, stdout, stderr = cli("train", "--qat", "--data", "digits", "--out", out,
                               *[str(model) if a == "MODEL" else a for a in extra])
    assert code == 2, stderr
    assert words in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 2
    assert not out.exists()
