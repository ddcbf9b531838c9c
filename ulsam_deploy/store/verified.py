"""Where an export's artifacts have been verified: the manifest's ``verified_on`` entries.

One entry per run of a pack's verifier brought home (a device, or an emulated CPU): who ran it (identity),
when, on which pack, and per artifact the verdict recomputed at home with its latency there. An entry names
each artifact's sha256, so a rebuilt artifact is not shown as verified by a run of its predecessor.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..formats import FORMATS

MAX_ENTRIES = 64
Text = Annotated[str, Field(max_length=300)]


class DeviceIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    label: Text                                  # "Cortex-A76, aarch64" or "Haswell (emulated)"
    system: Text
    release: Text
    machine: Text
    node: Text
    cpu: Text
    cores: int = Field(ge=0, le=1 << 20)
    features: list[Annotated[str, Field(max_length=40)]] = Field(default_factory=list, max_length=256)
    python: Text
    runtimes: dict[Text, Text] = Field(default_factory=dict, max_length=16)


class VerifiedArtifact(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    passed: bool
    breaches: list[Annotated[str, Field(max_length=500)]] = Field(default_factory=list, max_length=16)
    top1_agreement: float = Field(ge=0, le=100)
    p50_ms: float = Field(ge=0, allow_inf_nan=False)
    p90_ms: float = Field(ge=0, allow_inf_nan=False)


class Verification(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    device: DeviceIdentity
    emulated: bool
    emulated_cpu: Optional[Text] = None
    date: Text                                   # the device's clock, ISO 8601
    recorded: Text                               # when it was brought home
    pack_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    data: Text
    images: int = Field(ge=1)
    threads: int = Field(ge=0)
    int8_probe: Optional[Text] = None            # "exact", "saturates" or why it did not run
    artifacts: dict[str, VerifiedArtifact] = Field(max_length=len(FORMATS))

    @field_validator("artifacts")
    @classmethod
    def _formats(cls, value: dict) -> dict:
        unknown = [name for name in value if name not in FORMATS]
        if unknown:
            raise ValueError(f"unknown artifact format {unknown[0]!r}")
        return value


def add_verification(manifest_data: dict, entry: dict) -> None:
    """Add ``entry`` (validated) to ``verified_on``: it replaces the entry of the same machine and pack, and
    the oldest entries go beyond :data:`MAX_ENTRIES`."""
    Verification.model_validate(entry)

    def key(e: dict) -> tuple:
        device = e["device"]
        return device["label"], device["node"], device["cpu"], e["emulated"], e["pack_id"]

    kept = [e for e in manifest_data.get("verified_on") or [] if key(e) != key(entry)]
    manifest_data["verified_on"] = (kept + [entry])[-MAX_ENTRIES:]


def verified_labels(manifest_data: dict, name: str, sha256: str) -> list[str]:
    """Where artifact ``name`` with these bytes has been verified, newest first: "Cortex-A76, aarch64: pass"."""
    out = []
    for entry in reversed(manifest_data.get("verified_on") or []):
        artifact = entry.get("artifacts", {}).get(name)
        if artifact and artifact.get("sha256") == sha256:
            out.append(f"{entry['device']['label']}: {'pass' if artifact['passed'] else 'FAIL'}")
    return list(dict.fromkeys(out))
