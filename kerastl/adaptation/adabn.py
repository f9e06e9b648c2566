"""AdaBN: re-estimate BatchNorm statistics on the target domain."""

import keras
import numpy as np

from kerastl import _keras_private as _private
from kerastl.adaptation.dann import DANN
from kerastl.errors import KerastlError
from kerastl.freezing import keras_model_of, temporarily_trainable


def adapt_batch_norm(model, target, batch_size=64):
    """AdaBN: re-estimates every BatchNorm's statistics on target data.

    Li et al. (2016): domain shift lives largely in the BN statistics; replace
    the source means and variances with the target's and nothing else
    changes. Runs the target data through the model once in training mode
    with a cumulative average (batch k enters with weight 1/k), so the
    moving statistics become the mean of the target batch statistics. No
    other weight moves; BN layers get back their ``trainable`` and
    ``momentum``.

    Args:
        model: a ``keras.Model`` (a :class:`DANN` adapts its label path:
            the feature extractor and the bottleneck).
        target: target images, an array or a ``tf.data.Dataset`` of images
            (or of ``(x, ...)`` tuples).
        batch_size: for arrays.

    Returns:
        The number of BatchNormalization layers adapted.
    """
    if isinstance(model, DANN):
        layers = (_private.all_sublayers(model.feature_extractor)
                  + model.bottleneck_layers)

        def forward(batch):
            model.features(batch, training=True)
    else:
        net = keras_model_of(model)
        layers = _private.all_sublayers(net)

        def forward(batch):
            net(batch, training=True)
    bns = [l for l in layers
           if isinstance(l, keras.layers.BatchNormalization)]
    if not bns:
        return 0
    momenta = [l.momentum for l in bns]
    if isinstance(target, np.ndarray):
        batches = [target[i:i + batch_size]
                   for i in range(0, len(target), batch_size)]
    else:
        batches = (b[0] if isinstance(b, tuple) else b for b in target)
    if isinstance(target, np.ndarray) and (target.ndim != 4 or
                                           not len(target)):
        raise KerastlError(
            f"adapt_batch_norm needs target images (n, height, width, "
            f"channels) with n >= 1; got shape {target.shape}.")
    seen = 0
    try:
        with temporarily_trainable(bns):
            for k, batch in enumerate(batches, start=1):
                for l in bns:
                    l.momentum = 0.0 if k == 1 else (k - 1) / k
                forward(batch)
                seen = k
    finally:
        for l, momentum in zip(bns, momenta):
            l.momentum = momentum
    if not seen:
        raise KerastlError("adapt_batch_norm got an empty target: no batch "
                           "to take statistics from; pass target images.")
    return len(bns)
