"""The training state beside the model: one atomic file written after every epoch, read by ``--resume``;
and the guards of a model folder (no silent replacement, one training at a time)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InputFileError, UlsamError
from ..store.fileio import atomic_path

STATE = "train_state.pt"
LOCK = ".train.lock"
MODEL_FILES = ("model.safetensors", "README.md", STATE)


def save_state(folder: Path, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) to ``folder/train_state.pt`` atomically."""
    path = Path(folder) / STATE
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_state(folder: Path, config: dict) -> dict:
    """The state of an interrupted run in ``folder``; refused unless it was started with the same ``config``."""
    path = Path(folder) / STATE
    if not path.is_file():
        raise InputFileError(f"--resume: {folder} holds no {STATE} to resume from",
                             "start the run without --resume (a state is written after every epoch)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # noqa: BLE001 - any unreadable file is the same one-line refusal
        raise InputFileError(f"--resume: {path} is not a readable training state ({type(exc).__name__})",
                             "delete it and start again") from None
    if not isinstance(state, dict) or not {"model", "optimiser", "scheduler", "epoch", "config"} <= set(state):
        raise InputFileError(f"--resume: {path} is not a training state of this tool")
    if not isinstance(state["config"], dict):
        raise InputFileError(f"--resume: {path.name} in {folder}: config is not a mapping",
                             "start afresh with --force (the state cannot be resumed)")
    if state["config"] != config:
        changed = sorted(k for k in set(config) | set(state["config"]) if config.get(k) != state["config"].get(k))
        raise UlsamError(f"--resume: the run in {folder} was started with other arguments ({', '.join(changed[:4])})",
                         "resume with the same arguments, or start afresh with --force")
    return state      # each field is checked against the model by training.resume.check_state


def saved_epoch(folder: Path) -> int | None:
    """The last finished epoch saved in ``folder`` (for a closing line), or None."""
    try:
        state = torch.load(Path(folder) / STATE, map_location="cpu", weights_only=True)
    except Exception:   # noqa: BLE001 - absent or unreadable: nothing to resume from
        return None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > 0 else None


def check_output(folder: Path, force: bool, resume: bool) -> None:
    """Refuse, before any work, to replace a model folder or checkpoint unless ``--force`` (or ``--resume``)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputFileError(f"--out {folder} exists and is not a folder", "name a new folder")
    if resume:
        if not (folder / STATE).is_file():
            raise InputFileError(f"--resume: {folder} holds no {STATE} to resume from",
                                 "start the run without --resume (a state is written after every epoch)")
        return
    present = [name for name in MODEL_FILES if (folder / name).exists()]
    if present and not force:
        raise UlsamError(f"--out {folder} already holds a model ({', '.join(present)})",
                         "choose a new folder, --resume an interrupted run, or pass --force to replace it")


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s training lock (one training per folder); refuse at once if another holds it."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UlsamError(f"another training is writing {folder}", "wait for it, or choose another --out") from None
    try:
        yield
    finally:
        lock.release()
