"""A mixed-precision network as a float32 one with the same weights.

Training under ``mixed_bfloat16`` / ``mixed_float16`` keeps float32 weights
but computes in 16 bits, and a saved model keeps that compute dtype. A
deployed graph computes in float32 (LiteRT and ONNX converters have no
bfloat16 kernels for convolutions; LiteRT quantises on its own terms), so
export works on a float32 copy of the network.
"""

from __future__ import annotations

import keras


def is_mixed(model: keras.Model) -> bool:
    """Whether any layer of ``model`` computes in a dtype other than its float32 variables'."""
    return any(layer.compute_dtype != "float32" for layer in _layers(model))


def _layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def float32_model(model: keras.Model) -> keras.Model:
    """``model`` itself when it computes in float32; otherwise a copy whose every layer does, with the same
    (float32) weights."""
    if not is_mixed(model):
        return model

    def as_float32(layer):
        config = layer.get_config()
        config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=as_float32, recursive=True)
    copy.set_weights(model.get_weights())
    return copy
