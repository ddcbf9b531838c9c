"""The launcher of ``train --nproc`` owns its processes' lifetime, and hears each one's one-line message.

* A process started by the launcher asks the kernel to send it SIGTERM when the launcher dies
  (``prctl(PR_SET_PDEATHSIG)``, Linux), so a launcher killed by any signal, SIGKILL included, leaves no
  orphan training on and rewriting the state. SIGTERM unwinds a process like Ctrl-C: it stops between
  two steps and says what is saved.
* A process that fails writes its one-line message (and exit code) into the launcher's report folder
  instead of printing it; the launcher prints the first failure's line once, whichever way the run ended
  (a process's error, a process killed, a signal to the launcher).

Torch-free: the CLI imports it on its error path.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LAUNCHER_ENV = "ULSAM_DEPLOY_LAUNCHER"      # "<launcher pid>:<report folder>", set for the processes it starts
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Report:
    rank: int
    code: int
    message: str
    time: float


def _launcher() -> tuple[int, Path] | None:
    value = os.environ.get(LAUNCHER_ENV, "")
    pid, _, folder = value.partition(":")
    if not pid.isdigit() or not folder:
        return None
    return int(pid), Path(folder)


def die_with_launcher() -> bool:
    """In a process the launcher started: be sent SIGTERM when it dies; False if it is already gone."""
    launcher = _launcher()
    if launcher is None or not sys.platform.startswith("linux"):
        return True
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):   # no prctl: the launcher's own shutdown still stops the processes
        return True
    return os.getppid() == launcher[0]   # it died before the request: nobody will send the signal


def report_failure(message: str, code: int) -> bool:
    """Hand ``message`` to the launcher (True), or False when this process was not started by it."""
    launcher = _launcher()
    rank = os.environ.get("RANK", "")
    if launcher is None or not rank.isdigit():
        return False
    folder = launcher[1]
    try:
        tmp = folder / f".rank{rank}.tmp"
        tmp.write_text(json.dumps({"rank": int(rank), "code": code, "message": message, "time": time.time()}))
        os.replace(tmp, folder / f"rank{rank}.json")
    except OSError:
        return False          # the launcher's folder is gone: print it instead
    return True


def read_reports(folder: Path) -> list[Report]:
    """The processes' messages, earliest first (written by this tool's processes; still checked)."""
    reports = []
    for path in sorted(Path(folder).glob("rank*.json")):
        try:
            data = json.loads(path.read_text())
            reports.append(Report(int(data["rank"]), int(data["code"]), str(data["message"])[:2000],
                                  float(data["time"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(reports, key=lambda r: (r.time, r.rank))
