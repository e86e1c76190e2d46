"""GAN-family anomaly models and a dense autoencoder baseline (Keras 3, TF backend).

Every model is a subclassed :class:`keras.Model` with its own ``train_step``,
so ``model.fit``, callbacks, checkpoints and resume work as usual, and each
answers ``anomaly_score(x) -> (scores [B], x_hat [B, H, W, C])`` in inference
mode (BatchNorm uses its moving statistics, so a score never depends on the
rest of the batch).

Convolutional nets are DCGAN-style: strided 4x4 convolutions with BatchNorm and
LeakyReLU(0.2) down to a small base grid, transposed convolutions with BatchNorm
and ReLU back up, and a sigmoid output because images live in [0, 1]. Power-of-two
sizes (32 ... 256) use a 4x4 base grid; 28x28 (MNIST) uses a 7x7 base grid
(28 -> 14 -> 7), so no padding is needed. BatchNorm momentum is 0.9 (PyTorch's
0.1), so that moving statistics settle within the short training budgets used here.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops

from ..distribute import batch_norm, replicas, scale_loss

SUPPORTED_SIZES = (28, 32, 64, 128, 256)
_PKG = "mvtec_keras"


def base_grid(image_size: int) -> tuple[int, int]:
    """``(base, n_blocks)``: the smallest feature grid and how many stride-2 steps reach it."""
    if image_size == 28:
        return 7, 2
    if image_size in SUPPORTED_SIZES:
        return 4, image_size.bit_length() - 3  # 32 -> 3 blocks, 256 -> 6
    raise ValueError(f"image_size={image_size}: choose from {SUPPORTED_SIZES}")


def _filters(filters: int, i: int) -> int:
    # Channels double at each stride-2 step, capped to keep 256 px nets small.
    return filters * min(2**i, 8)


def conv_features(image_size, channels, filters, name):
    """Strided-conv feature extractor: image -> flat feature vector."""
    _, n = base_grid(image_size)
    x_in = keras.Input((image_size, image_size, channels))
    h = x_in
    for i in range(n):
        h = layers.Conv2D(_filters(filters, i), 4, strides=2, padding="same", use_bias=i == 0)(h)
        if i > 0:  # DCGAN: no BatchNorm on the input layer
            h = batch_norm(momentum=0.9)(h)
        h = layers.LeakyReLU(0.2)(h)
    return keras.Model(x_in, layers.Flatten()(h), name=name)


def conv_encoder(image_size, channels, latent_dim, filters, name):
    """Image -> latent vector."""
    feats = conv_features(image_size, channels, filters, name + "_features")
    x_in = keras.Input((image_size, image_size, channels))
    z = layers.Dense(latent_dim)(feats(x_in))
    return keras.Model(x_in, z, name=name)


def conv_decoder(image_size, channels, latent_dim, filters, name, activation="sigmoid"):
    """Latent vector -> image in [0, 1] (``activation="tanh"``: in [-1, 1])."""
    base, n = base_grid(image_size)
    z_in = keras.Input((latent_dim,))
    h = layers.Dense(base * base * _filters(filters, n - 1), use_bias=False)(z_in)
    h = layers.Reshape((base, base, _filters(filters, n - 1)))(h)
    h = layers.ReLU()(batch_norm(momentum=0.9)(h))
    for i in reversed(range(n - 1)):
        h = layers.Conv2DTranspose(_filters(filters, i), 4, strides=2, padding="same", use_bias=False)(h)
        h = layers.ReLU()(batch_norm(momentum=0.9)(h))
    x_out = layers.Conv2DTranspose(channels, 4, strides=2, padding="same", activation=activation)(h)
    return keras.Model(z_in, x_out, name=name)


def image_discriminator(image_size, channels, filters, name):
    """Image -> (features, logit). Features feed the feature-matching losses."""
    feats = conv_features(image_size, channels, filters, name + "_features")
    x_in = keras.Input((image_size, image_size, channels))
    f = feats(x_in)
    return keras.Model(x_in, [f, layers.Dense(1)(f)], name=name)


def joint_discriminator(image_size, channels, latent_dim, filters, name):
    """BiGAN discriminator D(x, z) -> (joint features, logit)."""
    feats = conv_features(image_size, channels, filters, name + "_x")
    x_in = keras.Input((image_size, image_size, channels))
    z_in = keras.Input((latent_dim,))
    hz = layers.LeakyReLU(0.2)(layers.Dense(8 * filters)(z_in))
    h = layers.Concatenate()([feats(x_in), hz])
    f = layers.LeakyReLU(0.2)(layers.Dense(16 * filters)(h))
    return keras.Model([x_in, z_in], [f, layers.Dense(1)(f)], name=name)


def _bce(logits, target: float):
    return ops.mean(ops.binary_crossentropy(ops.full_like(logits, target), logits, from_logits=True))


def _images(data):
    """The image tensor of a batch: a bare tensor, an (x, ...) tuple or a dict with "image"."""
    if isinstance(data, dict):
        return data["image"]
    if isinstance(data, (tuple, list)):
        return data[0]
    return data


def _per_image_mean(t):
    return ops.mean(ops.reshape(t, (ops.shape(t)[0], -1)), axis=-1)


class _TwoPlayerModel(keras.Model):
    """Shared plumbing: two Adam optimisers, loss trackers, config."""

    tracked: tuple = ()

    def __init__(self, image_size=32, channels=1, latent_dim=100, filters=32, **kwargs):
        super().__init__(**kwargs)
        base_grid(image_size)  # validates the size early
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.latent_dim = int(latent_dim)
        self.filters = int(filters)
        self.trackers = {k: keras.metrics.Mean(name=k) for k in self.tracked}
        self.built = True  # sub-networks are functional models, built at construction

    def compile(self, learning_rate=2e-4, beta_1=0.5, **kwargs):
        super().compile(**kwargs)
        self._opt_config = {"learning_rate": float(learning_rate), "beta_1": float(beta_1)}
        # Two players, two optimisers (DCGAN settings by default).
        self.g_optimizer = keras.optimizers.Adam(learning_rate, beta_1=beta_1)
        self.d_optimizer = keras.optimizers.Adam(learning_rate, beta_1=beta_1)
        # Built now so that a saved optimizer state loads back (resume).
        g_vars, d_vars = self.player_variables()
        self.g_optimizer.build(g_vars)
        self.d_optimizer.build(d_vars)

    def player_variables(self):
        """``(generator-side trainable variables, discriminator trainable variables)``."""
        raise NotImplementedError

    def get_compile_config(self):
        return getattr(self, "_opt_config", None)

    def compile_from_config(self, config):
        self.compile(**config)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def _report(self, **values):
        for k, v in values.items():
            self.trackers[k].update_state(v)
        return {k: t.result() for k, t in self.trackers.items()}

    def build(self, input_shape=None):
        self.built = True

    def get_config(self):
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "latent_dim": self.latent_dim,
            "filters": self.filters,
            "name": self.name,
        }

    def _step(self, g_loss, d_loss, tape, g_vars, d_vars):
        # Under several replicas the optimisers sum the replicas' gradients: scale each by 1 / replicas.
        g_grads = [scale_loss(g) for g in tape.gradient(g_loss, g_vars)]
        d_grads = [scale_loss(g) for g in tape.gradient(d_loss, d_vars)]
        self.g_optimizer.apply_gradients(zip(g_grads, g_vars))
        self.d_optimizer.apply_gradients(zip(d_grads, d_vars))


@keras.saving.register_keras_serializable(package=_PKG)
class GANomaly(_TwoPlayerModel):
    """GANomaly (Akcay et al., 2018): encoder GE -> decoder GD -> encoder E2, plus a discriminator.

    Generator loss ``w_adv * L_adv + w_con * L_con + w_enc * L_enc`` with
    L_adv the mean squared distance between discriminator features of x and x_hat
    (feature matching), L_con = mean |x - x_hat| and L_enc = mean (z - z_hat)^2.
    The anomaly score is the latent distance mean((GE(x) - E2(GD(GE(x))))^2),
    the mean squared form of the paper's encoder loss. It is not min-max
    normalised over the test set as in the paper (that would use test statistics).

    Options that follow the reference implementation more closely (defaults
    unchanged until a measurement shows a win, see docs/bench_cifar10.md);
    ``filters=64`` is the reference's ngf/ndf:

    - ``adversarial="bce"``: L_adv = BCE(D(x_hat), real) as in the reference
      code, instead of the paper's feature matching (``"feature_matching"``);
    - ``tanh_output=True``: the nets see images mapped to [-1, 1] and the
      decoder ends in tanh (the reference normalises with mean = std = 0.5);
      L_con is then measured in [-1, 1], and ``call`` / ``anomaly_score`` still
      return x_hat in [0, 1];
    - ``reinit_d_below=1e-5``: after a step whose d_loss falls below this, the
      discriminator's weights are drawn again (the reference's ``reinit_d``:
      kernels N(0, 0.02), BatchNorm gamma N(1, 0.02), biases and beta 0; its
      optimiser state is kept, as in the reference); ``d_reinits`` counts them.
    """

    tracked = ("d_loss", "g_loss", "adv", "con", "enc")
    ADVERSARIAL = ("feature_matching", "bce")

    def __init__(self, image_size=32, channels=1, latent_dim=100, filters=32,
                 w_adv=1.0, w_con=50.0, w_enc=1.0, adversarial="feature_matching", tanh_output=False,
                 reinit_d_below=None, **kwargs):
        if adversarial not in self.ADVERSARIAL:
            raise ValueError(f"adversarial={adversarial!r}: choose from {', '.join(self.ADVERSARIAL)}")
        if reinit_d_below is not None and not float(reinit_d_below) > 0:
            raise ValueError(f"reinit_d_below={reinit_d_below!r}: must be a positive loss value or None")
        if reinit_d_below is not None and replicas() > 1:
            # Each replica would test its own d_loss and redraw D on its own: the copies would diverge.
            raise ValueError("reinit_d_below is not supported under a multi-replica strategy")
        super().__init__(image_size, channels, latent_dim, filters, **kwargs)
        self.w_adv, self.w_con, self.w_enc = float(w_adv), float(w_con), float(w_enc)
        self.adversarial = adversarial
        self.tanh_output = bool(tanh_output)
        self.reinit_d_below = None if reinit_d_below is None else float(reinit_d_below)
        args = (self.image_size, self.channels)
        self.encoder1 = conv_encoder(*args, self.latent_dim, self.filters, "ge")
        self.decoder = conv_decoder(*args, self.latent_dim, self.filters, "gd",
                                    activation="tanh" if self.tanh_output else "sigmoid")
        self.encoder2 = conv_encoder(*args, self.latent_dim, self.filters, "e2")
        self.discriminator = image_discriminator(*args, self.filters, "d")
        if self.reinit_d_below is not None:
            # A counter (also the seed of each fresh draw); not a weight, so checkpoints stay compatible.
            self.d_reinits = tf.Variable(0, dtype=tf.int64, trainable=False, name="d_reinits")

    def get_config(self):
        return {**super().get_config(), "w_adv": self.w_adv, "w_con": self.w_con, "w_enc": self.w_enc,
                "adversarial": self.adversarial, "tanh_output": self.tanh_output,
                "reinit_d_below": self.reinit_d_below}

    def _to_model(self, x):
        return 2.0 * x - 1.0 if self.tanh_output else x

    def _to_unit(self, x):
        return 0.5 * (x + 1.0) if self.tanh_output else x

    def _forward(self, x, training):
        """``(x, x_hat, z, z_hat)`` with x and x_hat in the model's pixel range."""
        x = self._to_model(x)
        z = self.encoder1(x, training=training)
        x_hat = self.decoder(z, training=training)
        z_hat = self.encoder2(x_hat, training=training)
        return x, x_hat, z, z_hat

    def call(self, x, training=False):
        _, x_hat, z, z_hat = self._forward(x, training)
        return self._to_unit(x_hat), z, z_hat

    def anomaly_score(self, x, batchnorm="inference"):
        """``(scores [B], x_hat [B, H, W, C] in [0, 1])``; see :func:`batchnorm_training` for ``batchnorm``."""
        x = ops.convert_to_tensor(x, "float32")
        training = batchnorm_training(batchnorm)
        with _statistics_kept(self, training):
            x_hat, z, z_hat = self(x, training=training)
        return ops.mean(ops.square(z - z_hat), axis=-1), x_hat

    def _loss_terms(self, x, training):
        x, x_hat, z, z_hat = self._forward(x, training)
        f_real, l_real = self.discriminator(x, training=training)
        f_fake, l_fake = self.discriminator(x_hat, training=training)
        if self.adversarial == "bce":
            adv = _bce(l_fake, 1.0)
        else:
            adv = ops.mean(ops.square(f_real - f_fake))
        con = ops.mean(ops.abs(x - x_hat))
        enc = ops.mean(ops.square(z - z_hat))
        g_loss = self.w_adv * adv + self.w_con * con + self.w_enc * enc
        # Only D's variables get d_loss gradients, so x_hat needs no stop_gradient.
        d_loss = 0.5 * (_bce(l_real, 1.0) + _bce(l_fake, 0.0))
        return dict(d_loss=d_loss, g_loss=g_loss, adv=adv, con=con, enc=enc)

    def player_variables(self):
        g_vars = (self.encoder1.trainable_variables + self.decoder.trainable_variables
                  + self.encoder2.trainable_variables)
        return g_vars, self.discriminator.trainable_variables

    def train_step(self, data):
        x = _images(data)
        with tf.GradientTape(persistent=True) as tape:
            out = self._loss_terms(x, training=True)
        self._step(out["g_loss"], out["d_loss"], tape, *self.player_variables())
        del tape
        if self.reinit_d_below is not None:
            tf.cond(out["d_loss"] < self.reinit_d_below, self._reinit_discriminator, lambda: tf.constant(False))
        return self._report(**out)

    def _reinit_discriminator(self):
        """Draw the discriminator's weights again (the reference's DCGAN ``weights_init``)."""
        self.d_reinits.assign_add(1)
        for i, v in enumerate(self.discriminator.trainable_variables):
            seed = tf.stack([tf.cast(self.d_reinits, tf.int32), tf.constant(i, tf.int32)])
            noise = tf.random.stateless_normal(v.shape, seed=seed, stddev=0.02, dtype=v.dtype)
            name = v.name.split("/")[-1].split(":")[0]
            if name == "kernel":
                v.assign(noise)
            elif name == "gamma":
                v.assign(1.0 + noise)
            else:  # bias, beta
                v.assign(tf.zeros_like(v))
        return tf.constant(True)

    def test_step(self, data):
        return self._report(**self._loss_terms(_images(data), training=False))


BATCHNORM_MODES = ("inference", "reference_leaky")


def batchnorm_training(batchnorm: str) -> bool:
    """Whether BatchNorm layers run in training mode when scoring.

    ``"inference"`` (the default everywhere): moving statistics, so an image's
    score never depends on the rest of its batch.

    ``"reference_leaky"`` reproduces the reference GANomaly's evaluation, which
    never switches its nets to evaluation mode: BatchNorm normalises each test
    batch by that batch's own statistics. With an unshuffled test set (all
    normals, then all abnormals) the statistics carry the label, which inflates
    AUROC. For reproduction benchmarks only (bench/cifar10.py); never a
    valid result. The moving statistics are left as they were.
    """
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm={batchnorm!r}: choose from {', '.join(BATCHNORM_MODES)}")
    return batchnorm == "reference_leaky"


class _statistics_kept:
    """Restore a model's non-trainable variables (BatchNorm moving statistics) on exit when ``active``:
    a training-mode call outside ``fit`` would otherwise update them. Eager use only."""

    def __init__(self, model, active):
        self.model, self.active = model, active

    def __enter__(self):
        if self.active:
            if not tf.executing_eagerly():
                raise RuntimeError("batchnorm='reference_leaky' scoring runs eagerly only")
            self.saved = [(v, v.numpy()) for v in self.model.non_trainable_variables]
        return self

    def __exit__(self, *exc):
        if self.active:
            for v, value in self.saved:
                v.assign(value)
        return False


@keras.saving.register_keras_serializable(package=_PKG)
class EfficientGAN(_TwoPlayerModel):
    """EfficientGAN (Zenati et al., 2018): a BiGAN with encoder E, generator G and joint D(x, z).

    D tells (x, E(x)) from (G(z), z); E and G are trained together to fool it.
    Score ``(1 - w) * mean|x - G(E(x))| + w * mean|f(x, E(x)) - f(G(E(x)), E(x))|``
    with f the last hidden layer of D (feature-matching variant), w = ``score_weight``.
    ``recon_weight`` > 0 adds an explicit mean|x - G(E(x))| term to the E/G loss
    (not in the paper, default 0) which speeds up learning an inverse on short budgets.
    """

    tracked = ("d_loss", "g_loss", "rec")

    def __init__(self, image_size=32, channels=1, latent_dim=100, filters=32,
                 score_weight=0.1, recon_weight=0.0, seed=0, **kwargs):
        super().__init__(image_size, channels, latent_dim, filters, **kwargs)
        self.score_weight, self.recon_weight, self.seed = float(score_weight), float(recon_weight), int(seed)
        args = (self.image_size, self.channels)
        self.encoder = conv_encoder(*args, self.latent_dim, self.filters, "e")
        self.generator = conv_decoder(*args, self.latent_dim, self.filters, "g")
        self.discriminator = joint_discriminator(*args, self.latent_dim, self.filters, "d")
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def get_config(self):
        return {**super().get_config(), "score_weight": self.score_weight,
                "recon_weight": self.recon_weight, "seed": self.seed}

    def call(self, x, training=False):
        z = self.encoder(x, training=training)
        return self.generator(z, training=training), z

    def anomaly_score(self, x, batchnorm="inference"):
        """``(scores [B], x_hat [B, H, W, C])``; see :func:`batchnorm_training` for ``batchnorm``."""
        x = ops.convert_to_tensor(x, "float32")
        training = batchnorm_training(batchnorm)
        with _statistics_kept(self, training):
            x_hat, z = self(x, training=training)
            f_real, _ = self.discriminator([x, z], training=training)
            f_fake, _ = self.discriminator([x_hat, z], training=training)
        rec = _per_image_mean(ops.abs(x - x_hat))
        fm = _per_image_mean(ops.abs(f_real - f_fake))
        return (1.0 - self.score_weight) * rec + self.score_weight * fm, x_hat

    def player_variables(self):
        g_vars = self.encoder.trainable_variables + self.generator.trainable_variables
        return g_vars, self.discriminator.trainable_variables

    def train_step(self, data):
        x = _images(data)
        z_prior = keras.random.normal((ops.shape(x)[0], self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape(persistent=True) as tape:
            z_enc = self.encoder(x, training=True)
            x_gen = self.generator(z_prior, training=True)
            _, l_real = self.discriminator([x, z_enc], training=True)
            _, l_fake = self.discriminator([x_gen, z_prior], training=True)
            d_loss = _bce(l_real, 1.0) + _bce(l_fake, 0.0)
            g_loss = _bce(l_real, 0.0) + _bce(l_fake, 1.0)  # E and G swap the labels
            if self.recon_weight:
                rec = ops.mean(ops.abs(x - self.generator(z_enc, training=True)))
                g_loss = g_loss + self.recon_weight * rec
        self._step(g_loss, d_loss, tape, *self.player_variables())
        del tape
        if not self.recon_weight:  # monitoring only: outside the tape, inference-mode BN
            rec = ops.mean(ops.abs(x - self.generator(ops.stop_gradient(z_enc), training=False)))
        return self._report(d_loss=d_loss, g_loss=g_loss, rec=rec)

    def test_step(self, data):
        x = _images(data)
        x_hat, _ = self(x, training=False)
        self.trackers["rec"].update_state(ops.mean(ops.abs(x - x_hat)))
        return {"rec": self.trackers["rec"].result()}


@keras.saving.register_keras_serializable(package=_PKG)
class AnoGAN(_TwoPlayerModel):
    """AnoGAN (Schlegl et al., 2017): a DCGAN, then a per-image search in latent space.

    The search minimises ``(1 - lam) * mean|x - G(z)| + lam * mean|f(x) - f(G(z))|``
    (f = discriminator features) over z with Adam for a fixed number of steps, all
    images of a batch at once. Means instead of the paper's sums keep ``lam``
    meaningful across image sizes. Every image starts from the same prior draw
    (fixed by ``seed``; z = 0 would sit on ReLU kinks with zero gradient), so a
    result does not depend on the batch; the final loss is the anomaly score.
    """

    tracked = ("d_loss", "g_loss")

    def __init__(self, image_size=32, channels=1, latent_dim=100, filters=32,
                 search_steps=100, search_lr=0.05, lam=0.1, seed=0, **kwargs):
        super().__init__(image_size, channels, latent_dim, filters, **kwargs)
        self.search_steps, self.search_lr = int(search_steps), float(search_lr)
        self.lam, self.seed = float(lam), int(seed)
        args = (self.image_size, self.channels)
        self.generator = conv_decoder(*args, self.latent_dim, self.filters, "g")
        self.discriminator = image_discriminator(*args, self.filters, "d")
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def get_config(self):
        return {**super().get_config(), "search_steps": self.search_steps,
                "search_lr": self.search_lr, "lam": self.lam, "seed": self.seed}

    def call(self, z, training=False):
        return self.generator(z, training=training)

    def player_variables(self):
        return self.generator.trainable_variables, self.discriminator.trainable_variables

    def train_step(self, data):
        x = _images(data)
        z = keras.random.normal((ops.shape(x)[0], self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape(persistent=True) as tape:
            x_gen = self.generator(z, training=True)
            _, l_real = self.discriminator(x, training=True)
            _, l_fake = self.discriminator(x_gen, training=True)
            d_loss = _bce(l_real, 1.0) + _bce(l_fake, 0.0)
            g_loss = _bce(l_fake, 1.0)  # non-saturating generator loss
        self._step(g_loss, d_loss, tape, *self.player_variables())
        del tape
        return self._report(d_loss=d_loss, g_loss=g_loss)

    def test_step(self, data):
        # The players' losses on validation normals, in inference mode (Keras' evaluate needs a log; an
        # empty one made every fit with validation images fail, train.py's default included).
        x = _images(data)
        z = keras.random.normal((ops.shape(x)[0], self.latent_dim), seed=self.seed_generator)
        _, l_real = self.discriminator(x, training=False)
        _, l_fake = self.discriminator(self.generator(z, training=False), training=False)
        return self._report(d_loss=_bce(l_real, 1.0) + _bce(l_fake, 0.0), g_loss=_bce(l_fake, 1.0))

    def _search_loss(self, x, f_x, z):
        x_gen = self.generator(z, training=False)
        f_gen, _ = self.discriminator(x_gen, training=False)
        res = _per_image_mean(tf.abs(x - x_gen))
        disc = _per_image_mean(tf.abs(f_x - f_gen))
        return (1.0 - self.lam) * res + self.lam * disc, x_gen

    def anomaly_score(self, x):
        x = tf.convert_to_tensor(x, tf.float32)
        f_x, _ = self.discriminator(x, training=False)
        b1, b2, eps, lr = 0.9, 0.999, 1e-7, self.search_lr
        z_start = tf.random.stateless_normal((1, self.latent_dim), seed=(self.seed, 0))
        z0 = tf.repeat(z_start, tf.shape(x)[0], axis=0)

        def body(i, z, m, v):
            with tf.GradientTape() as tape:
                tape.watch(z)
                # Summing per-image losses keeps each z's gradient its own image's.
                loss = tf.reduce_sum(self._search_loss(x, f_x, z)[0])
            g = tape.gradient(loss, z)
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * tf.square(g)
            t = tf.cast(i + 1, tf.float32)
            step = lr * (m / (1.0 - b1**t)) / (tf.sqrt(v / (1.0 - b2**t)) + eps)
            return i + 1, z - step, m, v

        _, z, _, _ = tf.while_loop(
            lambda i, *_: i < self.search_steps, body,
            (tf.constant(0), z0, tf.zeros_like(z0), tf.zeros_like(z0)))
        return self._search_loss(x, f_x, z)


@keras.saving.register_keras_serializable(package=_PKG)
class DenseAutoencoder(keras.Model):
    """The dense autoencoder of the classic Keras MNIST example, for any image size.

    Flattened image -> Dense(hidden...) -> latent -> Dense(reversed hidden) -> sigmoid
    pixels, trained with binary cross-entropy (or MSE). Score: mean squared
    reconstruction error per image.
    """

    def __init__(self, image_size=28, channels=1, latent_dim=32, hidden=(128, 64), loss="bce", **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.channels, self.latent_dim = int(image_size), int(channels), int(latent_dim)
        self.hidden = tuple(int(h) for h in hidden)
        if loss not in ("bce", "mse"):
            raise ValueError(f"loss={loss!r}: choose 'bce' or 'mse'")
        self.loss_name = loss
        shape = (self.image_size, self.image_size, self.channels)
        x_in = keras.Input(shape)
        h = layers.Flatten()(x_in)
        for units in self.hidden:
            h = layers.Dense(units, activation="relu")(h)
        z = layers.Dense(self.latent_dim, activation="relu")(h)
        self.encoder = keras.Model(x_in, z, name="encoder")
        z_in = keras.Input((self.latent_dim,))
        h = z_in
        for units in reversed(self.hidden):
            h = layers.Dense(units, activation="relu")(h)
        h = layers.Dense(self.image_size * self.image_size * self.channels, activation="sigmoid")(h)
        self.decoder = keras.Model(z_in, layers.Reshape(shape)(h), name="decoder")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True

    def build(self, input_shape=None):
        self.built = True

    def get_config(self):
        return {"image_size": self.image_size, "channels": self.channels, "latent_dim": self.latent_dim,
                "hidden": list(self.hidden), "loss": self.loss_name, "name": self.name}

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, x, training=False):
        return self.decoder(self.encoder(x, training=training), training=training)

    def anomaly_score(self, x):
        x = ops.convert_to_tensor(x, "float32")
        x_hat = self(x, training=False)
        return _per_image_mean(ops.square(x - x_hat)), x_hat

    def _loss(self, x, x_hat):
        if self.loss_name == "bce":
            return ops.mean(ops.binary_crossentropy(x, x_hat))
        return ops.mean(ops.square(x - x_hat))

    def train_step(self, data):
        x = _images(data)
        with tf.GradientTape() as tape:
            loss = self._loss(x, self(x, training=True))
        grads = [scale_loss(g) for g in tape.gradient(loss, self.trainable_variables)]
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        x = _images(data)
        self.loss_tracker.update_state(self._loss(x, self(x, training=False)))
        return {"loss": self.loss_tracker.result()}
