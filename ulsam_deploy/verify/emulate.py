"""``check --emulate``: a pack's own verify.py run on an emulated CPU (QEMU user mode), brought home as emulated.

An x86 model (haswell, nehalem) runs this host's Python (numpy and ONNX Runtime already installed) under
``qemu-x86_64 -cpu MODEL``, so the integer kernels ONNX Runtime picks by CPUID are that CPU's. An ARM64 model
(cortex-a72, cortex-a76, neoverse-n2) runs the Python of an arm64 sysroot under ``qemu-aarch64 -L SYSROOT -cpu
MODEL`` (:mod:`.arm64_env`, built once): the aarch64 builds of the runtimes, picking their kernels by the
HWCAP bits of that CPU. What emulation shows is which kernels run and the numbers they compute. It is not that
CPU's speed (every instruction is translated), nor another operating system. Single-threaded: threads under
QEMU are slower still.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BackendUnavailable, UlsamError, printable
from .device import DeviceRun, bring_home
from ..store.manifest import Manifest
from .pack import PACK_BACKENDS, VERIFIER, make_pack


@dataclass(frozen=True)
class EmulatedCpu:
    arch: str            # "x86_64" or "aarch64"
    model: str           # QEMU's -cpu name
    label: str           # the emulated CPU recorded in verified_on


EMULATED_CPUS = {
    "haswell": EmulatedCpu("x86_64", "Haswell", "Haswell"),              # AVX2 without AVX-512
    "nehalem": EmulatedCpu("x86_64", "Nehalem", "Nehalem"),              # SSE4.2 without AVX
    "cortex-a72": EmulatedCpu("aarch64", "cortex-a72", "Cortex-A72"),     # Armv8.0-A NEON, no dot product
    "cortex-a76": EmulatedCpu("aarch64", "cortex-a76", "Cortex-A76"),     # Armv8.2-A, dot product, fp16
    "neoverse-n2": EmulatedCpu("aarch64", "neoverse-n2", "Neoverse-N2"),  # Armv9.0-A, SVE2, int8 matmul
}
EMULATE_IMAGES = 64
TIMEOUT_S = 3600


@dataclass
class Emulator:
    cpu: EmulatedCpu
    command: list[str]                       # runs a Python program on the emulated CPU: append its arguments
    why_not: dict[str, str] = field(default_factory=dict)    # backend -> why its artifacts are not run


def emulator(name: str) -> Emulator:
    """How to run Python on the emulated CPU ``name``; refused in one line where this host cannot."""
    cpu = EMULATED_CPUS.get(name.strip().lower())
    if cpu is None:
        raise UlsamError(f"--emulate {name!r} is not a CPU this tool emulates", f"choose {', '.join(EMULATED_CPUS)}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise BackendUnavailable(f"--emulate {name} needs an x86-64 host (QEMU user mode runs this host's x86 Python "
                                 f"or an arm64 sysroot built for one); this host is {platform.machine()}",
                                 "run the pack's verify.py on such a device")
    if cpu.arch == "aarch64":
        from . import arm64_env

        env = arm64_env.locate()
        return Emulator(cpu, env.command(cpu.model),
                        {b: arm64_env.not_run_reason(b) for b in PACK_BACKENDS if b not in arm64_env.BACKENDS})
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise BackendUnavailable("qemu-x86_64 is not installed", "run `make emulator` or `apt-get install qemu-user`")
    return Emulator(cpu, [qemu, "-cpu", cpu.model, sys.executable])


def split_formats(directory: Path, emulated: Emulator, formats: list[str] | None) -> tuple[list[str] | None, dict]:
    """(the formats to run of ``formats``, by default of the INT8 artifacts of the export ``directory``, None for
    all; {each format the emulator has no runtime for: why}). Refused in one line when that leaves none."""
    return _split(Manifest.load(directory).artifacts, emulated, formats)


def _split(artifacts: dict, emulated: Emulator, formats: list[str] | None) -> tuple[list[str] | None, dict]:
    asked = formats or _int8_names(artifacts) or [n for n, e in artifacts.items() if e["backend"] in PACK_BACKENDS]
    skipped = {name: emulated.why_not[artifacts[name]["backend"]] for name in asked
               if name in artifacts and artifacts[name]["backend"] in emulated.why_not}
    run = [name for name in asked if name not in skipped]
    if skipped and not run:
        raise BackendUnavailable(f"--emulate {emulated.cpu.model} cannot run {not_run_line(skipped)}",
                                 "choose other --formats")
    return run or None, skipped


def not_run_line(skipped: dict[str, str]) -> str:
    """``{format: why}`` as one line, the formats that share a reason named together."""
    reasons: dict[str, list[str]] = {}
    for name, why in skipped.items():
        reasons.setdefault(why, []).append(name)
    return "; ".join(f"{', '.join(names)} ({why})" for why, names in reasons.items())


def run_emulated(directory: Path, name: str, formats: list[str] | None, data: str | None,
                 images: int = EMULATE_IMAGES, overrides: dict | None = None) -> DeviceRun:
    """Pack ``formats`` (default: the INT8 artifacts) of the export ``directory`` with ``images`` images, run its
    verify.py under QEMU as CPU ``name`` on one thread, and bring the result home as emulated (``verified_on``).
    Formats the emulated CPU has no runtime for are left out (:func:`split_formats` says which)."""
    emulated = emulator(name)
    formats, _ = split_formats(directory, emulated, formats)
    model, qemu = emulated.cpu.label, Path(emulated.command[0]).name
    with tempfile.TemporaryDirectory(prefix="ulsam-emulate-") as scratch:
        pack = make_pack(directory, Path(scratch) / "pack", formats, data, images)
        result = Path(scratch) / "result.json"
        try:
            run = subprocess.run(emulated.command + ["-I", str(Path(pack.path) / VERIFIER), "--threads", "1",
                                                     "--out", str(result), "--emulated-cpu", model],
                                 capture_output=True, text=True, timeout=TIMEOUT_S, cwd=scratch)
        except subprocess.TimeoutExpired:
            raise UlsamError(f"the verifier under {qemu} -cpu {emulated.cpu.model} ran over {TIMEOUT_S} s",
                             "pass fewer --images or --formats") from None
        if run.returncode not in (0, 1) or not result.is_file():
            raise UlsamError(f"the verifier under {qemu} -cpu {emulated.cpu.model} stopped (exit {run.returncode}): "
                             f"{_last_error(run.stderr)}")
        return bring_home(directory, result, overrides, emulated_cpu=model)


def _int8_formats(directory: Path) -> list[str] | None:
    """By default the INT8 artifacts: their integer kernels are what a CPU model changes (float kernels differ
    in rounding only), and they run 20-45x faster than float ones under QEMU. None (all) when there are none."""
    return _int8_names(Manifest.load(directory).artifacts)


def _int8_names(artifacts: dict) -> list[str] | None:
    return [n for n, e in artifacts.items() if e["precision"] == "int8" and e["backend"] in PACK_BACKENDS] or None


def _last_error(stderr: str) -> str:
    """verify.py's own error line, else the last line that is not one of QEMU's feature warnings."""
    lines = [line for line in stderr.splitlines()
             if line.strip() and not (line.startswith("qemu-") and ": warning" in line)]
    ours = [line for line in lines if line.startswith("error: ")]
    return printable((ours or lines or ["no message"])[-1].removeprefix("error: "))[:300]
