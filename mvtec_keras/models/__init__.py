"""Keras model architectures: the convolutional autoencoders."""

from .autoencoders import AUTOENCODERS, autoencoder_info, build_autoencoder  # noqa: F401
