"""Spec -> module, and checkpoints: safetensors with the spec in the metadata, or .pth/.pt read
with ``torch.load(weights_only=True)``. Other layouts (official ULSAM, torchvision, timm) are detected
and renamed to ours by :mod:`.layouts` as they are read."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputFileError, SpecError
from ..fileio import atomic_path
from ..spec import ModelSpec
from .backbones import MobileNet
from .layouts import Layout, check_compatible, to_ours, unwrap

CHECKPOINT_NAME = "model.safetensors"
FORMAT_TAG = "ulsam-deploy/1"


def build_model(spec: ModelSpec, seed: int | None = 0) -> MobileNet:
    """A freshly initialised network for ``spec`` (deterministic for a given seed), in eval mode."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MobileNet(spec)
    else:
        model = MobileNet(spec)
    return model.eval()


def checkpoint_file(path: Path) -> Path:
    """A model folder (``models/<name>``) stands for its ``model.safetensors``."""
    path = Path(path)
    if path.is_dir():
        inner = path / CHECKPOINT_NAME
        if not inner.is_file():
            raise InputFileError(f"{path} is a folder without {CHECKPOINT_NAME}",
                                 "pass a model folder from models/ or a checkpoint file")
        return inner
    if not path.exists():
        raise InputFileError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise InputFileError(f"checkpoint {path} is not a regular file")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(model: MobileNet, path: Path, extra: dict[str, str] | None = None) -> Path:
    """Write ``model`` (fp32 tensors) and its spec to ``path`` atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT_TAG, "spec": model.spec.to_json(), **(extra or {})}
    from safetensors import SafetensorError

    with atomic_path(Path(path)) as tmp:
        try:
            save_file(state, str(tmp), metadata=metadata)
        except SafetensorError as exc:   # e.g. "No space left on device": an I/O error like any other write
            raise OSError(f"cannot write {Path(path).name}: {str(exc).split('I/O error: ')[-1]}") from None
    return Path(path)


@dataclass
class Checkpoint:
    """A checkpoint file read and renamed to our layout."""

    path: Path
    state: dict[str, torch.Tensor]                    # our tensor names
    layout: Layout                                    # the names it came with
    spec: ModelSpec | None = None                     # the spec it carries (our safetensors only)
    metadata: dict[str, str] = field(default_factory=dict)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint or model folder: container unwrapped, layout detected, names mapped to ours."""
    path = checkpoint_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, metadata = read_safetensors(path)
        spec = ModelSpec.from_json(metadata["spec"]) if "spec" in metadata else None
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state, metadata, spec = _load_pickle(path), {}, None
    else:
        raise InputFileError(f"checkpoint {path.name} has an unknown extension {suffix or '(none)'}",
                             "use .safetensors (preferred) or .pth/.pt")
    state, layout = to_ours(unwrap(state, str(path)), str(path))
    return Checkpoint(path, state, layout, spec, metadata)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    """Tensors in our names (and the spec, when the file carries one) of a checkpoint or model folder."""
    checkpoint = read_checkpoint(path)
    return checkpoint.state, checkpoint.spec


def read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; tensors are skipped when ``tensors`` is False."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputFileError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None
    return state, metadata


def stored_spec(path: Path) -> ModelSpec | None:
    """The spec a checkpoint carries (safetensors metadata), read without loading its tensors."""
    path = checkpoint_file(path)
    if path.suffix.lower() != ".safetensors":
        load_checkpoint(path)   # still refuses unreadable or unsafe files here
        return None
    metadata = read_safetensors(path, tensors=False)[1]
    return ModelSpec.from_json(metadata["spec"]) if "spec" in metadata else None


def _load_pickle(path: Path) -> object:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{path} holds objects other than tensors and was refused (weights_only=True): {first[:160]}",
                             "re-save the weights as a plain state_dict or as safetensors") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{path} is not a readable PyTorch checkpoint: {first[:160]}") from None
    return obj


def load_state(model: MobileNet, state: dict[str, torch.Tensor], source: str = "checkpoint") -> MobileNet:
    """Load ``state`` (our names) into ``model`` strictly; name the first mismatching tensor and both shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise InputFileError(f"{source} does not fit the model spec: {detail}"
                             f"{' and more' if len(missing) + len(unexpected) > 3 else ''}",
                             "check --arch/--positions/--groups/--width/--num-classes")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise InputFileError(f"{source}: tensor {key} has shape {tuple(state[key].shape)}, "
                                 f"the model expects {tuple(tensor.shape)}",
                                 "check --arch/--positions/--groups/--width/--num-classes")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.eval()


def load_model(path: Path, spec: ModelSpec | None = None) -> MobileNet:
    """Build the network a checkpoint describes and load its weights.

    ``spec`` is required for files without one (.pth) and, when both exist, must agree.
    """
    return model_from(read_checkpoint(path), spec)


def model_from(checkpoint: Checkpoint, spec: ModelSpec | None = None) -> MobileNet:
    """The network of ``checkpoint`` (see :func:`load_model`), every tensor loaded strictly."""
    path, stored = checkpoint.path, checkpoint.spec
    if stored is not None and spec is not None and stored != spec:
        raise SpecError(f"checkpoint {path} holds {stored.name}, not the requested {spec.name}",
                        "drop the spec options or pass the matching checkpoint")
    spec = stored or spec
    if spec is None:
        raise SpecError(f"checkpoint {path} carries no model spec", "pass --arch/--positions/--groups too")
    check_compatible(checkpoint.layout, spec, str(path))
    return load_state(build_model(spec, seed=None), checkpoint.state, source=str(path))
