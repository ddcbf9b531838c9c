"""Lanes of an export built side by side by a few worker processes (``spawn``), while this process keeps
the directory's write lock and alone writes the manifest.

Each worker imports the converters once and takes lanes from a shared queue, longest first, until none is
left: a process per lane paid the interpreter start and the imports (torch, ExecuTorch, onnx) once per lane.
A worker writes each artifact under a temporary name and renames it into place, as the serial path does,
and reports it; this process hashes and records it at once, so an export stopped half-way keeps every
artifact finished so far. Ctrl-C reaches every process of the terminal: the workers ignore it and this
process stops them (SIGTERM, which a worker unwinds like Ctrl-C: temporary files and converter scratch
folders go). A worker's UlsamError comes back as the same error, one line; anything else as a bug with its
traceback.
"""

from __future__ import annotations

import multiprocessing
import queue as queues
import signal
import time
import traceback
from typing import Callable

from ..errors import RunFailed, UlsamError
from ..runtime.base import usable_cores

POLL_S = 0.5


def run_lanes(groups: list[list[str]], workers: int, job: tuple, record: Callable[[str, dict, float], None],
              on_step: Callable[[str], None]) -> None:
    """Build each group of formats (a lane, in the order given) in ``workers`` processes (at most one per
    lane: :func:`~ulsam_deploy.export.pipeline.lane_workers`); ``job`` is
    (ExportRequest, directory, calibration set); ``record(name, details, seconds)`` is called as each
    artifact is done, ``on_step`` with the formats in progress."""
    context = multiprocessing.get_context("spawn")
    messages, tasks = context.Queue(), context.Queue()
    for task in enumerate(groups):
        tasks.put(task)
    for _ in range(workers):
        tasks.put(None)                                   # no lane left: the worker ends
    threads = max(1, usable_cores() // workers)
    running = {worker: context.Process(target=_worker, args=(worker, tasks, *job, threads, messages),
                                       name=f"export-worker-{worker}", daemon=True) for worker in range(workers)}
    for process in running.values():
        process.start()
    lanes: dict[int, int] = {}        # worker -> the lane it is building
    building: list[str] = []
    ended: dict[int, float] = {}      # worker -> when its process was first seen ended without its last word
    try:
        while running:
            try:
                message = messages.get(timeout=POLL_S)
            except queues.Empty:
                _check_alive(running, lanes, groups, ended)
                continue
            kind, worker, lane, name, *payload = message
            if kind == "start":
                lanes[worker] = lane
                building.append(name)
                on_step(", ".join(building))
            elif kind == "built":
                details, seconds = payload
                building.remove(name)
                record(name, details, seconds)
                if building:
                    on_step(", ".join(building))
            elif kind == "exit":
                running.pop(worker).join()
            elif kind == "error":
                cls, text, hint = payload
                raise cls(text, hint)
            else:   # "bug"
                raise RuntimeError(f"exporting {name or 'a lane'} failed in its process:\n{payload[0]}")
    finally:
        _stop(running.values())
        messages.close()
        tasks.close()


def _check_alive(running: dict, lanes: dict[int, int], groups: list[list[str]], ended: dict[int, float]) -> None:
    """A worker whose process ended without saying so (killed, out of memory) fails the export in one line.
    One that ended cleanly may still have its last messages on the way: it is given a few polls."""
    for worker, process in running.items():
        if process.is_alive():
            continue
        first = ended.setdefault(worker, time.monotonic())
        if process.exitcode != 0 or time.monotonic() - first > 10 * POLL_S:
            what = ", ".join(groups[lanes[worker]]) if worker in lanes else "an export"
            raise RunFailed(f"the process building {what} ended unexpectedly (exit {process.exitcode}); "
                            "finished artifacts are kept", "re-run the same command to resume")


def _stop(processes) -> None:
    processes = [p for p in processes if p.is_alive()]
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + 30
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _worker(worker: int, tasks, request, directory: str, calib, threads: int, messages) -> None:
    """A worker's process: take lanes until none is left, build each lane's formats in order, report each
    artifact; stop quietly when told to."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent decides, and stops us with SIGTERM
    signal.signal(signal.SIGTERM, interrupt)
    lane, name = None, None
    try:
        import torch

        from ..store.manifest import Manifest
        from .pipeline import build_artifact

        torch.set_num_threads(threads)                 # the workers share the cores
        manifest, facts = Manifest.load(directory), request.facts()
        while (task := tasks.get()) is not None:
            lane, names = task
            for name in names:
                messages.put(("start", worker, lane, name))
                t0 = time.perf_counter()
                details = build_artifact(name, request, manifest, calib, facts)
                messages.put(("built", worker, lane, name, details, time.perf_counter() - t0))
        messages.put(("exit", worker, lane, name))
    except KeyboardInterrupt:
        pass
    except UlsamError as exc:
        messages.put(("error", worker, lane, name, type(exc), exc.message, exc.hint))
    except BaseException:
        messages.put(("bug", worker, lane, name, traceback.format_exc()))
    finally:
        messages.close()
        messages.join_thread()
