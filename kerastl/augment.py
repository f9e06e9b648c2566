"""Training-time augmentation from Keras's own layers, as named policies.

``fine_tune(augment=...)``, the experiment key ``augment`` and ``kerastl
finetune --augment`` take a policy name (:data:`kerastl.spec.AUGMENT_POLICIES`,
optionally with ``+flip``) or a Keras layer of the user's own (a
``keras.layers.Pipeline`` of augmentation layers, say). The augmentation runs
on the training batches, before the model, in both phases; validation data
and the model itself are never augmented, so what is saved and exported
(``kerastl.export``) contains no augmentation layer.

The policies never flip by default: a mirrored digit or letter is another
symbol (or none). Add ``+flip`` for photographs whose left and right mean
the same (``"light+flip"``). Rotations stay small for the same reason (a
6 turned half a turn is a 9): Keras's ``RandAugment`` at its default
strength rotates by up to half a turn, so the strong policy is written from
Keras's layers at bounded strengths instead of taking it as it is.

* ``none``: no augmentation.
* ``light``: shift by up to 10% of the height and width, zoom by up to
  10%, rotate by up to 11 degrees.
* ``strong``: shift and zoom by up to 15%, rotate by up to 18 degrees,
  brightness and contrast by up to 30%, and ``RandomErasing`` of a patch
  in about a quarter of the images.

Images follow kerastl's input contract (RGB, values in [0, 255]).

:class:`RandAugment` is Keras's ``RandAugment`` computing only the
operations it draws (the same images, faster); AdaMatch's strong view uses
it.
"""

import numpy as np
import keras

from kerastl.errors import KerastlError
from kerastl.spec import AUGMENT_POLICIES

_VALUE_RANGE = (0, 255)


def check(augment):
    """Raises unless ``augment`` is None, a policy name or a Keras layer;
    returns ``(policy, extra)`` of a name (``("light", "flip")``)."""
    if augment is None or isinstance(augment, keras.layers.Layer):
        return None
    if not isinstance(augment, str):
        raise KerastlError(
            f"augment={augment!r}: expected a policy name "
            f"({', '.join(AUGMENT_POLICIES)}) or a Keras layer.")
    name, _, extra = augment.partition("+")
    if name not in AUGMENT_POLICIES or extra not in ("", "flip"):
        raise KerastlError(
            f"augment={augment!r}: expected one of "
            f"{', '.join(AUGMENT_POLICIES)} (optionally with '+flip', for "
            f"photos whose left and right mean the same), or a Keras layer "
            f"of your own (keras.layers.Pipeline([...])).")
    return name, extra


def _layers(policy, seed):
    """The Keras layers of a named policy."""
    name, extra = check(policy)
    L = keras.layers
    layers = []
    if extra == "flip":
        layers.append(L.RandomFlip("horizontal", seed=seed))
    if name == "light":
        layers += [L.RandomTranslation(0.1, 0.1, seed=seed),
                   L.RandomZoom(0.1, seed=seed),
                   L.RandomRotation(0.03, seed=seed)]
    elif name == "strong":
        layers += [L.RandomTranslation(0.15, 0.15, seed=seed),
                   L.RandomZoom(0.15, seed=seed),
                   L.RandomRotation(0.05, seed=seed),
                   L.RandomBrightness(0.3, value_range=_VALUE_RANGE,
                                      seed=seed),
                   L.RandomContrast(0.3, value_range=_VALUE_RANGE,
                                    seed=seed),
                   # (a probability drawn in [0, 0.5] per image: 0.25 on
                   # average, timm's default)
                   L.RandomErasing(0.5, value_range=_VALUE_RANGE,
                                   seed=seed)]
    return layers


def augmentation(augment, seed=None):
    """The augmentation ``augment`` names, as one Keras layer, or None.

    Args:
        augment: ``None``/``"none"``, a policy name (``"light"``,
            ``"strong"``, either with ``"+flip"``) or a Keras layer (used
            as given: called with ``training=True`` on each batch).
        seed: the layers' seed (Keras ``SeedGenerator``): the same
            sequence of augmented batches in every run with that seed.

    Raises:
        KerastlError: an unknown policy name, or something that is neither
            a name nor a Keras layer.
    """
    if augment is None or isinstance(augment, keras.layers.Layer):
        return augment
    layers = _layers(augment, seed)
    if not layers:
        return None
    return keras.layers.Pipeline(layers, name=f"augment_{augment}")


@keras.saving.register_keras_serializable(package="kerastl")
class RandAugment(keras.layers.RandAugment):
    """:class:`keras.layers.RandAugment` that computes only the operations it
    draws: the same arguments, random draws and outputs, bit for bit.

    Keras's layer (3.15) runs every one of its 14 operations on the batch
    for each of its ``num_ops`` slots and keeps the drawn one's result with
    ``where``, so one call costs 28 operations at the default ``num_ops=2``.
    This subclass dispatches with TensorFlow's ``switch_case`` instead (one
    branch runs), on the TensorFlow backend and in ``tf.data`` pipelines;
    the random transformations are drawn exactly as Keras draws them, so a
    seeded layer gives the same images as Keras's. About 5 times faster on
    CPU (``benchmarks/adamatch_step.py``). On the JAX and torch backends it
    is Keras's layer as it is.
    :func:`kerastl.adaptation.strong_augmentation` uses it.
    """

    def transform_images(self, images, transformation, training=True):
        if not training or self.backend.name != "tensorflow":
            # (JAX compiles each branch of a switch as it does the where,
            # and XLA need not round the two alike: Keras's own code)
            return super().transform_images(images, transformation,
                                            training)
        images = self.backend.cast(images, self.compute_dtype)
        transforms = transformation["transforms"]
        # (the drawn operation alone; Keras keeps the result of the same
        # layer with where, so the values are those of its result)
        branches = [self._branch(name, value)
                    for name, value in transforms.items()]
        for i in range(self.num_ops):
            images = self.backend.core.switch(
                transformation["layer_idxes"][i], branches, images)
        return images

    def _branch(self, name, value):
        layer = getattr(self, name)

        def apply(images):
            return self.backend.cast(layer.transform_images(images, value),
                                     self.compute_dtype)
        return apply


def augment_batch(layer, images):
    """``images`` (one batch, NumPy or tensor) through ``layer`` in training
    mode, as a NumPy array of float32."""
    out = layer(keras.ops.convert_to_tensor(np.asarray(images, "float32")),
                training=True)
    return keras.ops.convert_to_numpy(out)


class EpochAugment:
    """:func:`augment_batch` with ``layer``, whose random state is drawn
    from ``(seed, epoch)`` at each epoch's start (:meth:`reseed`, which
    :class:`kerastl.batch_order.SeededBatches` calls): a run resumed at
    epoch ``e`` augments its batches as the uninterrupted run did, without
    the layer's state in the backup."""

    def __init__(self, layer, seed):
        self.layer, self.seed = layer, int(seed)
        # (Keras's SeedGenerator states: the only variables a random
        # augmentation layer holds)
        self.states = [v for v in layer.variables
                       if v.path.endswith("seed_generator_state")]

    def reseed(self, epoch):
        for i, state in enumerate(self.states):
            state.assign(np.random.default_rng(
                [self.seed, int(epoch), i]).integers(
                0, 2 ** 31, size=tuple(state.shape)).astype(state.dtype))

    def __call__(self, images):
        return augment_batch(self.layer, images)


def augment_dataset(dataset, layer):
    """A ``tf.data.Dataset`` of ``(images, labels[, weights])`` batches with
    ``layer`` applied to the images (in the pipeline, before the model)."""
    import tensorflow as tf

    def apply(x, *rest):
        return (layer(tf.cast(x, "float32"), training=True),) + rest

    return dataset.map(apply, num_parallel_calls=tf.data.AUTOTUNE)
