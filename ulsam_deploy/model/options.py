"""What the command line said about the model, as one typed object (built once at the CLI boundary)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .spec import ModelSpec


@dataclass(frozen=True)
class ModelOptions:
    """What the command line said about the model; None = not given."""

    arch: str | None = None
    positions: str | None = None
    groups: int | None = None
    width: float | None = None
    num_classes: int | None = None
    input_size: int | None = None
    activation: str | None = None
    preprocess: str | None = None          # a preset name (data.preprocess.PRESETS)

    def given(self) -> dict:
        """The spec fields given on the command line."""
        return {k: v for k, v in asdict(self).items() if v is not None and k != "preprocess"}

    def with_defaults(self, **defaults) -> "ModelOptions":
        """These options, with ``defaults`` for the fields not given."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def spec(self, base: ModelSpec | dict | None = None) -> ModelSpec:
        """The options over ``base`` (a stored spec, or fields read from a checkpoint), field by field.

        Fields neither gives take ModelSpec's defaults; another arch than the base's drops the base's
        activation, so that it takes its own default.
        """
        data = base.to_dict() if isinstance(base, ModelSpec) else dict(base or {})
        if self.arch is not None and self.arch != data.get("arch"):
            data.pop("activation", None)
        data |= self.given()
        return ModelSpec.parse(**{k: v for k, v in data.items() if k in _SPEC_FIELDS})

    def preprocessing(self, spec: ModelSpec, fallback: dict | None = None, layout_preset: str = "ours"):
        """The Preprocessing for ``spec``: ``--preprocess`` if given, else ``fallback`` (a recorded
        ``to_dict``, resized to the spec's input), else the checkpoint library's preset."""
        from ..data.preprocess import Preprocessing, preset

        if self.preprocess is not None:
            return preset(self.preprocess, spec.input_size, spec.arch)
        if fallback:
            return replace(Preprocessing.from_dict(fallback), size=spec.input_size)
        return preset(layout_preset, spec.input_size, spec.arch)


_SPEC_FIELDS = ("arch", "positions", "groups", "width", "num_classes", "input_size", "activation")
