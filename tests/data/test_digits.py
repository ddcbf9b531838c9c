import numpy as np

from ulsam_deploy.data import digits


def test_split_is_fixed_stratified_and_rendered():
    x_train, y_train = digits.load("train", 32)
    x_test, y_test = digits.load("test", 32)
    assert len(x_train) == 1437 and len(x_test) == 360
    assert x_train.shape[1:] == (3, 32, 32) and x_train.dtype == np.float32
    assert np.bincount(y_test).min() >= 35          # every class present in proportion
    # deterministic across calls (same order, same bytes)
    digits.load.cache_clear()
    again, labels = digits.load("test", 32)
    assert np.array_equal(again, x_test) and np.array_equal(labels, y_test)
