"""Data: the one preprocessing definition, the digits reference set, calibration and evaluation sets."""

from .preprocess import Preprocessing
from .sets import DataSet, calibration_set, evaluation_set

__all__ = ["DataSet", "Preprocessing", "calibration_set", "evaluation_set"]
