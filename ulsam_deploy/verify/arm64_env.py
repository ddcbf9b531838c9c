"""The ARM64 emulation environment of ``check --emulate cortex-a76``: a static QEMU and an arm64 Debian sysroot
with Python, numpy and the runtimes a pack's verify.py needs, built once into a cache folder.

Debian bookworm's qemu-user (7.2) crashes in the runtimes' CPU detection; QEMU >= 8 does not, so the emulator is
trixie's qemu-user (a static binary there), of which only ``qemu-aarch64`` is kept. The sysroot is bookworm's
arm64 Python 3.11 with the libraries it loads, unpacked with dpkg-deb, plus the aarch64 wheels of the numpy,
ONNX Runtime and LiteRT versions installed here. apt-get runs with a private state and source list: nothing on
this system is installed or changed, and no root is needed. ExecuTorch is left out: its Python runtime needs
torch, and PyPI's aarch64 torch is a CUDA build (427 MB, plus CUDA wheels).

The folder (``$ULSAM_DEPLOY_ARM64_ENV``, default ``~/.cache/ulsam-deploy/arm64``) holds ``env/`` once a build
has passed its smoke test under emulation: ``env/ready.json`` is written last, and ``env/`` replaces the old one
in one rename. Builds in several processes wait on one lock.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import BackendUnavailable, printable

ENV_VAR = "ULSAM_DEPLOY_ARM64_ENV"
BUILD_COMMAND = "make emulator-arm64"
DEBIAN = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
QEMU_SUITE, QEMU_PACKAGE, QEMU_DEB_PATH, QEMU_BINARY = "trixie", "qemu-user", "usr/bin/qemu-aarch64", "qemu-aarch64"
SYSROOT_SUITE, PYTHON = "bookworm", "usr/bin/python3.11"
# python3.11 and every library its standard modules and the runtimes' wheels load (libstdc++ for ONNX Runtime
# and LiteRT); bookworm's libpython3.11-stdlib dependencies, without the arch-all media-types
SYSROOT_PACKAGES = (
    "libc6", "libgcc-s1", "gcc-12-base", "libstdc++6", "python3.11-minimal", "libpython3.11-minimal",
    "libpython3.11-stdlib", "libexpat1", "zlib1g", "libssl3", "libbz2-1.0", "libcrypt1", "libffi8", "liblzma5",
    "libuuid1", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libdb5.3", "libnsl2", "libtirpc3",
    "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1", "libzstd1")
WHEELS = ("numpy", "onnxruntime", "ai-edge-litert")     # pinned to the versions installed here
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
BACKENDS = ("onnxruntime", "litert")                     # what verify.py runs in this sysroot
NOT_HERE = {"executorch": "ExecuTorch's Python runtime needs torch, and PyPI's aarch64 torch is a CUDA build"}
SMOKE = ("import json, platform, numpy, onnxruntime, ai_edge_litert, ai_edge_litert.interpreter\n"
         "onnxruntime.get_available_providers()\n"
         "print(json.dumps({'python': platform.python_version(), 'machine': platform.machine(),"
         " 'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__,"
         " 'ai-edge-litert': getattr(ai_edge_litert, '__version__', 'unknown')}))")
STEP_TIMEOUT_S = 900


@dataclass
class Arm64Env:
    qemu: Path           # qemu-aarch64, static
    sysroot: Path        # QEMU's -L: where the guest's absolute paths are looked up first
    python: Path         # the sysroot's Python, named by its path on this host
    info: dict = field(default_factory=dict)    # ready.json: versions, recipe, date

    def command(self, model: str) -> list[str]:
        """The command prefix that runs the sysroot's Python on the emulated CPU ``model`` (QEMU's name)."""
        return [str(self.qemu), "-L", str(self.sysroot), "-cpu", model, str(self.python)]


def env_dir() -> Path:
    """Where the environment is built: ``$ULSAM_DEPLOY_ARM64_ENV``, else the user's cache folder."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ulsam-deploy" / "arm64"


def locate(directory: Path | None = None) -> Arm64Env:
    """The built environment in ``directory`` (default :func:`env_dir`); refused in one line when it is not built."""
    directory = Path(directory or env_dir())
    env = directory / "env"
    try:
        info = json.loads((env / "ready.json").read_text())
    except (OSError, ValueError):
        info = None
    found = Arm64Env(env / QEMU_BINARY, env / "sysroot", env / "sysroot" / PYTHON, info or {})
    if not isinstance(info, dict) or not (os.access(found.qemu, os.X_OK) and found.python.is_file()):
        raise BackendUnavailable(f"the ARM64 emulation environment is not built in {printable(str(directory))}",
                                 f"build it with `{BUILD_COMMAND}`: about 150 MB from Debian and PyPI, a minute")
    return found


def is_built(directory: Path | None = None) -> bool:
    try:
        locate(directory)
    except BackendUnavailable:
        return False
    return True


def recipe() -> dict:
    """What a build fetches: the suites, the packages and the wheels pinned to this installation's versions."""
    return {"qemu": f"{QEMU_SUITE}/{QEMU_PACKAGE}", "sysroot": f"{SYSROOT_SUITE}/arm64",
            "packages": list(SYSROOT_PACKAGES), "wheels": [_pinned(name) for name in WHEELS]}


def build(directory: Path | None = None, progress: Callable[[str], None] = lambda line: None,
          force: bool = False) -> Arm64Env:
    """Build the environment in ``directory`` (default :func:`env_dir`) unless one of the same recipe is there;
    ``progress`` receives one line per step. Raises :class:`BackendUnavailable` when apt-get, dpkg-deb, Debian's
    keyring or the network is missing, with the failing step's last line."""
    from filelock import FileLock

    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise BackendUnavailable(f"the ARM64 emulation environment is built for an x86-64 host; this is "
                                 f"{platform.machine()}", "run the pack's verify.py on an arm64 device instead")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise BackendUnavailable(f"building the ARM64 emulation environment needs {tool} (a Debian or Ubuntu host)")
    if not Path(KEYRING).is_file():
        raise BackendUnavailable(f"building the ARM64 emulation environment needs Debian's keyring {KEYRING}",
                                 "apt-get install debian-archive-keyring")
    directory = Path(directory or env_dir())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise BackendUnavailable(f"the ARM64 emulation environment cannot be built in {printable(str(directory))}: "
                                 f"{exc.strerror or exc}", f"set {ENV_VAR} to a writable folder") from None
    wanted = recipe()
    with FileLock(str(directory / ".lock")):
        if not force and is_built(directory) and locate(directory).info.get("recipe") == wanted:
            progress(f"already built: {directory / 'env'}")
            return locate(directory)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
        try:
            info = _build_into(staging, wanted, progress)
            _publish(directory, staging / "env")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    progress(f"built {directory / 'env'}: QEMU {info['qemu_version']}, Python {info['python']}, numpy "
             f"{info['numpy']}, onnxruntime {info['onnxruntime']}, ai-edge-litert {info['ai-edge-litert']}")
    return locate(directory)


def _build_into(staging: Path, wanted: dict, progress: Callable[[str], None]) -> dict:
    env, debs = staging / "env", staging / "debs"
    sysroot, site = env / "sysroot", env / "sysroot" / "usr/lib/python3/dist-packages"
    for folder in (debs, sysroot, site):
        folder.mkdir(parents=True)
    apt = _private_apt(staging / "apt")
    progress(f"apt-get update: Debian {SYSROOT_SUITE} arm64 and {QEMU_SUITE} amd64 package lists")
    _run("apt-get update", apt + ["--error-on=any", "update"])
    progress(f"apt-get download: {QEMU_PACKAGE} ({QEMU_SUITE}) and {len(SYSROOT_PACKAGES)} arm64 packages")
    _run("apt-get download", apt + ["download", f"{QEMU_PACKAGE}:amd64/{QEMU_SUITE}",
                                    *(f"{name}:arm64/{SYSROOT_SUITE}" for name in SYSROOT_PACKAGES)], cwd=debs)
    progress("dpkg-deb: unpacking qemu-aarch64 and the sysroot")
    for deb in sorted(debs.glob("*.deb")):
        if deb.name.startswith(f"{QEMU_PACKAGE}_"):
            # streamed: the package's tar is 465 MB of emulators, of which one file is kept
            with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as tar:
                _run("tar -x qemu-aarch64", ["tar", "-x", "-C", str(staging), f"./{QEMU_DEB_PATH}"], stdin=tar.stdout)
            os.replace(staging / QEMU_DEB_PATH, env / QEMU_BINARY)
        else:
            _run("dpkg-deb -x", ["dpkg-deb", "-x", str(deb), str(sysroot)])
    progress(f"pip: aarch64 wheels {', '.join(wanted['wheels'])}")
    _run("pip install", [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                         "--no-compile", "--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11",
                         "--abi", "cp311", *(f"--platform={tag}" for tag in PLATFORMS), "--target", str(site),
                         *wanted["wheels"]])
    progress("smoke test: the sysroot's Python imports numpy, onnxruntime and LiteRT on an emulated Cortex-A76")
    found = Arm64Env(env / QEMU_BINARY, sysroot, sysroot / PYTHON)
    smoke = _run("smoke test", found.command("cortex-a76") + ["-I", "-c", SMOKE], cwd=staging)
    version = _run("qemu-aarch64 --version", [str(found.qemu), "--version"]).splitlines()[0].split()
    info = json.loads(smoke.strip().splitlines()[-1]) | {
        "qemu_version": version[2] if len(version) > 2 else "unknown", "recipe": wanted, "backends": list(BACKENDS),
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    (env / "ready.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _private_apt(root: Path) -> list[str]:
    """apt-get with its own source list, lists and cache under ``root``: the system's apt state is not read or
    written, and the package lists of both suites are fetched for this build alone."""
    for folder in ("lists/partial", "cache/archives/partial", "parts"):
        (root / folder).mkdir(parents=True)
    (root / "status").touch()
    arch = "amd64"
    (root / "sources.list").write_text(
        f"deb [arch=arm64 signed-by={KEYRING}] {DEBIAN} {SYSROOT_SUITE} main\n"
        f"deb [arch={arch} signed-by={KEYRING}] {DEBIAN} {QEMU_SUITE} main\n")
    options = {"Dir::Etc::SourceList": root / "sources.list", "Dir::Etc::SourceParts": root / "parts",
               "Dir::Etc::Preferences": os.devnull, "Dir::Etc::PreferencesParts": root / "parts",
               "Dir::State": root, "Dir::State::Lists": root / "lists", "Dir::State::status": root / "status",
               "Dir::Cache": root / "cache", "APT::Architecture": arch, "APT::Architectures::": arch,
               "Debug::NoLocking": "1", "Acquire::Languages": "none", "APT::Sandbox::User": "root"}
    return ["apt-get", "-q", *(item for key, value in options.items() for item in ("-o", f"{key}={value}")),
            "-o", "APT::Architectures::=arm64"]


def _pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def _run(step: str, command: list[str], cwd: Path | None = None, stdin=None) -> str:
    try:
        done = subprocess.run(command, capture_output=True, cwd=cwd, stdin=stdin, timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BackendUnavailable(f"building the ARM64 emulation environment: {step} ran over "
                                 f"{STEP_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("E: ", "ERROR: "))]    # apt's and pip's first error
        raise BackendUnavailable(f"building the ARM64 emulation environment: {step} failed (exit {done.returncode}): "
                                 f"{printable((errors or lines or ['no message'])[-1 if not errors else 0])[:300]}")
    return done.stdout.decode(errors="replace")


def _publish(directory: Path, env: Path) -> None:
    """Replace ``directory/env`` by ``env``: the old one is renamed away first, so a reader sees one or the other."""
    target, old = directory / "env", directory / f".old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(env, target)
    shutil.rmtree(old, ignore_errors=True)


def not_run_reason(backend: str) -> str | None:
    """Why an artifact of ``backend`` is not run under ARM64 emulation; None when it is."""
    return None if backend in BACKENDS else NOT_HERE.get(backend, f"this environment has no {backend} runtime")

