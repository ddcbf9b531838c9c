"""``check --emulate``: a pack's own verify.py run on an emulated CPU (QEMU user mode), brought home as emulated.

QEMU runs this host's Python (numpy and ONNX Runtime already installed) as the CPU model named, so the integer
kernels ONNX Runtime picks by CPUID are that CPU's: what emulation shows is which kernels run and the numbers
they compute. It is not that CPU's speed (every instruction is translated), nor another operating system,
another build of a runtime, or another architecture. Single-threaded: threads under QEMU are slower still.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import BackendUnavailable, UlsamError, printable
from .device import DeviceRun, bring_home
from ..store.manifest import Manifest
from .pack import PACK_BACKENDS, VERIFIER, make_pack

EMULATED_CPUS = {"haswell": "Haswell", "nehalem": "Nehalem"}    # AVX2 without AVX-512; SSE4.2 without AVX
EMULATE_IMAGES = 64
TIMEOUT_S = 3600


def emulator(name: str) -> list[str]:
    """The command prefix that runs a program on the emulated CPU ``name``; refused when this host cannot."""
    model = EMULATED_CPUS.get(name.strip().lower())
    if model is None:
        raise UlsamError(f"--emulate {name!r} is not a CPU this tool emulates", f"choose {' or '.join(EMULATED_CPUS)}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise BackendUnavailable(f"--emulate {name} needs an x86-64 host (QEMU user mode runs this host's x86 Python); "
                                 f"this host is {platform.machine()}", "run the pack's verify.py on such a device")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise BackendUnavailable("qemu-x86_64 is not installed", "run `make emulator` or `apt-get install qemu-user`")
    return [qemu, "-cpu", model]


def run_emulated(directory: Path, name: str, formats: list[str] | None, data: str | None,
                 images: int = EMULATE_IMAGES, overrides: dict | None = None) -> DeviceRun:
    """Pack ``formats`` (default: the INT8 artifacts) of the export ``directory`` with ``images`` images, run its
    verify.py under QEMU as CPU ``name`` on one thread, and bring the result home as emulated (``verified_on``)."""
    command = emulator(name)
    model = command[-1]
    formats = formats or _int8_formats(directory)
    with tempfile.TemporaryDirectory(prefix="ulsam-emulate-") as scratch:
        pack = make_pack(directory, Path(scratch) / "pack", formats, data, images)
        result = Path(scratch) / "result.json"
        try:
            run = subprocess.run(command + [sys.executable, "-I", str(Path(pack.path) / VERIFIER), "--threads", "1",
                                            "--out", str(result), "--emulated-cpu", model],
                                 capture_output=True, text=True, timeout=TIMEOUT_S, cwd=scratch)
        except subprocess.TimeoutExpired:
            raise UlsamError(f"the verifier under qemu-x86_64 -cpu {model} ran over {TIMEOUT_S} s",
                             "pass fewer --images or --formats") from None
        if run.returncode not in (0, 1) or not result.is_file():
            raise UlsamError(f"the verifier under qemu-x86_64 -cpu {model} stopped (exit {run.returncode}): "
                             f"{_last_error(run.stderr)}")
        return bring_home(directory, result, overrides, emulated_cpu=model)


def _int8_formats(directory: Path) -> list[str] | None:
    """By default the INT8 artifacts: their integer kernels are what a CPU model changes (float kernels differ
    in rounding only), and they run 20-45x faster than float ones under QEMU. None (all) when there are none."""
    artifacts = Manifest.load(directory).artifacts
    return [n for n, e in artifacts.items() if e["precision"] == "int8" and e["backend"] in PACK_BACKENDS] or None


def _last_error(stderr: str) -> str:
    """verify.py's own error line, else the last line that is not one of QEMU's feature warnings."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("qemu-x86_64: warning")]
    ours = [line for line in lines if line.startswith("error: ")]
    return printable((ours or lines or ["no message"])[-1].removeprefix("error: "))[:300]
