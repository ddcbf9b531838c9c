"""Lanes of an export built side by side, one process each (``spawn``), while this process keeps the
directory's write lock and alone writes the manifest.

A lane's process writes each artifact under a temporary name and renames it into place, as the serial path
does, and reports it; this process hashes and records it at once, so an export stopped half-way keeps every
artifact finished so far. Ctrl-C reaches every process of the terminal: the lanes ignore it and this process
stops them (SIGTERM, which a lane unwinds like Ctrl-C: temporary files and converter scratch folders go).
A lane's UlsamError comes back as the same error, one line; anything else as a bug with its traceback.
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
    """Build each group of formats (a lane) in a process of its own, ``workers`` at a time; ``job`` is
    (ExportRequest, directory, calibration set); ``record(name, details, seconds)`` is called as each
    artifact is done, ``on_step`` with the formats in progress."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    threads = max(1, usable_cores() // workers)
    waiting = list(enumerate(groups))
    running: dict[int, multiprocessing.process.BaseProcess] = {}
    building: list[str] = []
    ended: dict[int, float] = {}      # lane -> when its process was first seen ended without its last word
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                lane, names = waiting.pop(0)
                process = context.Process(target=_lane, args=(lane, names, *job, threads, messages),
                                          name=f"export-{'+'.join(names)}", daemon=True)
                process.start()
                running[lane] = process
            try:
                message = messages.get(timeout=POLL_S)
            except queues.Empty:
                _check_alive(running, groups, ended)
                continue
            kind, lane, name, *payload = message
            if kind == "start":
                building.append(name)
                on_step(", ".join(building))
            elif kind == "built":
                details, seconds = payload
                building.remove(name)
                record(name, details, seconds)
                if building:
                    on_step(", ".join(building))
            elif kind == "done":
                running.pop(lane).join()
            elif kind == "error":
                cls, text, hint = payload
                raise cls(text, hint)
            else:   # "bug"
                raise RuntimeError(f"exporting {name} failed in its process:\n{payload[0]}")
    finally:
        _stop(running.values())
        messages.close()


def _check_alive(running: dict, groups: list[list[str]], ended: dict[int, float]) -> None:
    """A lane whose process ended without saying so (killed, out of memory) fails the export in one line.
    One that ended cleanly may still have its last messages on the way: it is given a few polls."""
    for lane, process in running.items():
        if process.is_alive():
            continue
        first = ended.setdefault(lane, time.monotonic())
        if process.exitcode != 0 or time.monotonic() - first > 10 * POLL_S:
            raise RunFailed(f"the process building {', '.join(groups[lane])} ended unexpectedly "
                            f"(exit {process.exitcode}); finished artifacts are kept",
                            "re-run the same command to resume")


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


def _lane(lane: int, names: list[str], request, directory: str, calib, threads: int, messages) -> None:
    """A lane's process: build ``names`` in order, reporting each; stop quietly when told to."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent decides, and stops us with SIGTERM
    signal.signal(signal.SIGTERM, interrupt)
    name = names[0]
    try:
        import torch

        from ..store.manifest import Manifest
        from .pipeline import build_artifact

        torch.set_num_threads(threads)                 # the lanes share the cores
        manifest, facts = Manifest.load(directory), request.facts()
        for name in names:
            messages.put(("start", lane, name))
            t0 = time.perf_counter()
            details = build_artifact(name, request, manifest, calib, facts)
            messages.put(("built", lane, name, details, time.perf_counter() - t0))
        messages.put(("done", lane, name))
    except KeyboardInterrupt:
        pass
    except UlsamError as exc:
        messages.put(("error", lane, name, type(exc), exc.message, exc.hint))
    except BaseException:
        messages.put(("bug", lane, name, traceback.format_exc()))
    finally:
        messages.close()
        messages.join_thread()
