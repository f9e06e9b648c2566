"""``GradientReversal``: identity forward, ``-lambda x`` gradient backward.

The layer between a feature extractor and a domain classifier that makes
training adversarial (Ganin & Lempitsky, 2015): minimising the domain loss
through it pushes the features towards making the domains
indistinguishable. Backend-agnostic (``keras.ops.custom_gradient``).
"""

import math
import numbers

import keras
from keras import ops

from kerastl.errors import KerastlError


@keras.saving.register_keras_serializable(package="kerastl")
class GradientReversal(keras.layers.Layer):
    """Identity in the forward pass; multiplies the gradient by ``-lambda_``.

    ``lambda_`` is a non-trainable variable: changing it during training
    (``layer.lambda_.assign(v)``, or the :class:`GaninLambda` callback) takes
    effect at the next step without retracing the compiled step. The
    gradient has the dtype of the input (float16 under ``mixed_float16``).
    Built on ``keras.ops.custom_gradient``; tested on the TensorFlow and JAX
    backends, eager and compiled (``jit_compile=True`` included).

    Args:
        lambda_: the initial reversal strength (``>= 0``).

    Example::

        features = backbone(images)
        domain = keras.layers.Dense(1, activation="sigmoid")(
            kerastl.GradientReversal(1.0)(features))
    """

    def __init__(self, lambda_=1.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(lambda_, bool) or not isinstance(lambda_,
                                                       numbers.Real):
            raise KerastlError(
                f"GradientReversal(lambda_={lambda_!r}): expected a finite "
                f"number >= 0.")
        lambda_ = float(lambda_)
        if not math.isfinite(lambda_) or lambda_ < 0:
            raise KerastlError(
                f"GradientReversal(lambda_={lambda_}): expected a finite "
                f"number >= 0.")
        self.initial_lambda = lambda_
        self.supports_masking = True
        self.lambda_ = self.add_weight(
            shape=(), dtype="float32", name="lambda", trainable=False,
            initializer=keras.initializers.Constant(lambda_))

    def call(self, inputs):
        return _reverse_gradient(inputs, ops.convert_to_tensor(self.lambda_))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["lambda_"] = self.initial_lambda
        return config


@ops.custom_gradient
def _reverse_gradient(x, lambda_):
    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        scale = ops.cast(ops.negative(lambda_), upstream.dtype)
        return ops.multiply(upstream, scale), ops.zeros_like(lambda_)

    return ops.copy(x), grad
