"""The thresholds table: fp32 tolerances scale with the logit range; an absolute bound asked for replaces it."""

from ulsam_deploy.verify.parity import ParityResult, judge, thresholds_for


def _fp32(max_abs: float, logit_range: float) -> ParityResult:
    return ParityResult("onnx", "onnxruntime", "fp32", 100, "x", top1_agreement=100.0, top5_agreement=100.0,
                        cosine_mean=1.0, cosine_min=1.0, max_abs=max_abs, mean_abs=max_abs / 10,
                        logit_range=logit_range)


def test_fp32_tolerance_follows_the_logit_range():
    limits = thresholds_for("onnxruntime", "fp32")
    assert judge(_fp32(2.2e-4, 238.0), limits).passed            # large logits: rounding grows with them
    small = judge(_fp32(1.4e-4, 0.27), limits)                   # 5e-4 of a small range: a real difference
    assert not small.passed and "max_abs/logit_range" in "; ".join(small.breaches)
    assert thresholds_for("litert", "fp32").max_abs_rel == 1e-4


def test_an_absolute_override_replaces_the_relative_bound():
    limits = thresholds_for("onnxruntime", "fp32", {"max_abs": 1e-3, "min_cosine": None})
    assert limits.max_abs == 1e-3 and limits.max_abs_rel is None
    assert judge(_fp32(5e-4, 0.27), limits).passed
    both = thresholds_for("onnxruntime", "fp32", {"max_abs": 1e-3, "max_abs_rel": 1e-3})
    assert both.max_abs == 1e-3 and both.max_abs_rel == 1e-3
