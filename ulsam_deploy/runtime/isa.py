"""The host's instruction sets, and whether an INT8 artifact's integer kernels are exact on them.

An ONNX Q/DQ artifact means its graph (DequantizeLinear -> float op -> QuantizeLinear); ONNX Runtime's fused
integer kernels must compute the same numbers. Whether they do depends on the CPU (see
:mod:`ulsam_deploy.export.saturation`): the manifest entry of each INT8 ONNX records the instruction sets its
encoding is exact on (``isa``), and :func:`refusal` says why this host is not one of them.

The features come from NumPy's runtime dispatch table, which asks CPUID itself, so an emulated CPU
(``qemu-x86_64 -cpu Haswell``) reports what it emulates, where ``/proc/cpuinfo`` would show the real host.
"""

from __future__ import annotations

import platform
from pathlib import Path

from ..formats import ISA_FEATURES

# x86 features that decide ONNX Runtime's u8 x s8 kernels: VNNI accumulates in 32 bits, the rest pair in 16.
X86_FEATURES = ISA_FEATURES
ARM_MACHINES = ("aarch64", "arm64")


def features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:      # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return dict(__cpu_features__)


def architecture() -> str:
    machine = platform.machine().lower()
    if machine in ARM_MACHINES:
        return "arm64"
    return "x86_64" if machine in ("x86_64", "amd64") else machine


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):   # x86, ARM boards, others
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> dict:
    """What the verdicts depend on: architecture, CPU name, and the x86 features that choose the kernels."""
    found = features()
    return {"architecture": architecture(), "cpu": cpu_model(),
            "features": [name for name in X86_FEATURES if found.get(name)] if architecture() == "x86_64" else []}


def isa_label(info: dict | None = None) -> str:
    """A short name of the host's INT8 instruction set: "x86-64 AVX-512 VNNI", "x86-64 AVX2", "arm64"."""
    info = info or host()
    if info["architecture"] != "x86_64":
        return info["architecture"]
    feats = set(info["features"])
    for name, label in (("AVX512VNNI", "AVX-512 VNNI"), ("AVX512BW", "AVX-512"), ("AVX2", "AVX2")):
        if name in feats:
            return f"x86-64 {label}"
    return "x86-64 (no AVX2)"


def safe_here(isa: dict | None, info: dict | None = None) -> bool:
    """Whether an encoding recorded as exact on ``isa`` (a manifest ``isa`` entry) is exact on this host."""
    if not isa:
        return True          # a float artifact, or an entry from before encodings were recorded
    info = info or host()
    rule = isa.get(info["architecture"])
    if rule is None:
        return False
    return rule == "any" or any(name in info["features"] for name in rule)


def refusal(name: str, entry: dict, info: dict | None = None) -> str | None:
    """Why artifact ``name`` must not be checked or timed here; None when its encoding is exact on this host."""
    isa = entry.get("isa") if isinstance(entry.get("isa"), dict) else None
    info = info or host()
    if safe_here(isa, info):
        return None
    return (f"{name} uses {entry.get('encoding', 'an encoding')}, whose integer kernels saturate "
            f"on this CPU ({isa_label(info)}; exact on {describe(isa)})")


def describe(isa: dict) -> str:
    parts = []
    for arch, rule in isa.items():
        parts.append(f"{arch} (any)" if rule == "any" else f"{arch} with {' or '.join(rule)}")
    return ", ".join(parts)
