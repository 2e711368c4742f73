"""Counterfactual metrics (SPEC section 6): per-sample functions, torchmetrics classes, and
classifier discrepancy. See each module's docstring for conventions (thresholds, NaN, std).
The names below are the package's public API (``__all__``)."""

from disc_pl.metrics.cf_metrics import (Concentration, CounterfactualMetrics, CounterfactualMSE, FlipRate,
                                        InMaskFraction, MaskIoU, RelativeGTDistance, SampleMeanStd)
from disc_pl.metrics.discrepancy import TrainFn, accuracy, classifier_discrepancy, make_logistic_trainer
from disc_pl.metrics.functional import (change_map, changed_pixels, concentration, dilate_mask, flipped,
                                        in_mask_fraction, mask_iou, mse, relative_gt_distance)

__all__ = ["Concentration", "CounterfactualMSE", "CounterfactualMetrics", "FlipRate", "InMaskFraction", "MaskIoU",
           "RelativeGTDistance", "SampleMeanStd", "TrainFn", "accuracy", "change_map", "changed_pixels",
           "classifier_discrepancy", "concentration", "dilate_mask", "flipped", "in_mask_fraction",
           "make_logistic_trainer", "mask_iou", "mse", "relative_gt_distance"]
