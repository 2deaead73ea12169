"""Evaluation: metrics (`metrics`), the batched resumable runner (`runner`) and `llavakit eval` (`cli`)."""

from .metrics import METRICS, Metric, get_metric, normalize_vqa_answer, vqa_soft_accuracy
from .runner import EvalDataError, EvalSample, evaluate, read_samples

__all__ = ["METRICS", "Metric", "get_metric", "normalize_vqa_answer", "vqa_soft_accuracy", "EvalDataError",
           "EvalSample", "evaluate", "read_samples"]
