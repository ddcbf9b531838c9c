"""The metadata of our safetensors checkpoints: one schema, applied once, as the file is read.

A checkpoint is untrusted input (a download, a colleague's file). Its metadata is text the tool parses
(the spec, the preprocessing, accuracies), so every key is validated here before anything uses it:
strict types, finite numbers, bounded sizes and nesting, known keys only. A file that does not fit is
refused in one line. Metadata of safetensors files from other libraries (``format`` other than ours,
e.g. ``pt`` on the Hugging Face hub) is not read at all: their tensors say what they are.

A key that our writers add must be added here too (``CheckpointMetadata``), or their files are refused.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError, field_validator, model_validator

from ..data.preprocess import PreprocessingModel
from ..errors import InputFileError, UlsamError, printable, validation_line
from ..model.spec import MAX_POSITIONS_TEXT, ModelSpec

FORMAT_TAG = "ulsam-deploy/1"
MAX_VALUE_CHARS = 64 * 1024     # per metadata value; ours are well under 4 KB...
MAX_CLASS_NAMES_CHARS = 32 * 1024 * 1024   # ...but the class names: up to 100,000 of up to 256 characters
MAX_CLASSES = 100_000
MAX_KEYS = 64

Text = Annotated[str, Field(max_length=16384)]
Percent = Annotated[float, Field(strict=False, ge=0, le=100, allow_inf_nan=False)]   # "99.17" -> 99.17
Count = Annotated[int, Field(strict=False, ge=0, le=10 ** 12)]
ClassName = Annotated[str, Field(min_length=1, max_length=256)]
Record = dict[str, Any]   # a training recipe, for the card: any JSON object (finite, nested at most ~200 deep)


class SpecRecord(BaseModel):
    """``ModelSpec.to_json()`` as stored; older files have no activation."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    arch: str = Field(max_length=16)
    positions: str = Field("", max_length=MAX_POSITIONS_TEXT)
    groups: int = 4
    width: float = Field(1.0, allow_inf_nan=False)
    num_classes: int = 1000
    input_size: int = 224
    activation: Optional[str] = Field(None, max_length=16)

    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.model_dump())

    @model_validator(mode="after")
    def _buildable(self) -> "SpecRecord":
        try:
            self.model_spec()
        except UlsamError as exc:   # out of range, unknown arch, positions that do not fit the table
            raise ValueError(exc.message) from None
        return self


class CheckpointMetadata(BaseModel):
    """Every key our writers put in a checkpoint (``save_checkpoint``, ``build``, ``train``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    format: Literal["ulsam-deploy/1"]
    spec: Json[SpecRecord]
    preprocessing: Optional[Json[PreprocessingModel]] = None
    dataset: Optional[Text] = None            # a label: a reference set's name, or the folder it was trained on
    test_top1: Optional[Percent] = None
    test_top5: Optional[Percent] = None
    test_count: Optional[Count] = None
    train_config: Optional[Json[Record]] = None
    train_recipe: Optional[Json[Record]] = None
    origin: Optional[Text] = None             # the checkpoint it was built or fine-tuned from
    teacher: Optional[Text] = None            # the distillation teacher
    class_names: Optional[Json[Annotated[list[ClassName], Field(max_length=MAX_CLASSES)]]] = None   # output order

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data):
        if not isinstance(data, dict) or len(data) > MAX_KEYS:
            raise ValueError(f"must be at most {MAX_KEYS} text entries")
        for key, value in data.items():
            limit = MAX_CLASS_NAMES_CHARS if key == "class_names" else MAX_VALUE_CHARS
            if not isinstance(value, str) or len(value) > limit:
                raise ValueError(f"{printable(str(key))[:40]!r} must be text of at most {limit:,} characters")
        return data

    @field_validator("train_config", "train_recipe")
    @classmethod
    def _finite(cls, value):
        if value is not None and not _all_finite(value):
            raise ValueError("holds a non-finite number")
        return value

    @field_validator("class_names")
    @classmethod
    def _names(cls, value):
        if value is not None:
            for name in value:
                if name != name.strip() or any(not c.isprintable() for c in name):
                    raise ValueError(f"class name {printable(name)[:40]!r} has control characters or edge spaces")
        return value

    @model_validator(mode="after")
    def _preprocessing_fits(self) -> "CheckpointMetadata":
        if self.class_names is not None and len(self.class_names) != self.spec.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.spec.num_classes} classes")
        if self.preprocessing is not None and self.preprocessing.size != self.spec.input_size:
            raise ValueError(f"preprocessing size {self.preprocessing.size} is not the model's input size "
                             f"{self.spec.input_size}")
        return self

    # --- views ------------------------------------------------------------------------------------
    @property
    def model_spec(self) -> ModelSpec:
        return self.spec.model_spec()

    def preprocessing_dict(self) -> dict | None:
        """The recorded preprocessing as ``Preprocessing.to_dict()`` gives it, or None."""
        return None if self.preprocessing is None else self.preprocessing.model_dump()

    def as_dict(self) -> dict:
        """The keys present, validated (numbers as numbers, spec and preprocessing as dicts)."""
        return self.model_dump(exclude_none=True)


def _all_finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def validate_metadata(raw: dict[str, str], source: str) -> CheckpointMetadata | None:
    """The validated metadata of a safetensors file, None when it is not one of ours (nothing is read
    from it then); one line naming the first bad key otherwise."""
    if raw.get("format") != FORMAT_TAG:
        return None
    try:
        return CheckpointMetadata.model_validate(raw)
    except ValidationError as exc:
        raise InputFileError(f"{source}: its metadata is not what ulsam-deploy writes: {validation_line(exc)}",
                             "it was altered or not written by ulsam-deploy: use the original, or save its tensors "
                             "alone (a state_dict .pth) for `ulsam-deploy build --from`") from None
