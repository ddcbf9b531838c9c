"""Small models for export and parity tests: random weights with BatchNorm statistics set on real
images, so that logits are O(1) as in a trained network (INT8 parity then means something)."""

import numpy as np
import torch

from ulsam_deploy.nets import build_model, save_checkpoint
from ulsam_deploy.model.spec import ModelSpec

SPEC = ModelSpec.parse("mv2", "13,14,16,17", groups=4, width=0.5, num_classes=10, input_size=64)


def model_file(tmp_path, spec=SPEC, seed=0, name="m.safetensors", extra=None):
    """Random weights with BN statistics set on real images, so that logits are O(1) as in a trained net."""
    return save_checkpoint(realistic_model(spec, seed), tmp_path / name, extra=extra)


def realistic_model(spec=SPEC, seed=0):
    """The network of :func:`model_file`, in memory (fresh BatchNorm statistics keep activations out of the
    denormal range, where a CPU is a hundred times slower)."""
    from ulsam_deploy.data import digits

    model = build_model(spec, seed=seed)
    images, _ = digits.load("train", spec.input_size)
    with torch.no_grad():
        torch.nn.init.normal_(model.classifier.weight, 0, 0.5, generator=torch.Generator().manual_seed(seed))
        model.train()
        for start in range(0, 256, 128):
            model(torch.from_numpy(np.array(images[start:start + 128])))
    return model.eval()


