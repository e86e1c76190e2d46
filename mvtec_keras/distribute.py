"""Training on several devices with ``tf.distribute``: which strategy, and the few places that care.

``--strategy`` picks one of:

- ``none``: TensorFlow's default strategy (one device; what training always did);
- ``mirrored``: :class:`tf.distribute.MirroredStrategy` over the local GPUs (over the logical CPU
  devices when there is no GPU and more than one CPU device is configured, as the tests do);
- ``multiworker``: :class:`tf.distribute.MultiWorkerMirroredStrategy` over the ``TF_CONFIG`` cluster,
  trained by :mod:`mvtec_keras.multiworker`'s loop (Keras 3's own ``fit`` does not run under it);
- ``auto``: ``multiworker`` when ``TF_CONFIG`` names more than one worker, else ``mirrored`` when
  more than one GPU is visible, else ``none``.

``-b`` stays the *global* batch: each step splits it over the replicas and the gradients are
summed over replicas of losses scaled by ``1 / replicas``, so one step equals a one-device step
on the same batch (BatchNorm statistics are those of the global batch, see :func:`batch_norm`).
The learning rate is therefore not rescaled.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .errors import InputError

STRATEGIES = ("auto", "none", "mirrored", "multiworker")


def tf_config_workers(tf_config: Optional[str] = None) -> int:
    """Number of workers (chief included) that ``TF_CONFIG`` names; 0 when it is unset or names none."""
    raw = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not raw.strip():
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (ValueError, AttributeError):
        raise InputError("TF_CONFIG is not valid JSON with a 'cluster' entry") from None
    return sum(len(cluster.get(job, [])) for job in ("chief", "worker"))


def resolve(name: str, n_gpus: Optional[int] = None, tf_config: Optional[str] = None) -> str:
    """The strategy ``name`` stands for here (``auto`` decided from the GPUs and ``TF_CONFIG``)."""
    name = (name or "").lower()
    if name not in STRATEGIES:
        raise InputError(f"--strategy: unknown '{name}'; choose from {', '.join(STRATEGIES)}")
    if name != "auto":
        return name
    if tf_config_workers(tf_config) > 1:
        return "multiworker"
    if n_gpus is None:
        import tensorflow as tf

        n_gpus = len(tf.config.list_physical_devices("GPU"))
    return "mirrored" if n_gpus > 1 else "none"


def mirrored_devices() -> list:
    """The devices ``mirrored`` replicates over: every local GPU, else every logical CPU device."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def make_strategy(name: str):
    """``(strategy, resolved name)`` for a ``--strategy`` value.

    Call it before building models (they must be built in its scope).
    """
    resolved = resolve(name)
    import tensorflow as tf

    if resolved == "none":
        return tf.distribute.get_strategy(), resolved
    if resolved == "mirrored":
        return tf.distribute.MirroredStrategy(devices=mirrored_devices()), resolved
    if tf_config_workers() < 1:
        raise InputError("--strategy multiworker: TF_CONFIG must name the cluster's workers "
                         "(see docs/distributed.md)")
    # Keras' own fit cannot run under it (keras-team/keras#20585): training.fit then runs
    # mvtec_keras.multiworker's loop. The collective runtime starts here, before any other TF op.
    return tf.distribute.MultiWorkerMirroredStrategy(), resolved


def replicas(strategy=None) -> int:
    """Replicas in sync under ``strategy`` (default: the current one)."""
    import tensorflow as tf

    return int((strategy or tf.distribute.get_strategy()).num_replicas_in_sync)


def describe(strategy, resolved: str) -> str:
    """One line for the console: the strategy and its replicas."""
    n = replicas(strategy)
    where = ""
    if resolved == "mirrored":
        where = " on " + ", ".join(d.split("device:")[-1] for d in strategy.extended.worker_devices)
    elif resolved == "multiworker":
        from .multiworker import is_chief

        r = strategy.cluster_resolver
        where = (f" over {tf_config_workers()} workers; this is {r.task_type} {r.task_id}"
                 f"{' (writes the run)' if is_chief(strategy) else ' (trains; the chief writes the run)'}")
    return f"strategy: {resolved}, {n} replica{'s' if n != 1 else ''}{where}"


def check_global_batch(batch_size: int, strategy, flag: str = "-b/--batch-size") -> None:
    """The global batch must split evenly, so that every replica's loss mean weighs the same."""
    n = replicas(strategy)
    if batch_size % n:
        raise InputError(f"{flag}: {batch_size} is the global batch and must be a multiple of the "
                         f"{n} replicas")


def short_last_batch(n_images: int, batch_size: int, strategy=None) -> bool:
    """Whether the last batch of ``n_images`` would leave a replica without images (fewer images than
    replicas): layers fail on an empty batch, so training pipelines drop such a batch."""
    return 0 < int(n_images) % int(batch_size) < replicas(strategy)


def sync_batch_norm() -> bool:
    """Whether models built now should synchronise BatchNorm statistics: under a multi-replica strategy."""
    return replicas() > 1


def batch_norm(**kwargs):
    """A BatchNormalization layer; built inside a multi-replica strategy's scope, its batch moments are
    all-reduced over the replicas (Keras' ``synchronized=True``), so a step normalises by the global
    batch as on one device. Outside a multi-replica step such a layer is plain BatchNormalization."""
    import keras

    if sync_batch_norm():
        kwargs.setdefault("synchronized", True)
    return keras.layers.BatchNormalization(**kwargs)


def scale_loss(loss):
    """A per-replica mean loss divided by the replicas: summed gradients are then the global mean's
    (what Keras' own ``compile``/``fit`` losses do; custom ``train_step`` losses need it by hand)."""
    n = replicas()
    return loss if n == 1 or loss is None else loss / n
