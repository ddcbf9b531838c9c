"""A cache of ONNX exports, so that exporting the same network again (another calibration set, other formats,
another output folder, ``inspect``'s and ``--keep-float``'s re-exports) skips torch's exporter and onnxsim.

An entry is keyed by everything the exported graph depends on: every parameter and buffer (name, dtype,
shape, bytes), every module's class and plain attributes (ULSAM's export form among them), the input size,
the opset, the versions of torch, onnx, onnxscript and onnxsim, and the source of this package's network and
ONNX export code. A network this cannot describe (a module class from outside torch and this package, a
``forward`` replaced on an instance or its class, hooks) is never cached. An entry is the simplified, checked ``.onnx``
and a ``.json`` with its sha256 and the export details; an entry whose file does not match its sha256 is
ignored and replaced. Exports of one key wait for each other (a file lock), so two processes exporting the
same network run the exporter once.

The folder is ``$ULSAM_DEPLOY_CACHE`` (``off`` disables the cache), else ``$XDG_CACHE_HOME/ulsam-deploy/onnx``
or ``~/.cache/ulsam-deploy/onnx``; it keeps the ``MAX_ENTRIES`` most recently used entries. A cache that cannot
be read or written is skipped: the export then runs as without one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from ..nets.build import sha256_file
from .fileio import atomic_path, write_json_atomic

ENV = "ULSAM_DEPLOY_CACHE"
MAX_ENTRIES = 64
_PLAIN = (str, int, float, bool, type(None))
OWN = ("torch.", "ulsam_deploy.")      # where a cached module's class and its forward must come from
_LOCK_SECONDS = 1800          # a wait longer than any export: then export without the cache


def folder() -> Path | None:
    """The cache folder, or None when the cache is off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ulsam-deploy" / "onnx"


@functools.lru_cache(maxsize=1)
def _code_and_versions() -> str:
    from importlib import metadata

    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted([*(package / "nets").glob("*.py"), package / "export" / "onnx.py", Path(__file__)]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for name in ("torch", "onnx", "onnxscript", "onnxsim", "ulsam-deploy"):
        try:
            digest.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=-".encode())
    return digest.hexdigest()


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))


def network_key(model, input_size: int, opset: int) -> str | None:
    """The cache key of exporting ``model`` at ``input_size``, or None when it cannot be cached."""
    import torch

    digest = hashlib.sha256(json.dumps([_code_and_versions(), input_size, opset]).encode())
    for name, module in model.named_modules():
        cls = type(module)
        forward = getattr(cls, "forward", None)
        where = getattr(forward, "__module__", None) or ""
        if not cls.__module__.startswith(OWN) or not where.startswith(OWN):   # e.g. a forward patched on the class
            return None
        fields = vars(module)
        if "forward" in fields or any(fields.get(h) for h in ("_forward_hooks", "_forward_pre_hooks",
                                                              "_backward_hooks", "_state_dict_hooks")):
            return None
        plain = {k: v for k, v in fields.items() if not k.startswith("_") and _plain(v)}
        digest.update(json.dumps([name, f"{cls.__module__}.{cls.__qualname__}", f"{where}.{forward.__qualname__}",
                                  sorted(plain.items())],
                                 default=str).encode())
    for name, tensor in model.state_dict(keep_vars=False).items():
        shape = tuple(tensor.shape)
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(json.dumps([name, str(tensor.dtype), list(shape)]).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:40]


def cached_export(key: str | None, target: Path, export: Callable[[Path], dict]) -> dict:
    """Write the ONNX of ``key`` to ``target``: a copy of the cached entry, else ``export(target)`` (which writes
    ``target`` and returns its details), stored for the next time. Returns the details."""
    where = folder()
    if key is None or where is None:
        return export(target)
    try:
        where.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock

        lock = FileLock(str(where / f"{key}.lock"), timeout=_LOCK_SECONDS)
        lock.acquire()
    except Exception:       # noqa: BLE001 - unwritable, or a lock held past any export: export without it
        return export(target)
    try:
        details = _read(where, key, target)
        if details is not None:
            return details
        details = export(target)
        _store(where, key, target, details)
        return details
    finally:
        lock.release()


def _read(where: Path, key: str, target: Path) -> dict | None:
    onnx_path, meta_path = where / f"{key}.onnx", where / f"{key}.json"
    try:
        meta = json.loads(meta_path.read_text())
        details = meta["details"]
        if not isinstance(details, dict) or sha256_file(onnx_path) != meta["sha256"]:
            return None
        with atomic_path(target) as tmp:
            shutil.copyfile(onnx_path, tmp)
        os.utime(meta_path)                       # most recently used
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return details


def _store(where: Path, key: str, target: Path, details: dict) -> None:
    try:
        with atomic_path(where / f"{key}.onnx") as tmp:
            shutil.copyfile(target, tmp)
        write_json_atomic(where / f"{key}.json", {"sha256": sha256_file(target), "details": details})
        entries = sorted(where.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[MAX_ENTRIES:]:
            for suffix in (".json", ".onnx", ".lock"):
                old.with_suffix(suffix).unlink(missing_ok=True)
    except OSError:
        pass
