import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ulsam_deploy.data import DataSet, digits
from ulsam_deploy.nets import build_model
from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.training.train import TrainConfig, accuracy, train

MODELS = sorted(p for p in (Path(__file__).resolve().parents[1] / "models").iterdir() if (p / "model.safetensors").is_file())


def test_one_short_epoch_lowers_the_loss():
    spec = ModelSpec.parse("mv2", "13", groups=4, width=0.5, num_classes=10, input_size=32)
    model = build_model(spec, seed=0)
    x, y = digits.load("train", 32)
    subset = DataSet("digits:train[:1024]", x[:1024], y[:1024], digits.preprocessing(32))
    probe_x, probe_y = torch.from_numpy(np.array(x[:128])), torch.from_numpy(y[:128])

    def probe_loss():
        model.train()   # batch statistics, as during training
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(probe_x), probe_y))

    before = probe_loss()
    result = train(model, subset, TrainConfig(epochs=1, batch_size=16, lr=0.01, max_shift=2))
    after = probe_loss()
    assert len(result.history) == 1 and np.isfinite(result.history[0].loss)
    assert after < before * 0.9, (before, after)


def test_accuracy_top1_top5():
    logits = np.array([[0.1, 0.9, 0.0, 0, 0, 0], [0.8, 0.1, 0.05, 0, 0, 0.01]])
    acc = accuracy(logits, np.array([1, 5]))
    assert acc.top1 == 50.0 and acc.top5 == 100.0


@pytest.mark.parametrize("folder", MODELS, ids=[p.name for p in MODELS])
def test_shipped_model_reproduces_its_card(folder, cli):
    code, out, err = cli("evaluate", "--model", folder, "--json")
    assert code == 0, err
    result = json.loads(out)
    expected = {"digits": (360, "digits:test"), "fashion": (10_000, "fashion:test")}[folder.name.rsplit("-", 1)[1]]
    assert (result["count"], result["data"]) == expected
    assert abs(result["top1"] - result["card_top1"]) <= 0.5
    assert f"{result['card_top1']:.2f} %" in (folder / "README.md").read_text()
    assert (folder / "model.safetensors").stat().st_size < 12e6


def test_every_required_reference_model_ships():
    names = {p.name for p in MODELS}
    assert {"mv2-ulsam-13-14-16-17-g4-digits", "mv2-digits", "mv1-ulsam-8x1-9x1-11-g4-digits",
            "mv2-ulsam-13-14-16-17-g4-fashion", "mv2-fashion"} <= names
