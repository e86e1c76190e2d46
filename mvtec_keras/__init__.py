"""mvtec-keras: unsupervised visual anomaly detection for industrial images (TensorFlow / Keras 3)."""

__version__ = "0.1.0"
