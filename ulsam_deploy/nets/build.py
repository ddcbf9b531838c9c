"""Spec -> module, and checkpoints: safetensors with the spec in the metadata, or .pth/.pt read
with ``torch.load(weights_only=True)``. Other layouts (official ULSAM, torchvision, timm) are detected
and renamed to ours by :mod:`.layouts` as they are read; metadata is validated by :mod:`.metadata`.

A network's size is known before it is built (:func:`estimate_size`, on PyTorch's meta device): commands
that build one refuse a spec over :data:`MAX_BUILD_BYTES` unless asked (:func:`check_model_size`)."""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputFileError, SpecError
from ..store.fileio import atomic_path
from ..model.spec import ModelSpec
from .backbones import MobileNet
from .layouts import Layout, check_compatible, to_ours, unwrap
from .metadata import FORMAT_TAG, CheckpointMetadata, validate_metadata

CHECKPOINT_NAME = "model.safetensors"
# What a command may build without being asked: fp32 weights plus the largest layer's input and output at
# batch 1. MobileNet-V2 at width 2 and 2048 px needs 1.5 GiB; width 4 with 100,000 classes at 2048 px, 5.0 GiB.
MAX_BUILD_BYTES = 4 << 30
ALLOW_LARGE_ENV = "ULSAM_ALLOW_LARGE"


def build_model(spec: ModelSpec, seed: int | None = 0) -> MobileNet:
    """A freshly initialised network for ``spec`` (deterministic for a given seed), in eval mode."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MobileNet(spec)
    else:
        model = MobileNet(spec)
    return model.eval()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold, in place, each eval-mode BatchNorm2d into the Conv2d that feeds it: the conv_bn_act blocks
    (a Sequential whose conv is followed by its BatchNorm) and ULSAM's ``dw``/``dw_bn`` and ``pw``/``pw_bn``
    pairs. The function is the same; its rounding differs from the unfolded model's by a few units in the
    last place (the exported graphs fold them too). Returns ``model``."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from .ulsam import ULSAM

    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, bn = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    module[i], module[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
        elif isinstance(module, ULSAM):
            module.dw, module.dw_bn = fuse_conv_bn_eval(module.dw, module.dw_bn), nn.Identity()
            module.pw, module.pw_bn = fuse_conv_bn_eval(module.pw, module.pw_bn), nn.Identity()
    return model


def meta_model(spec: ModelSpec) -> MobileNet:
    """``spec``'s network on PyTorch's meta device: every shape, no memory for weights (for counting)."""
    with torch.device("meta"):
        return MobileNet(spec).eval()


@dataclass(frozen=True)
class SizeEstimate:
    """What building and running ``spec`` at ``batch`` takes, bytes (fp32)."""

    params: int                      # parameters and buffers (BatchNorm statistics)
    weight_bytes: int
    activation_bytes: int            # the largest layer's input + output at this batch

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def estimate_size(spec: ModelSpec, batch: int = 1) -> SizeEstimate:
    """The memory a real ``spec`` network needs, measured on the meta device (nothing allocated)."""
    model = meta_model(spec)
    params = sum(t.numel() for t in model.state_dict().values())
    largest = [0]

    def hook(module, inputs, output):
        largest[0] = max(largest[0], sum(x.numel() for x in inputs if isinstance(x, torch.Tensor)) + output.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.empty(batch, 3, spec.input_size, spec.input_size, device="meta"))
    for handle in handles:
        handle.remove()
    return SizeEstimate(params, 4 * params, 4 * largest[0])


def check_model_size(spec: ModelSpec, batch: int = 1, allow_large: bool = False) -> SizeEstimate:
    """Refuse, before anything is allocated, a network whose estimate is over :data:`MAX_BUILD_BYTES`,
    unless ``allow_large`` or the environment variable ``ULSAM_ALLOW_LARGE=1`` says to go ahead."""
    estimate = estimate_size(spec, batch)
    if estimate.total_bytes > MAX_BUILD_BYTES and not (allow_large or os.environ.get(ALLOW_LARGE_ENV) == "1"):
        raise SpecError(f"{spec.name} needs about {estimate.total_bytes / 2 ** 30:.1f} GiB "
                        f"({estimate.params:,} weights and statistics, {estimate.weight_bytes / 2 ** 30:.2f} GiB, plus "
                        f"{estimate.activation_bytes / 2 ** 30:.2f} GiB of activations at batch {batch}), over the "
                        f"{MAX_BUILD_BYTES / 2 ** 30:g} GiB limit",
                        f"pass --allow-large (or set {ALLOW_LARGE_ENV}=1) if the machine has the memory")
    return estimate


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
    validate_metadata(metadata, str(path))   # never write what a reader would refuse (a key missing from the schema)
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
    metadata: CheckpointMetadata | None = None        # validated; None for .pth and other libraries' files


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint or model folder: container unwrapped, layout detected, names mapped to ours."""
    path = checkpoint_file(path)
    suffix = path.suffix.lower()
    metadata = read_metadata(path)   # validated before a tensor is read
    if suffix == ".safetensors":
        state = read_safetensors(path)[0]
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state = _load_pickle(path)
    else:
        raise InputFileError(f"checkpoint {path.name} has an unknown extension {suffix or '(none)'}",
                             "use .safetensors (preferred) or .pth/.pt")
    state, layout = to_ours(unwrap(state, str(path)), str(path))
    return Checkpoint(path, state, layout, metadata.model_spec if metadata else None, metadata)


def read_metadata(path: Path) -> CheckpointMetadata | None:
    """The validated metadata of a checkpoint or model folder (header only, no tensors read); None for
    .pth files and other libraries' safetensors, which carry none of ours."""
    path = checkpoint_file(path)
    if path.suffix.lower() != ".safetensors":
        return None
    return validate_metadata(read_safetensors(path, tensors=False)[1], str(path))


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
    metadata = read_metadata(path)
    return metadata.model_spec if metadata else None


def _load_pickle(path: Path) -> object:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{path} holds objects other than tensors and was refused (weights_only=True): {first[:160]}",
                             "re-save the weights as a plain state_dict or as safetensors") from None
    except Exception as exc:   # noqa: BLE001 - untrusted bytes: whatever the reader trips on (IndexError in the
        # unpickler for a short text file, BadZipFile, EOFError, RecursionError...) means "not a checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{path} is not a readable PyTorch checkpoint: {first[:160]}") from None
    return obj


def load_state(model: MobileNet, state: dict[str, torch.Tensor], source: str = "checkpoint") -> MobileNet:
    """Load ``state`` (our names) into ``model`` strictly; name the first mismatching tensor and both shapes."""
    expected = model.state_dict()
    check_fits(expected, state, source)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.eval()


def check_fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a ``state`` whose names or shapes are not ``expected``'s (a state dict, real or on meta)."""
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
    check_fits(meta_model(spec).state_dict(), checkpoint.state, str(path))   # before a byte is allocated
    return load_state(build_model(spec, seed=None), checkpoint.state, source=str(path))
