"""Figures (PNG) and tables (text, CSV) that report on a scored test set or a training run."""

from .plots import (
    plot_finetune,
    plot_history,
    plot_inspection,
    plot_level_auroc,
    plot_lr_range_test,
    plot_overlays,
    plot_pixel_roc,
    plot_roc,
    plot_score_histogram,
    save_segmentations,
)
from .tables import per_defect_table, write_predictions_csv

__all__ = [
    "per_defect_table",
    "plot_finetune",
    "plot_history",
    "plot_inspection",
    "plot_level_auroc",
    "plot_lr_range_test",
    "plot_overlays",
    "plot_pixel_roc",
    "plot_roc",
    "plot_score_histogram",
    "save_segmentations",
    "write_predictions_csv",
]
