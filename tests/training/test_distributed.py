"""Two processes (torchrun, gloo) against one process with the same global batch, and the CLI's guards.

BatchNorm: each process normalises with the statistics of its own half of the global batch, as DDP
without SyncBatchNorm does. The one-process reference therefore runs each half through the network
separately (per-half batch statistics, per-half running statistics kept apart) and averages the two
halves' losses, which is the gradient DDP averages; the running statistics are then averaged, as the
training does at the end of every epoch. What remains is float summation order, which BatchNorm over
small batches amplifies: after 4 steps that move the weights by ~2e-3 the two agree to 1e-4 (measured
1.8e-5). The test starts from a trained model: at random initialisation BatchNorm is so ill-conditioned
that a 2e-7 change of the weights changes the gradient by 3 %.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

from ulsam_deploy.data import digits
from ulsam_deploy.nets import load_model
from ulsam_deploy.training.data import reference_data

LR = 0.005
SIZE = 112
START = Path(__file__).resolve().parents[2] / "models" / "mv1-ulsam-8x1-9x1-11-g4-digits"   # MV1: no dropout
ARGS = ["--model", str(START), "--input-size", str(SIZE),
        "--data", "digits", "--shift", "0", "--no-hflip", "--batch-size", "16", "--lr", str(LR), "--epochs", "1",
        "--workers", "0"]
STEPS = 4


def _one_process_reference(world: int = 2, ranks: tuple[int, ...] = (0, 1)):
    model = load_model(START)
    data = reference_data(digits, "digits", SIZE, digits.preprocessing(SIZE), 0, False, seed=0)
    samplers = [DistributedSampler(data.train, world, rank, shuffle=True, seed=0) for rank in range(world)]
    orders = []
    for sampler in samplers:
        sampler.set_epoch(1)
        orders.append(list(sampler))
    steps_per_epoch = (len(orders[0]) + 15) // 16
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=4e-5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps_per_epoch)
    buffers = [{k: v.clone() for k, v in model.state_dict().items() if "running" in k} for _ in range(world)]
    model.train()
    for step in range(STEPS):
        optimiser.zero_grad()
        for rank in ranks:
            model.load_state_dict(buffers[rank], strict=False)
            idx = orders[rank][step * 16:(step + 1) * 16]
            x = torch.stack([data.train[i][0] for i in idx])
            y = torch.tensor([data.train[i][1] for i in idx])
            (torch.nn.functional.cross_entropy(model(x), y) / len(ranks)).backward()
            buffers[rank] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        optimiser.step()
        scheduler.step()
    model.load_state_dict({k: sum(b[k] for b in buffers) / world for k in buffers[0]}, strict=False)
    return model.state_dict()


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "ulsam_deploy", "train", *ARGS, "--nproc", "2", "--max-steps",
                          str(STEPS), "--out", str(tmp_path / "m"), "--json"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert not (tmp_path / "m" / "train_state.pt").exists()          # finished: only the model folder stays
    trained = load_file(str(tmp_path / "m" / "model.safetensors"))
    start = load_model(START).state_dict()
    reference = _one_process_reference()
    names = [n for n in reference if "running" not in n and not n.endswith("num_batches_tracked")]
    for n in (n for n in reference if "running" in n):    # BatchNorm statistics, averaged over the processes
        assert torch.allclose(trained[n], reference[n], rtol=1e-3, atol=1e-4), n
    moved = max(float((reference[n] - start[n]).abs().max()) for n in names)
    apart = max(float((trained[n] - reference[n]).abs().max()) for n in names)
    # the steps move weights by ~2e-3; a gradient not averaged over both halves would differ by as much
    assert moved > 1e-3 and apart < 1e-4, (moved, apart)
    # and the trajectory is not the one of the first half alone
    alone = _one_process_reference(world=2, ranks=(0,))
    assert max(float((trained[n] - alone[n]).abs().max()) for n in names) > 10 * apart


@pytest.mark.slow
def test_an_error_on_a_rank_stops_every_rank_with_one_line(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "imgs"
    (folder / "only").mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (16, 16), (i, i, i)).save(folder / "only" / f"{i}.png")
    run = subprocess.run([sys.executable, "-m", "ulsam_deploy", "train", "--arch", "mv2", "--num-classes", "2",
                          "--input-size", str(SIZE), "--data", str(folder), "--nproc", "2", "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("Traceback" not in line for line in run.stderr.splitlines()), run.stderr
    assert "at least 2" in run.stderr
    assert not (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.parametrize("args, words", [
    (["--device", "cuda"], "no CUDA device"),
    (["--device", "tpu"], "not a device"),
    (["--amp", "fp8"], "--amp 'fp8' is unknown"),
    (["--amp", "fp16"], "needs a CUDA device"),
    (["--sync-bn"], "needs CUDA"),
    (["--nproc", "0"], "--nproc"),
    (["--nproc", "1000"], "more processes than the"),          # never starts spawning on a small machine
    (["--resume"], "holds no train_state.pt"),
    (["--val", "/nonexistent"], "--val"),
    (["--teacher", "/nonexistent.safetensors"], "--teacher"),
])
def test_bad_training_options_are_one_line(cli, tmp_path, args, words):
    code, out, err = cli("train", *ARGS, "--out", tmp_path / "m", *args)
    assert code == 2 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "m").exists()                      # refused before anything is written


def test_existing_model_folder_needs_force_and_a_held_lock_refuses(cli, tmp_path):
    from filelock import FileLock

    out = tmp_path / "m"
    assert cli("train", *ARGS, "--max-steps", "1", "--out", out)[0] == 0
    before = (out / "model.safetensors").read_bytes()
    code, _, err = cli("train", *ARGS, "--max-steps", "1", "--out", out)
    assert code == 2 and "already holds a model" in err and "--force" in err
    assert (out / "model.safetensors").read_bytes() == before
    with FileLock(str(out / ".train.lock")):
        code, _, err = cli("train", *ARGS, "--max-steps", "1", "--out", out, "--force")
    assert code == 2 and "another training is writing" in err
    assert cli("train", *ARGS, "--max-steps", "1", "--out", out, "--force", "--seed", "1")[0] == 0
    assert (out / "model.safetensors").read_bytes() != before


@pytest.mark.slow
def test_interrupted_cli_run_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "m"
    # 32 px: an epoch of ~10 s; the signal comes once epoch 1 is saved, anywhere in epoch 2 or between the two
    command = [sys.executable, "-m", "ulsam_deploy", "train", *ARGS, "--input-size", "32", "--epochs", "2",
               "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "train_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "is saved" in lines[0] and "--resume" in lines[0], err
    resumed = subprocess.run(command + ["--resume", "--json"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from_epoch"] >= 1


def test_build_refuses_to_replace_a_checkpoint_without_force(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    assert cli("build", "--arch", "mv2", "--width", "0.35", "--out", out)[0] == 0
    before = out.read_bytes()
    code, _, err = cli("build", "--arch", "mv2", "--width", "0.35", "--seed", "1", "--out", out)
    assert code == 2 and "already exists" in err and "--force" in err and out.read_bytes() == before
    assert cli("build", "--arch", "mv2", "--width", "0.35", "--seed", "1", "--out", out, "--force")[0] == 0
    assert out.read_bytes() != before
