"""`--resume` reads a state it checks first: a tampered, foreign or finished state is one line naming the field,
never a traceback, never a silently wrong run."""

import math
import shutil

import pytest
import torch

from tests.training.test_loop import CPU, SPEC, digits_data
from ulsam_deploy.errors import UlsamError
from ulsam_deploy.nets import build_model
from ulsam_deploy.training.distributed import World
from ulsam_deploy.training.state import STATE
from ulsam_deploy.training.train import TrainConfig, train

CONFIG = TrainConfig(epochs=2, batch_size=32, workers=0, max_steps=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder holding the state of a finished first epoch (training stopped by max_steps)."""
    folder = tmp_path_factory.mktemp("resume") / "run"
    train(build_model(SPEC, seed=0), digits_data(), TrainConfig(epochs=2, batch_size=32, workers=0, max_steps=1),
          folder, World(), CPU)
    return folder


def tampered(saved, tmp_path, change):
    folder = tmp_path / "run"
    shutil.copytree(saved, folder)
    state = torch.load(folder / STATE, weights_only=True)
    change(state)
    torch.save(state, folder / STATE)
    return folder


def first_key(state):
    return next(iter(state["model"]))


CASES = {
    "config not a mapping": (lambda s: s.update(config=[1]), "config"),
    "epoch True": (lambda s: s.update(epoch=True), "epoch"),
    "epoch beyond the run": (lambda s: s.update(epoch=7), "epoch"),
    "negative steps": (lambda s: s.update(steps=-5), "steps"),
    "text seconds": (lambda s: s.update(seconds="soon"), "seconds"),
    "seconds missing": (lambda s: s.pop("seconds"), "seconds"),
    "history entry not a log": (lambda s: s.update(history=[{"epoch": 1, "loss": "x"}]), "history[0]"),
    "history too short": (lambda s: s.update(history=[]), "history"),
    "model empty": (lambda s: s.update(model={}), "model"),
    "model mis-shaped": (lambda s: s["model"].update({first_key(s): torch.zeros(3)}), "model."),
    "NaN weights": (lambda s: s["model"][first_key(s)].fill_(math.nan), "NaN"),
    "optimiser not a dict": (lambda s: s.update(optimiser=[]), "optimiser"),
    "optimiser buffer mis-shaped": (lambda s: s["optimiser"]["state"].update({0: {"momentum_buffer": torch.zeros(2)}}),
                                    "optimiser.state[0]"),
    "scheduler garbage": (lambda s: s.update(scheduler="cosine"), "scheduler"),
    "garbage scaler": (lambda s: s.update(scaler={"scale": -1.0}), "scaler"),
    "other world size": (lambda s: s.update(world_size=2), "--nproc 2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_state_is_refused_naming_the_field(saved, tmp_path, case):
    change, named = CASES[case]
    folder = tampered(saved, tmp_path, change)
    before = (folder / STATE).read_bytes()
    model = build_model(SPEC, seed=3)
    with pytest.raises(UlsamError) as info:
        train(model, digits_data(), CONFIG, folder, World(), CPU, resume=True)
    assert named in info.value.one_line() and "\n" not in info.value.one_line(), info.value.one_line()
    assert info.value.exit_code == 2
    assert (folder / STATE).read_bytes() == before          # nothing trained, nothing rewritten


def test_resume_with_nothing_left_to_train_still_ends_with_its_accuracy(saved, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(saved, folder)
    result = train(build_model(SPEC, seed=3), digits_data(), TrainConfig(epochs=2, batch_size=32, workers=0,
                                                                        max_steps=1), folder, World(), CPU, resume=True)
    assert result.resumed_from_epoch == 1 and len(result.history) == 1
    assert result.final is not None and 0 <= result.final.top1 <= 100


def test_state_records_its_world_size(saved):
    assert torch.load(saved / STATE, weights_only=True)["world_size"] == 1
