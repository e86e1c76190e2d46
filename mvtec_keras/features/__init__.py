"""Pre-trained EfficientNet feature extractors (B0-B7 via keras.applications, Lite0-2 built here)."""

from .extractor import BACKBONES, build_feature_extractor, tap_strides

__all__ = ["BACKBONES", "build_feature_extractor", "tap_strides"]
