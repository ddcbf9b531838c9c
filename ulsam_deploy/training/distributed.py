"""One training process among ``world`` (torch.distributed, started by torchrun / ``torch.distributed.run``).

A single process is world size 1 of the same code path. The backend follows the device: gloo on CPU,
NCCL on CUDA. BatchNorm statistics are averaged over the processes at the end of every epoch (each
process keeps its own running statistics meanwhile; DDP does not broadcast buffers), so that the
evaluation and the written model see the statistics of all the data; ``--sync-bn`` (CUDA only) syncs
the batch statistics themselves during training.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UlsamError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """True inside a process torchrun started (it sets WORLD_SIZE and RANK for every worker)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def join(device: torch.device) -> World:
    """This process's place in the world torchrun started; the process group is created when world > 1."""
    if not launched():
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend)
        except (dist.DistError, RuntimeError, ValueError) as exc:
            raise join_error(exc) from None
    return world


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_batchnorm(model: nn.Module, world: World) -> None:
    """Replace every BatchNorm's running mean and variance by their average over the processes (found by
    name: an exported graph, as in quantisation-aware training, holds them without BatchNorm modules)."""
    if not world.distributed:
        return
    for name, buffer in model.named_buffers():
        if name.endswith((".running_mean", ".running_var")):
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world.size)


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """``values`` summed over the processes (float64)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def launch(nproc: int, argv: list[str], saved: Callable[[], str]) -> int:
    """Run ``ulsam-deploy <argv>`` in ``nproc`` local processes through ``torch.distributed.run``
    (what ``torchrun --standalone --nproc-per-node N -m ulsam_deploy ...`` does); returns the exit code.

    torchrun stops every process when one fails, and forwards SIGTERM/SIGINT/SIGHUP it receives to them;
    the processes die with this one whatever ends it (see ``lifetime``). However the run ends, one line
    says so: the first failing process's own message, or which process died and how, with ``saved()``
    (what is saved and how to resume)."""
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException, _terminate_process_handler
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from .lifetime import LAUNCHER_ENV, read_reports

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)    # our one line says it (they set their own levels)
    # each process gets an equal share of the cores (torchrun's default is 1 thread each)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                                         "-m", "ulsam_deploy", *argv])
    with tempfile.TemporaryDirectory(prefix="ulsam-deploy-train-") as reports:
        os.environ[LAUNCHER_ENV] = f"{os.getpid()}:{reports}"
        # torchrun installs these handlers once its processes start; before that a signal must stop it too
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _terminate_process_handler)
        try:
            run(args)
            return 0
        except ChildFailedError as exc:
            # a process that died by a signal without a word is the cause; the others' lines are its echo
            told = read_reports(reports)
            killed = sorted(r for r, f in exc.failures.items()
                            if f.exitcode < 0 and r not in {t.rank for t in told})
            if told and not killed:
                _say(told[0].message)
                return told[0].code if told[0].code in (1, 2, 130) else 1
            rank = killed[0] if killed else exc.get_first_failure()[0]
            failure = exc.failures[rank]
            how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
                   else f"exited with code {failure.exitcode}")
            _say(f"training stopped: process {rank} of {nproc} {how} (out of memory, or stopped from outside); "
                 f"the other processes were stopped; {saved()}")
            return 1
        except (SignalException, KeyboardInterrupt) as exc:   # torchrun has stopped its processes meanwhile
            name = exc.sigval.name if isinstance(exc, SignalException) else "SIGINT"
            told = [r for r in read_reports(reports) if r.code == 130]
            _say(told[0].message if told else f"training interrupted ({name}); {saved()}")
            return 130
        finally:
            os.environ.pop(LAUNCHER_ENV, None)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)


def _say(line: str) -> None:
    print(f"error: {' '.join(line.split())}", file=sys.stderr)


def join_error(exc: Exception) -> UlsamError:
    """The process group could not form (a port in use, an unreachable master): one line, not a traceback."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    hint = ("set MASTER_PORT to a free port" if "ADDRINUSE" in str(exc).upper() or "in use" in str(exc)
            else "check MASTER_ADDR, MASTER_PORT and that every process was started")
    return UlsamError(f"the training processes could not connect at {where}: {first}", hint)


def lost_peer(exc: Exception, world: World) -> UlsamError | None:
    """A collective that failed because another process died or hung up, as one line (None: not that)."""
    from ..errors import RunFailed

    text = str(exc)
    words = ("Connection", "connection", "closed by peer", "Broken pipe", "Gloo", "gloo", "NCCL", "timed out",
             "Timed out")
    if not world.distributed or not (isinstance(exc, dist.DistError) or any(w in text for w in words)):
        return None
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    first = first.split("] ", 1)[-1][:160]      # gloo prefixes its source location
    return RunFailed(f"process {world.rank} of {world.size} lost the other training processes ({first}): one of "
                     "them died or was stopped", "the last finished epoch is saved; re-run with --resume")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_nproc(nproc: int, device: torch.device) -> None:
    """Refuse, before anything starts, more processes than the devices can run: GPUs, or the usable CPU cores
    (more CPU processes than cores only time-slice one another, each holding a copy of the model)."""
    if nproc < 1:
        raise UlsamError(f"--nproc {nproc} must be at least 1")
    cores = usable_cores()
    if device.type == "cpu" and nproc > cores:
        raise UlsamError(f"--nproc {nproc} asks for more processes than the {cores} CPU core(s) this process may use",
                         f"use --nproc {cores} or fewer")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UlsamError(f"--nproc {nproc} asks for more processes than the {torch.cuda.device_count()} visible GPU(s)",
                         "one process per GPU: lower --nproc, or use --device cpu")
