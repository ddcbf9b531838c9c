"""Training under faults, in real processes: a rank killed, a signal to the launcher, the launcher killed,
a data worker killed, a port in use. Each ends in one line, the documented exit code, no orphan process,
and a state that ``--resume`` continues from."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

START = Path(__file__).resolve().parents[2] / "models" / "mv1-ulsam-8x1-9x1-11-g4-digits"
ARGS = ["train", "--model", str(START), "--input-size", "32", "--data", "digits", "--batch-size", "16",
        "--epochs", "3"]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ulsam_deploy", *ARGS, "--out", str(out), *extra]


def _ranks(out: Path) -> list[int]:
    """Training processes of the run writing ``out`` (the launcher's command has --nproc, theirs not)."""
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines()
            if "-m ulsam_deploy train" in line and f"--out {out}" in line and "--nproc" not in line]


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip() and not line.startswith("epoch ")]


def _after_first_epoch(proc: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (out / "train_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1]
    time.sleep(1.0)     # into epoch 2


@pytest.mark.slow
@pytest.mark.parametrize("target, sig, code, words", [
    ("rank", signal.SIGKILL, 1, "was killed by SIGKILL"),
    ("launcher", signal.SIGTERM, 130, "interrupted"),
    ("launcher", signal.SIGINT, 130, "interrupted"),
], ids=["rank-sigkill", "launcher-sigterm", "launcher-sigint"])
def test_a_killed_rank_or_a_signalled_launcher_is_one_line_and_resumable(tmp_path, target, sig, code, words):
    out = tmp_path / "m"
    proc = subprocess.Popen(_command(out, "--workers", "0", "--nproc", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _after_first_epoch(proc, out)
    os.kill(_ranks(out)[-1] if target == "rank" else proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    lines = _error_lines(err)
    assert proc.returncode == code and len(lines) == 1 and words in lines[0], err
    assert "epoch 1 of 3 is saved" in lines[0] and "--resume" in lines[0], err
    time.sleep(1)
    assert _ranks(out) == []
    if target == "rank":     # what was trained is not lost: the run continues from its saved epoch
        resumed = subprocess.run(_command(out, "--workers", "0", "--nproc", "2", "--resume", "--json"),
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["resumed_from_epoch"] == 1


@pytest.mark.slow
def test_processes_die_with_a_killed_launcher(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.Popen(_command(out, "--workers", "0", "--nproc", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _after_first_epoch(proc, out)
    assert len(_ranks(out)) == 2
    saved = (out / "train_state.pt").stat().st_mtime_ns
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while _ranks(out) and time.time() < deadline:
        time.sleep(0.2)
    assert _ranks(out) == []                                   # no orphan goes on training
    assert (out / "train_state.pt").stat().st_mtime_ns == saved


@pytest.mark.slow
def test_a_killed_data_worker_is_one_line_with_the_saved_epoch(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.Popen(_command(out, "--workers", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _after_first_epoch(proc, out)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:   # workers live only while an epoch loads data
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)                   # as the OOM killer would
        time.sleep(0.5)
    _, err = proc.communicate(timeout=120)
    lines = _error_lines(err)
    assert proc.returncode == 1 and len(lines) == 1 and "data loading worker died" in lines[0], err
    assert "of 3 is saved" in lines[0] and "--resume" in lines[0]


def test_a_port_in_use_under_torchrun_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(busy.getsockname()[1]))
        run = subprocess.run(_command(tmp_path / "m", "--workers", "0"), env=env, capture_output=True, text=True,
                             timeout=300)
    lines = _error_lines(run.stderr)
    assert run.returncode == 2 and len(lines) == 1 and "MASTER_PORT" in lines[0], run.stderr
    assert not (tmp_path / "m").exists()


def test_launcher_messages_are_read_earliest_first(tmp_path, monkeypatch):
    from ulsam_deploy.training import lifetime

    monkeypatch.setenv(lifetime.LAUNCHER_ENV, f"{os.getpid()}:{tmp_path}")
    for rank, message in ((1, "second"), (0, "first")):
        monkeypatch.setenv("RANK", str(rank))
        assert lifetime.report_failure(message, 2)
        time.sleep(0.01)
    (tmp_path / "rank7.json").write_text("{not json")          # a torn or foreign file is ignored
    assert [r.message for r in lifetime.read_reports(tmp_path)] == ["second", "first"]
    monkeypatch.delenv(lifetime.LAUNCHER_ENV)
    assert not lifetime.report_failure("printed instead", 1)
    shutil.rmtree(tmp_path)
