"""``--resume``: the training state read back and checked, field by field, before any work.

A state file is ours only in form: it may be truncated, edited or written by another world size. Every
field is checked against the model and optimiser it is about to be loaded into - types, tensor shapes, finite
values, epochs and steps that add up, the world size - and the first bad one is named in one line (exit 2).
Only then are the PyTorch objects loaded, and a load that still fails is the same kind of line.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import torch

from ..errors import InputFileError

KEYS = ("model", "optimiser", "scheduler", "epoch", "config", "history", "seconds", "steps")
SCALER_KEYS = {"scale": float, "growth_factor": float, "backoff_factor": float, "growth_interval": int,
               "_growth_tracker": int}


class BadState(InputFileError):
    """A training state that cannot be resumed: which field, and why."""


def _fail(path: Path, field: str, why: str) -> BadState:
    return BadState(f"--resume: {path.name} in {path.parent}: {field} {why}",
                    "start afresh with --force (the state cannot be resumed)")


def _number(value, kind=float) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        return False
    return math.isfinite(value)


def check_state(state: dict, path: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer,
                epochs: int, world_size: int, amp: bool) -> None:
    """Raise :class:`BadState` naming the first field of ``state`` that cannot be resumed into these objects."""
    from .train import MAX_LISTED, EpochLog

    missing = [key for key in KEYS if key not in state]
    if missing:
        raise _fail(path, missing[0], "is missing")
    if not isinstance(state["config"], dict):
        raise _fail(path, "config", "is not a mapping")
    _check_tensors(path, "model", state["model"], model.state_dict())
    _check_optimiser(path, state["optimiser"], optimiser)
    if not isinstance(state["scheduler"], dict) or not _number(state["scheduler"].get("last_epoch"), int):
        raise _fail(path, "scheduler", "is not a learning-rate schedule's state")
    epoch, steps = state["epoch"], state["steps"]
    if not _number(epoch, int) or not 0 <= epoch <= epochs:
        raise _fail(path, "epoch", f"is {epoch!r}, not a whole number in 0-{epochs}")
    if not _number(steps, int) or steps < 0:
        raise _fail(path, "steps", f"is {steps!r}, not a whole number >= 0")
    if not _number(state["seconds"]) or state["seconds"] < 0:
        raise _fail(path, "seconds", f"is {state['seconds']!r}, not a duration")
    history = state["history"]
    names = {f.name for f in fields(EpochLog)}
    if not isinstance(history, list) or len(history) != epoch:
        raise _fail(path, "history", f"does not hold one entry per finished epoch ({epoch})")
    for index, log in enumerate(history, 1):
        if (not isinstance(log, dict) or set(log) - names or log.get("epoch") != index
                or not all(value is None or _number(value) for value in log.values())):
            raise _fail(path, f"history[{index - 1}]", "is not the log of epoch " + str(index))
    recorded = state.get("world_size")
    if recorded is not None and recorded != world_size:
        raise BadState(f"--resume: the run in {path.parent} was trained by {recorded!r} process(es), this one has "
                       f"{world_size}", f"resume with --nproc {recorded}" if _number(recorded, int) and recorded > 0
                       else "start afresh with --force")
    unreadable = state.get("unreadable", {})
    if not isinstance(unreadable, dict) or len(unreadable) > MAX_LISTED or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) + len(v) < 1024 for k, v in unreadable.items()):
        raise _fail(path, "unreadable", f"is not a list of at most {MAX_LISTED} image names and reasons")
    scaler = state.get("scaler", {})
    if not isinstance(scaler, dict) or (scaler and not amp):
        raise _fail(path, "scaler", "does not belong to this run's precision")
    for key, value in scaler.items():
        kind = SCALER_KEYS.get(key)
        if kind is None or not _number(value, kind) or (key == "scale" and value <= 0):
            raise _fail(path, f"scaler.{key}", f"is {value!r}")


def _check_tensors(path: Path, field: str, saved, expected: dict) -> None:
    if not isinstance(saved, dict) or set(saved) != set(expected):
        raise _fail(path, field, "does not hold this model's tensors")
    for name, tensor in expected.items():
        value = saved[name]
        if isinstance(value, torch.Tensor) and _observed(name) and value.dtype == tensor.dtype:
            if value.dim() > 1 or value.numel() > MAX_CHANNELS:
                raise _fail(path, f"{field}.{name}", "is not a quantisation range (one value per tensor or channel)")
        elif not isinstance(value, torch.Tensor) or value.shape != tensor.shape or value.dtype != tensor.dtype:
            raise _fail(path, f"{field}.{name}", f"is not a {tuple(tensor.shape)} {tensor.dtype} tensor")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise _fail(path, f"{field}.{name}", "holds NaN or infinite values")


MAX_CHANNELS = 1 << 16


def _observed(name: str) -> bool:
    """A fake quantiser's range (quantisation-aware training): its shape is set by the first values it sees
    (one value per tensor, or per channel), so a saved one differs from a fresh one."""
    return "activation_post_process" in name and name.rsplit(".", 1)[-1] in ("scale", "zero_point", "min_val", "max_val")


def _check_optimiser(path: Path, saved, optimiser: torch.optim.Optimizer) -> None:
    params = [p for group in optimiser.param_groups for p in group["params"]]
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list) or len(saved["param_groups"]) != len(optimiser.param_groups):
        raise _fail(path, "optimiser", "is not this optimiser's state")
    for index, group in enumerate(saved["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                or not all(_number(v) for k, v in group.items() if k in ("lr", "momentum", "weight_decay")):
            raise _fail(path, f"optimiser.param_groups[{index}]", "is malformed")
    for key, entry in saved["state"].items():
        if not _number(key, int) or not 0 <= key < len(params) or not isinstance(entry, dict):
            raise _fail(path, f"optimiser.state[{key!r}]", "names no parameter")
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor) or value.shape != params[key].shape:
                raise _fail(path, f"optimiser.state[{key}].{name}", f"is not a {tuple(params[key].shape)} tensor")
            if not torch.isfinite(value).all():
                raise _fail(path, f"optimiser.state[{key}].{name}", "holds NaN or infinite values")


def load_into(state: dict, path: Path, model, optimiser, scheduler, scaler) -> None:
    """Load a checked state; whatever PyTorch still refuses is one line naming the object."""
    for name, target, value in (("model", model, state["model"]), ("optimiser", optimiser, state["optimiser"]),
                                ("scheduler", scheduler, state["scheduler"]), ("scaler", scaler, state.get("scaler"))):
        if value is None or (name == "scaler" and not value):
            continue
        try:
            target.load_state_dict(value)
        except Exception as exc:   # noqa: BLE001 - torch raises several types for a state it cannot take
            raise _fail(path, name, f"cannot be loaded ({str(exc).splitlines()[0][:160]})") from None
