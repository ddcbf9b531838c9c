"""The training loop in one process: learning, resume, distillation, streamed memory."""

import tracemalloc

import numpy as np
import pytest
import torch

from ulsam_deploy.data import digits
from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.nets import build_model
from ulsam_deploy.training.data import folder_data, reference_data
from ulsam_deploy.training.distributed import World
from ulsam_deploy.training.train import Hooks, Interrupted, TrainConfig, distillation_loss, train

SPEC = ModelSpec.parse("mv2", "13", groups=4, width=0.5, num_classes=10, input_size=32)
CPU = torch.device("cpu")


def digits_data(shift=2, hflip=False):
    return reference_data(digits, "digits", 32, digits.preprocessing(32), shift, hflip, seed=0)


def test_one_short_epoch_lowers_the_loss(tmp_path):
    model = build_model(SPEC, seed=0)
    data = digits_data()
    x, y = digits.load("train", 32)
    probe_x, probe_y = torch.from_numpy(np.array(x[:128])), torch.from_numpy(y[:128])

    def probe_loss():
        model.train()   # batch statistics, as during training
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(probe_x), probe_y))

    before = probe_loss()
    result = train(model, data, TrainConfig(epochs=1, batch_size=16, lr=0.01, workers=0, max_steps=64), tmp_path,
                   World(), CPU)
    after = probe_loss()
    assert len(result.history) == 1 and np.isfinite(result.history[0].loss)
    assert result.steps == 64 and result.history[0].images == 64 * 16
    assert after < before * 0.9, (before, after)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    config = TrainConfig(epochs=2, batch_size=32, lr=0.02, workers=1, max_steps=None)
    small = digits_data()
    small.train.count = 256                       # 8 steps an epoch keep the test short

    whole = build_model(SPEC, seed=0)
    train(whole, small, config, tmp_path / "a", World(), CPU)

    def stop_in_epoch_two(epoch, step, steps, loss):
        if epoch == 2 and step == 3:
            raise KeyboardInterrupt

    stopped = build_model(SPEC, seed=0)
    with pytest.raises(Interrupted) as info:
        train(stopped, small, config, tmp_path / "b", World(), CPU, hooks=Hooks(on_step=stop_in_epoch_two),
              resume_hint="resume with: ulsam-deploy train ... --resume")
    assert "epoch 1 of 2 is saved" in info.value.message and "--resume" in info.value.hint
    resumed = build_model(SPEC, seed=123)          # other initial weights: everything must come from the state
    result = train(resumed, small, config, tmp_path / "b", World(), CPU, resume=True)
    assert result.resumed_from_epoch == 1 and [h.epoch for h in result.history] == [1, 2]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("when", ["reported", "saving"])
def test_a_signal_between_two_epochs_says_what_is_saved(tmp_path, monkeypatch, when):
    """A signal after an epoch's state is written (while its line is printed) or while it is being written."""
    from ulsam_deploy.training import train as loop

    config = TrainConfig(epochs=2, batch_size=32, workers=0, max_steps=None)
    small = digits_data()
    small.train.count = 64
    hooks = Hooks()
    if when == "reported":
        def stop_on_report(log):
            raise KeyboardInterrupt
        hooks = Hooks(on_epoch=stop_on_report)
    else:
        def stop_in_save(out, state):
            raise KeyboardInterrupt
        monkeypatch.setattr(loop, "save_state", stop_in_save)
    with pytest.raises(Interrupted) as info:
        train(build_model(SPEC, seed=0), small, config, tmp_path, World(), CPU, hooks=hooks, resume_hint="--resume")
    if when == "reported":
        assert "epoch 1 of 2 is saved" in info.value.message and info.value.hint == "--resume"
    else:
        assert "before any epoch finished" in info.value.message, info.value.message


def test_resume_refuses_other_arguments(tmp_path):
    from ulsam_deploy.errors import UlsamError

    data = digits_data()
    train(build_model(SPEC, seed=0), data, TrainConfig(epochs=2, batch_size=32, workers=0, max_steps=2), tmp_path,
          World(), CPU)
    with pytest.raises(UlsamError, match="other arguments.*lr"):
        train(build_model(SPEC, seed=0), data, TrainConfig(epochs=2, batch_size=32, lr=0.1, workers=0), tmp_path,
              World(), CPU, resume=True)


def test_teacher_term_changes_the_gradient():
    torch.manual_seed(0)
    logits = torch.randn(8, 10, requires_grad=True)
    labels = torch.randint(0, 10, (8,))
    teacher = torch.randn(8, 10)

    def grad(config, teacher_logits):
        logits.grad = None
        distillation_loss(logits, labels, teacher_logits, config).backward()
        return logits.grad.clone()

    plain = grad(TrainConfig(), None)
    distilled = grad(TrainConfig(kd_weight=0.5, kd_temperature=4.0), teacher)
    assert not torch.allclose(plain, distilled)
    assert torch.allclose(grad(TrainConfig(kd_weight=0.0), teacher), plain)     # weight 0: CE alone
    # weight 1: only the teacher term, whose gradient vanishes when the student already matches the teacher
    assert grad(TrainConfig(kd_weight=1.0), logits.detach().clone()).abs().max() < 1e-6


def test_teacher_runs_in_eval_mode_without_gradients(tmp_path):
    teacher = build_model(SPEC, seed=1)
    calls = []
    teacher.register_forward_hook(lambda module, args, out: calls.append((module.training, out.requires_grad)))
    data = digits_data()
    train(build_model(SPEC, seed=0), data, TrainConfig(epochs=1, batch_size=16, workers=0, max_steps=2), tmp_path,
          World(), CPU, teacher=teacher)
    assert calls == [(False, False)] * 2


def _image_folder(root, count, side=64):
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(count):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (side, side + 8, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root


def test_loader_holds_a_few_batches_not_the_set(tmp_path):
    from ulsam_deploy.data.preprocess import Preprocessing
    from torch.utils.data import DataLoader

    data = folder_data(_image_folder(tmp_path / "imgs", 400), None, Preprocessing(size=64), True, 0)
    assert data.train.count == 360 and data.evaluation.count == 40          # 10 % of each class held out
    batch_bytes = 16 * 3 * 64 * 64 * 4
    loader = DataLoader(data.train, batch_size=16, num_workers=0)
    tracemalloc.start()
    seen = sum(len(x) for x, _, _ in loader)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == 360
    assert peak < 6 * batch_bytes, peak / batch_bytes      # the whole set would be 22 batches


def test_folder_recipe_is_random_resized_crop_and_seeded(tmp_path):
    from ulsam_deploy.data.preprocess import Preprocessing

    data = folder_data(_image_folder(tmp_path / "imgs", 20), None, Preprocessing(size=48, interpolation="bicubic"),
                       True, 0)
    assert data.recipe.kind == "random-resized-crop" and data.recipe.interpolation == "bicubic"
    x1, _, skipped = data.train[3]
    x2, _, _ = data.train[3]
    data.train.set_epoch(2)
    x3, _, _ = data.train[3]
    assert skipped == ""
    assert x1.shape == (3, 48, 48) and torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_folder_training_card_states_the_held_out_images_and_recipe(cli, tmp_path):
    _image_folder(tmp_path / "imgs", 40)
    out = tmp_path / "m"
    code, stdout, err = cli("train", "--arch", "mv2", "--width", "0.35", "--num-classes", "2", "--input-size", "32",
                            "--data", tmp_path / "imgs", "--epochs", "1", "--batch-size", "8", "--max-steps", "2",
                            "--workers", "0", "--label-smoothing", "0.1", "--out", out, "--json")
    assert code == 0, err
    import json

    summary = json.loads(stdout)
    assert summary["test_count"] == 4 and summary["recipe"]["kind"] == "random-resized-crop"
    card = (out / "README.md").read_text()
    assert "4 images held out of the training folder (10% of each class" in card
    assert "random resized crop" in card and "label smoothing 0.1" in card


@pytest.mark.slow
def test_folder_class_names_travel_into_the_checkpoint_and_the_artifacts(cli, tmp_path):
    import json

    import onnx

    from ulsam_deploy.workflow import checkpoint_metadata

    _image_folder(tmp_path / "imgs", 20, side=32)
    out = tmp_path / "m"
    code, _, err = cli("train", "--arch", "mv2", "--width", "0.35", "--num-classes", "2", "--input-size", "32",
                       "--data", tmp_path / "imgs", "--epochs", "1", "--batch-size", "8", "--max-steps", "1",
                       "--workers", "0", "--out", out)
    assert code == 0, err
    assert checkpoint_metadata(out)["class_names"] == ["cat", "dog"]
    code, _, err = cli("export", "--model", out, "--formats", "onnx", "--out", tmp_path / "exp")
    assert code == 0, err
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "exp" / "model.onnx")).metadata_props}
    assert json.loads(props["ulsam_deploy.labels"]) == ["cat", "dog"]
    assert json.loads((tmp_path / "exp" / "manifest.json").read_text())["class_names"] == ["cat", "dog"]
