"""A device's result brought home: every verdict recomputed here from the logits the device computed.

The result must come from a pack of this export (its ``packs/<pack id>/`` is here) whose artifacts are still the
export's; its logits must match their sha256 and shape; the statistics and pass/fail the device printed must be
what its logits give against the reference kept here. Anything else is refused in one line, and nothing is
recorded. The verdict is then ``check``'s own (the thresholds table and its overrides) and goes into the
manifest's ``verified_on``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InputFileError, StaleArtifactError, printable, validation_line
from ..store.manifest import Manifest, locked
from ..store.verified import add_verification
from . import device_verify
from .pack import KEPT, LABELS, PACK_JSON, PACKS, REFERENCE
from .parity import ParityResult, Thresholds, compare, judge, thresholds_for

MAX_RESULT_BYTES = 1 << 30
# /proc/cpuinfo flag -> the feature (formats.ISA_FEATURES) the process's CPUID shows: disagreement means emulation
_FLAGS = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512_vnni": "AVX512VNNI"}


class _Outputs(BaseModel):
    dtype: Literal["float32"]
    shape: list[int] = Field(min_length=2, max_length=2)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    base64: str


class _Latency(BaseModel):
    p50: float = Field(ge=0, allow_inf_nan=False)
    p90: float = Field(ge=0, allow_inf_nan=False)
    runs: int = Field(ge=1)


class _Artifact(BaseModel):
    file: str
    sha256: str
    backend: str
    precision: str
    runtime: str = Field(max_length=200)
    statistics: dict[str, Any]
    passed: bool
    latency_ms: _Latency
    outputs: _Outputs


class _Result(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: Literal["ulsam-deploy-device-result/1"]
    pack_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    date: str = Field(max_length=40)
    device: dict[str, Any]
    threads: int = Field(ge=0)
    images: int = Field(ge=1)
    probe: dict[str, Any]
    artifacts: dict[str, _Artifact] = Field(min_length=1)


@dataclass
class DeviceRun:
    """One device's result, recomputed: the verdicts are this package's, the latency the device's (ms)."""

    directory: str
    pack_id: str
    model: str
    device: str                               # "Cortex-A76, aarch64", "Haswell (emulated)"
    emulated: bool
    emulated_cpu: str | None
    date: str
    data: str
    images: int
    threads: int
    probe: str                                # the INT8 probe: "exact", "saturates", or why it did not run
    identity: dict = field(default_factory=dict)
    results: list[ParityResult] = field(default_factory=list)
    latency_ms: dict[str, dict] = field(default_factory=dict)    # artifact -> {"p50": ms, "p90": ms}

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)


def bring_home(directory: Path, result_path: Path, overrides: dict | None = None,
               emulated_cpu: str | None = None) -> DeviceRun:
    """Check ``result_path`` against the pack of the export ``directory`` it names, judge every artifact with
    check's thresholds (``overrides`` as check's flags) and record the run in the manifest's ``verified_on``.
    ``emulated_cpu``: the CPU model this host emulated to produce it (``check --emulate``)."""
    raw = _read(Path(result_path))
    where = printable(str(result_path))
    with locked(directory, "write"):
        manifest = Manifest.load(directory)
        pack, reference, labels = _kept_pack(manifest, raw.pack_id, where)
        if raw.images > len(reference):
            _refuse(where, f"it claims {raw.images} images; its pack holds {len(reference)}")
        run = _describe(manifest, pack, raw, emulated_cpu)
        for name, artifact in raw.artifacts.items():
            entry = _packed(manifest, pack, name, artifact, where)
            logits = _logits(artifact.outputs, raw.images, reference.shape[1], name, where)
            ref, lab = reference[:raw.images], None if labels is None else labels[:raw.images]
            stats = compare(logits, ref, lab)
            _same_numbers(artifact, stats, raw.images, Thresholds(**entry["thresholds"]), name, where)
            result = ParityResult(artifact=name, backend=entry["backend"], precision=entry["precision"],
                                  count=raw.images, data=pack["data"]["name"], **stats)
            run.results.append(judge(result, thresholds_for(entry["backend"], entry["precision"], overrides)))
            run.latency_ms[name] = {"p50": artifact.latency_ms.p50, "p90": artifact.latency_ms.p90}
        try:
            add_verification(manifest.data, _entry(run, raw, pack))
        except ValidationError as exc:
            _refuse(where, validation_line(exc))
        manifest.save()
    return run


def _refuse(where: str, why: str, cls=InputFileError):
    raise cls(f"device result {where} is refused: {why}", "run the pack's verify.py again and bring its "
                                                           "result.json as it wrote it")


def _read(path: Path) -> _Result:
    where = printable(str(path))
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            raise InputFileError(f"device result {where} is over 1 GiB, not a verify.py result")
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise InputFileError(f"device result {where} cannot be read: {getattr(exc, 'strerror', None) or exc}",
                             "pass the result.json that verify.py wrote") from None
    except json.JSONDecodeError as exc:
        raise InputFileError(f"device result {where} is not JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict) or data.get("format") != device_verify.RESULT_FORMAT:
        raise InputFileError(f"device result {where} is not a result of a pack's verify.py "
                             f"({device_verify.RESULT_FORMAT})", "pass the result.json that verify.py wrote")
    try:
        return _Result.model_validate(data)
    except ValidationError as exc:
        _refuse(where, validation_line(exc))


def _kept_pack(manifest: Manifest, pack_id: str, where: str):
    """pack.json, reference and labels of the pack ``pack_id``, as this export directory keeps them."""
    folder = manifest.directory / PACKS / pack_id
    if not (folder / PACK_JSON).is_file():
        raise StaleArtifactError(f"device result {where} comes from pack {pack_id[:12]}, which was not made from "
                                 f"{manifest.directory} (a pack of another export, or packs/ was removed)",
                                 f"make a pack of it with `ulsam-deploy pack --export {manifest.directory}` and run that")
    try:
        pack = json.loads((folder / PACK_JSON).read_text())
        valid = pack.get("pack_id") == pack_id == device_verify.pack_id_of(pack) and all(
            device_verify.sha256_file(folder / name) == pack["files"][name]
            for name in KEPT if name in pack["files"] and (name != LABELS or pack.get("labels")))
        reference = np.load(folder / REFERENCE, allow_pickle=False)
        labels = np.load(folder / LABELS, allow_pickle=False) if pack.get("labels") else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise StaleArtifactError(f"{folder} does not match its pack id (modified or incomplete)",
                                 "make a new pack with `ulsam-deploy pack` and verify again")
    return pack, reference, labels


def _packed(manifest: Manifest, pack: dict, name: str, artifact: _Artifact, where: str) -> dict:
    """The pack's entry for ``name``, after checking it is what the device ran and still the export's."""
    entry = pack["artifacts"].get(name)
    if entry is None:
        _refuse(where, f"its pack holds no {name!r}")
    if (artifact.sha256, artifact.file, artifact.backend, artifact.precision) != (
            entry["sha256"], entry["file"], entry["backend"], entry["precision"]):
        _refuse(where, f"its {name} is not the pack's {entry['file']}")
    current = manifest.artifacts.get(name)
    if pack["export"]["weights_sha256"] != manifest.data["weights_sha256"] or current is None \
            or current["sha256"] != entry["sha256"]:
        raise StaleArtifactError(f"{manifest.directory}'s {name} was rebuilt or removed after pack "
                                 f"{pack['pack_id'][:12]} was made", "make a new pack and verify again")
    return entry


def _logits(outputs: _Outputs, images: int, classes: int, name: str, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(outputs.base64, validate=True)
    except (binascii.Error, ValueError):
        _refuse(where, f"the logits of {name} are not base64")
    if outputs.shape != [images, classes] or len(raw) != images * classes * 4:
        _refuse(where, f"the logits of {name} are {outputs.shape}, {len(raw)} bytes; the pack's reference is "
                       f"[{images}, {classes}] float32")
    if hashlib.sha256(raw).hexdigest() != outputs.sha256:
        _refuse(where, f"the logits of {name} do not match their sha256 (edited or truncated)")
    return np.frombuffer(raw, "<f4").reshape(images, classes).astype(np.float32)


def _same_numbers(artifact: _Artifact, stats: dict, images: int, limits: Thresholds, name: str, where: str) -> None:
    """Refuse a result whose statistics or pass/fail are not what its logits give."""
    claimed = dict(artifact.statistics)
    if claimed.pop("count", None) != images or set(claimed) != set(stats):
        _refuse(where, f"the statistics of {name} do not name the ones its logits give")
    for key, value in stats.items():
        if not _close(_number(claimed[key]), value):
            _refuse(where, f"{name}'s {key} is {claimed[key]} on the device, {value} from its logits: "
                           "its numbers do not add up")
    verdict = judge(ParityResult(name, "", "", images, "", **stats), limits).passed
    if artifact.passed != verdict:
        _refuse(where, f"{name} says {'pass' if artifact.passed else 'FAIL'} where its numbers "
                       f"{'pass' if verdict else 'fail'} the pack's thresholds")


def _number(value):
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(value, value)


def _close(claimed, value) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return isinstance(claimed, int) and not isinstance(claimed, bool) and claimed == value
    if not isinstance(claimed, (int, float)) or isinstance(claimed, bool):
        return False
    if math.isnan(value) or math.isinf(value):
        return math.isnan(claimed) if math.isnan(value) else claimed == value
    return math.isclose(claimed, value, rel_tol=1e-6, abs_tol=1e-9)


def _describe(manifest: Manifest, pack: dict, raw: _Result, emulated_cpu: str | None) -> DeviceRun:
    device = raw.device
    text = {key: printable(str(device.get(key, "")))[:300] for key in ("cpu", "machine", "system", "release", "node")}
    features = [str(f)[:40] for f in device.get("cpu_features") or []][:256]
    flags = set(str(f) for f in device.get("cpu_flags") or [])
    emulated_cpu = emulated_cpu or (printable(str(device["emulated_cpu"]))[:60] if device.get("emulated_cpu") else None)
    # an x86 CPU whose /proc/cpuinfo and CPUID disagree is emulated (QEMU user mode shows the host's cpuinfo)
    mismatch = text["machine"] in ("x86_64", "AMD64") and flags and any(
        (flag in flags) != (feature in features) for flag, feature in _FLAGS.items())
    emulated = bool(emulated_cpu or mismatch)
    label = (f"{emulated_cpu} (emulated)" if emulated_cpu else
             f"an emulated CPU on {text['cpu']} (emulated)" if emulated else f"{text['cpu']}, {text['machine']}")
    probe = raw.probe.get("skipped") or ("saturates" if raw.probe.get("saturates") else "exact")
    cores = device.get("cores") if type(device.get("cores")) is int and 0 <= device["cores"] < 1 << 20 else 0
    identity = text | {"label": label, "cores": cores, "features": features,
                       "python": printable(str(device.get("python", "")))[:300]}
    return DeviceRun(str(manifest.directory), raw.pack_id, pack["model"], label, emulated, emulated_cpu, raw.date,
                     pack["data"]["name"], raw.images, raw.threads, printable(str(probe))[:300], identity)


def _entry(run: DeviceRun, raw: _Result, pack: dict) -> dict:
    """The manifest's ``verified_on`` entry of ``run`` (store/verified.py)."""
    runtimes = {a.backend: printable(a.runtime)[:300] for a in raw.artifacts.values()}
    artifacts = {r.artifact: {"sha256": pack["artifacts"][r.artifact]["sha256"], "passed": r.passed,
                              "breaches": [b[:500] for b in r.breaches][:16],
                              "top1_agreement": float(r.top1_agreement),
                              "p50_ms": float(run.latency_ms[r.artifact]["p50"]),
                              "p90_ms": float(run.latency_ms[r.artifact]["p90"])} for r in run.results}
    return {"device": run.identity | {"runtimes": runtimes}, "emulated": run.emulated,
            "emulated_cpu": run.emulated_cpu,
            "date": printable(run.date)[:40],
            "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "pack_id": run.pack_id, "data": printable(run.data)[:300], "images": run.images, "threads": run.threads,
            "int8_probe": run.probe, "artifacts": artifacts}
