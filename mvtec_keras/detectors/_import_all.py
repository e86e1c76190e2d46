"""Import every built-in detector module so that they register themselves."""

import importlib

#: detector modules skipped because TensorFlow is not installed
NEEDS_TENSORFLOW: list = []

for _mod in ("autoencoder", "mahalanobis", "spade", "padim", "patchcore", "gan", "ensemble"):
    try:
        importlib.import_module(f"{__package__}.{_mod}")
    except ModuleNotFoundError as e:
        if e.name == "tensorflow":  # GANs train with tf.GradientTape: TF-only (other Keras backends)
            NEEDS_TENSORFLOW.append(_mod)
        elif e.name != f"{__package__}.{_mod}":  # a family not built yet
            raise
