"""One training process among ``world`` (torch.distributed, started by torchrun / ``torch.distributed.run``).

A single process is world size 1 of the same code path. The backend follows the device: gloo on CPU,
NCCL on CUDA. BatchNorm statistics are averaged over the processes at the end of every epoch (each
process keeps its own running statistics meanwhile; DDP does not broadcast buffers), so that the
evaluation and the written model see the statistics of all the data; ``--sync-bn`` (CUDA only) syncs
the batch statistics themselves during training.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

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
        dist.init_process_group(backend)
    return world


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_batchnorm(model: nn.Module, world: World) -> None:
    """Replace every BatchNorm's running mean and variance by their average over the processes."""
    if not world.distributed:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(world.size)


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """``values`` summed over the processes (float64)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``ulsam-deploy <argv>`` in ``nproc`` local processes through ``torch.distributed.run``
    (what ``torchrun --standalone --nproc-per-node N -m ulsam_deploy ...`` does); returns the exit code.

    torchrun stops every process when one fails; the failing one has printed its one-line error."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)   # our one line says it
    # each process gets an equal share of the cores (torchrun's default is 1 thread each)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                                         "-m", "ulsam_deploy", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        code = next((c for c in codes if c in (1, 2, 130)), 1)
        failed = ", ".join(str(rank) for rank in sorted(exc.failures))
        print(f"error: training stopped: process {failed} of {nproc} failed (exit {codes[0]}); its message is "
              "above, and the other processes were stopped", file=sys.stderr)
        return code
    return 0


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
