"""Networks: ULSAM, MobileNet-V1/V2, checkpoints, other libraries' layouts and ULSAM surgery."""

from .backbones import MobileNet
from .build import build_model, load_checkpoint, load_model, save_checkpoint
from .ulsam import ULSAM

__all__ = ["MobileNet", "ULSAM", "build_model", "load_checkpoint", "load_model", "save_checkpoint"]
