"""Write the foreign-checkpoint fixtures in tests/fixtures/ with torchvision and timm themselves.

torchvision 0.28.0 is published to our registry only as a CUDA build, and timm needs it, so neither is a
dependency of ulsam-deploy: this script runs once, by hand, in a scratch virtual environment outside the
repository, and its outputs are committed. Nothing is downloaded: every network is randomly initialised
(fixed seeds) and its BatchNorm statistics randomised, so the checkpoints exercise every tensor.

    python3 -m venv /tmp/fixture-venv
    /tmp/fixture-venv/bin/pip install torch==2.13.0
    /tmp/fixture-venv/bin/pip install --no-deps torchvision==0.28.0 timm==1.0.31
    /tmp/fixture-venv/bin/pip install pyyaml huggingface_hub safetensors numpy pillow
    /tmp/fixture-venv/bin/python scripts/make_fixtures.py [--out tests/fixtures]

Written (see tests/fixtures/README.md):

* ``torchvision_mv2_050_c10.pth`` - ``torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=10)``,
  a bare state dict, fp32;
* ``timm_mv2_035_c10.safetensors`` - timm ``mobilenetv2_035`` with 10 classes, fp32 (timm's own format);
* ``timm_mv1_100_c10_ddp.pth`` - timm ``mobilenetv1_100`` with 10 classes, saved as
  ``{"state_dict": {"module.<key>": tensor}}`` (a DDP training checkpoint); weights rounded to fp16 before
  the logits were computed and stored in fp16, which halves the file and is widened back exactly;
* ``preprocess_source.png`` - a synthetic 520 x 333 photo-like image (odd sizes, so that resizing and
  crop offsets round; every shipped calibration photo is already 256 px on its short side);
* ``expected.safetensors`` - the fixed input (2 x 3 x 224 x 224), each library's logits on it (eval mode),
  and each library's own resize + centre crop of ``preprocess_source.png`` (uint8 HWC) with the
  normalisation it would apply next (metadata ``preprocessing``).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

# torchvision's operator registrations need its compiled CUDA extension, absent on a CPU torch; the model
# and transform code does not use them. Only for generating fixtures, never in ulsam-deploy itself.
for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules[_name] = types.ModuleType(_name)

import numpy as np  # noqa: E402
import timm  # noqa: E402
import timm.data  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED = 20240601
PHOTO_SIZE = (520, 333)    # 256 * 520 / 333 = 399.8: torchvision truncates to 399 where rounding gives 400


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics, and a classifier with visible logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=gen))
                module.bias.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                module.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=gen)))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(0.05 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def make_photo(path: Path) -> None:
    """Smooth shading, edges at several frequencies and a little noise: resampling filters differ on it."""
    w, h = PHOTO_SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(SEED)
    channels = [128 + 90 * np.sin(x / (7 + 5 * c)) * np.cos(y / (11 + 3 * c)) + 30 * np.sign(np.sin((x + y) / 23))
                for c in range(3)]
    rgb = np.stack(channels, -1) + rng.normal(0, 6, (h, w, 3))
    Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), "RGB").save(path)


def crop_of(transform, photo: Path) -> np.ndarray:
    """The photo after the geometric steps of a library transform (everything before tensor conversion)."""
    with Image.open(photo) as image:
        image = image.convert("RGB")
        for step in getattr(transform, "transforms", [transform]):
            if type(step).__name__ in ("MaybeToTensor", "ToTensor", "Normalize"):
                break
            image = step(image)
    return np.asarray(image, dtype=np.uint8)


def torchvision_crop(weights, photo: Path) -> tuple[np.ndarray, dict]:
    """ImageClassification presets act on tensors; replay their resize and crop on the PIL image."""
    from torchvision.transforms import CenterCrop, Compose, Resize

    preset = weights.transforms()
    steps = Compose([Resize(preset.resize_size, interpolation=preset.interpolation, antialias=True),
                     CenterCrop(preset.crop_size)])
    config = {"resize": preset.resize_size[0], "crop": preset.crop_size[0],
              "interpolation": preset.interpolation.value, "mean": list(preset.mean), "std": list(preset.std)}
    return crop_of(steps, photo), config


def timm_crop(model: nn.Module, photo: Path) -> tuple[np.ndarray, dict]:
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    size = config["input_size"][-1]
    return crop_of(transform, photo), {"crop": size, "crop_pct": config["crop_pct"], "interpolation": config["interpolation"],
                                "mean": list(config["mean"]), "std": list(config["std"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)   # one thread: the reduction order, and so the logits, do not depend on the machine
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))
    tensors: dict[str, torch.Tensor] = {"input": x}

    torch.manual_seed(SEED + 1)
    tv = randomise(mobilenet_v2(width_mult=0.5, num_classes=10), SEED + 2)
    torch.save(tv.state_dict(), out / "torchvision_mv2_050_c10.pth")

    torch.manual_seed(SEED + 3)
    t2 = randomise(timm.create_model("mobilenetv2_035", num_classes=10, pretrained=False), SEED + 4)
    save_file({k: v.contiguous() for k, v in t2.state_dict().items()}, str(out / "timm_mv2_035_c10.safetensors"),
              metadata={"format": "pt"})

    torch.manual_seed(SEED + 5)
    t1 = randomise(timm.create_model("mobilenetv1_100", num_classes=10, pretrained=False), SEED + 6)
    t1 = t1.half().float()    # the stored fp16 values are exactly the ones the logits come from
    torch.save({"epoch": 90, "arch": "mobilenetv1_100",
                "state_dict": {f"module.{k}": v.half() if v.is_floating_point() else v
                               for k, v in t1.state_dict().items()}},
               out / "timm_mv1_100_c10_ddp.pth")

    with torch.no_grad():
        tensors["logits.torchvision_mv2_050_c10"] = tv(x)
        tensors["logits.timm_mv2_035_c10"] = t2(x)
        tensors["logits.timm_mv1_100_c10_ddp"] = t1(x)

    photo = out / "preprocess_source.png"
    make_photo(photo)
    preprocessing = {}
    for name, (crop, config) in {"torchvision": torchvision_crop(MobileNet_V2_Weights.IMAGENET1K_V1, photo),
                                 "torchvision-v2": torchvision_crop(MobileNet_V2_Weights.IMAGENET1K_V2, photo),
                                 "timm-mv2": timm_crop(t2, photo), "timm-mv1": timm_crop(t1, photo)}.items():
        tensors[f"crop.{name}"] = torch.from_numpy(crop.copy())
        preprocessing[name] = config
    metadata = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                "seed": str(SEED), "photo": photo.name, "pillow": Image.__version__, "preprocessing": json.dumps(preprocessing, sort_keys=True),
                "command": "python scripts/make_fixtures.py"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "expected.safetensors"), metadata=metadata)
    for key, value in tensors.items():
        if key.startswith("logits."):
            print(f"{key}: range {float(value.max() - value.min()):.3f}, first {value[0, :3].tolist()}")
    print(json.dumps({k: v for k, v in metadata.items() if k != "preprocessing"}))


if __name__ == "__main__":
    main()
