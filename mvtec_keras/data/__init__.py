"""Data: find images on disk (MVTec layout or plain folders) and turn them into tf.data pipelines.

The pipeline names are imported lazily so that discovery and the demo builder
start without loading TensorFlow.
"""

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

_PIPELINE = ("COLOR_MODES", "Augmentation", "Preprocessing", "load_arrays", "make_dataset")


def __getattr__(name):
    if name in _PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
