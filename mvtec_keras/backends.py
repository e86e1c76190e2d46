"""What differs between Keras backends, in one place.

Models, losses, residual maps and scores are written in ``keras.ops`` and run
on any Keras backend. Two things are backend-specific:

- compiling a forward pass: the TensorFlow backend keeps its ``tf.function``
  graphs where they are (so its numbers do not change); JAX gets
  :func:`jit`; other backends (torch) run eagerly;
- ``tf.data`` (the data pipeline) and export stay TensorFlow: callers test
  for a dataset with :func:`is_tf_dataset`, which never imports TensorFlow,
  so that these modules import on a machine without it.
"""

from __future__ import annotations

import sys

import keras
from keras import ops


def name() -> str:
    return keras.backend.backend()


def is_tensorflow() -> bool:
    return name() == "tensorflow"


def tensorflow_if_backend():
    """TensorFlow when it is the Keras backend (for its fast batched kernels), else None (use numpy / ops)."""
    if not is_tensorflow():
        return None
    import tensorflow as tf

    return tf


def is_tf_dataset(obj) -> bool:
    """Whether ``obj`` is a ``tf.data.Dataset`` (False, without importing TF, when TF was never loaded)."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(obj, tf.data.Dataset)


def as_float32(x):
    """A float32 tensor of the backend (``tf.convert_to_tensor`` under TF, as the traced graphs expect)."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.convert_to_tensor(x, tf.float32)
    return ops.convert_to_tensor(x, "float32")


def fit_jit_compile(requested: bool):
    """``jit_compile`` for ``model.compile``: as requested under TF (XLA on top of its graphs) and
    torch; always on under JAX, where the alternative is an uncompiled eager loop."""
    return True if name() == "jax" else requested


def jit(fn, variables):
    """``fn(x)`` compiled for the JAX / torch backends (not used under TensorFlow, see above).

    Under JAX: one ``jax.jit`` per input shape, with ``variables`` (the model's
    weights and statistics) passed as arguments through a ``StatelessScope``
    rather than baked into the program as constants, so that large backbones
    compile quickly. Elsewhere ``fn`` runs eagerly.
    """
    if name() != "jax":
        return lambda x: fn(as_float32(x))
    import jax

    variables = list(variables)

    def pure(values, x):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(x)

    compiled = jax.jit(pure)
    return lambda x: compiled([v.value for v in variables], as_float32(x))
