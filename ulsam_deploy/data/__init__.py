"""Data: the one preprocessing definition, reference sets, image folders, streams, calibration and evaluation sets."""

from .preprocess import Preprocessing
from .sets import DataSet, calibration_set

__all__ = ["DataSet", "Preprocessing", "calibration_set"]
