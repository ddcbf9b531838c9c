"""The eager reference of parity and evaluation: BatchNorm folded, the same function as the model."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from ulsam_deploy.data import digits
from ulsam_deploy.model.spec import ModelSpec
from ulsam_deploy.runtime import reference_runner, torch_runner
from ulsam_deploy.nets.build import fold_batchnorm
from ulsam_deploy.store.refcache import cache_key
from tests.small_models import SPEC, realistic_model


@pytest.mark.parametrize("spec", [SPEC, ModelSpec.parse("mv1", "8:1,9:1,11", groups=4, width=0.25, num_classes=10,
                                                        input_size=64)], ids=["mv2", "mv1"])
def test_folded_reference_computes_the_models_function(spec):
    model = realistic_model(spec)
    images = np.ascontiguousarray(digits.load("test", spec.input_size)[0][:48])
    plain, folded = torch_runner(model, 1)(images), reference_runner(model, 1)(images)
    span = plain.max() - plain.min()
    assert span > 1.0                                  # logits of a realistic size, so the bound means something
    assert np.abs(folded - plain).max() <= 2e-6 * span  # rounding only: the gate allows 1e-5 of the span
    assert (folded.argmax(1) == plain.argmax(1)).all()


def test_fold_leaves_no_batchnorm_and_the_callers_model_untouched():
    model = realistic_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = reference_runner(model, 1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in runner.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fold_changes_what_a_wrong_fold_would_show():
    """A fold that dropped the BatchNorm instead of folding it would give other logits: the check above can fail."""
    model = realistic_model().eval()
    x = torch.from_numpy(np.array(digits.load("test", 64)[0][:8]))
    broken = fold_batchnorm(copy.deepcopy(model))
    for module in broken.modules():
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            module.bias.data.zero_()
    with torch.inference_mode():
        assert (broken(x) - model(x)).abs().max() > 1e-3


def test_cached_reference_rows_are_keyed_by_the_reference_form():
    import ulsam_deploy.store.refcache as refcache

    key = cache_key("w", "data", {"size": 64})
    saved, refcache.REFERENCE_FORM = refcache.REFERENCE_FORM, "another-form"
    try:
        assert cache_key("w", "data", {"size": 64}) != key
    finally:
        refcache.REFERENCE_FORM = saved


def test_split_reference_gives_the_unsplit_logits_and_gives_the_threads_back():
    model = realistic_model()
    images = np.ascontiguousarray(digits.load("test", 64)[0][:37])     # an odd count: unequal slices
    before = torch.get_num_threads()
    whole = reference_runner(model, 1)
    split = reference_runner(model, 3)
    try:
        a, b = whole(images), split(images)
    finally:
        whole.close()
        split.close()
    assert a.shape == b.shape == (37, 10)
    assert np.abs(a - b).max() <= 1e-6 * (a.max() - a.min())
    assert torch.get_num_threads() == before
