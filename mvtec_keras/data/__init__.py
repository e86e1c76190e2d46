"""Data: find images on disk (MVTec layout or plain folders) and turn them into tf.data pipelines."""

from .discovery import (  # noqa: F401
    GOOD,
    IMAGE_EXTENSIONS,
    Category,
    Sample,
    check_samples,
    discover,
    discover_folder,
    discover_mvtec,
    split_validation,
    stratified_split,
)
from .pipeline import COLOR_MODES, Augmentation, Preprocessing, load_arrays, make_dataset  # noqa: F401
