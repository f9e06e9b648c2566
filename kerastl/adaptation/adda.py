"""``ADDA``: adversarial discriminative domain adaptation inside ``model.fit``.

ADDA (Tzeng et al., 2017) adapts in two stages. First a source encoder and a
classifier are trained on the source labels (any ordinary Keras training).
Then a *separate* target encoder, initialised from the source encoder, is
trained so that a discriminator cannot tell its target features from the
fixed source encoder's source features (the GAN loss with inverted labels);
the source classifier is reused unchanged on the target encoder's features.
"""

import keras
from keras import ops

from kerastl import _keras_private as _private
from kerastl import distribute as _distribute
from kerastl import heads
from kerastl.adaptation.dann import feature_layer, feature_width
from kerastl.errors import KerastlError


@keras.saving.register_keras_serializable(package="kerastl")
class ADDA(keras.Model):
    """Adversarial discriminative domain adaptation (stage 2) in ``fit``.

    Give it the two halves of a classifier already trained on the source
    labels (stage 1): ``encoder``, images to ``(batch, features)`` (or a
    spatial map, average-pooled), and ``head``, features to class
    probabilities. ADDA keeps a frozen copy of the encoder for the source
    images, trains a second copy (the *target encoder*, starting from the
    same weights) on the target images, and a discriminator (an MLP) on
    both. Each step, on batches ``({"source": xs, "target": xt}, ys)`` from
    :func:`domain_dataset` (the source labels are not used):

    * the discriminator minimises the binary cross-entropy of "source" (0)
      on source features and "target" (1) on target features, with the
      encoders held fixed;
    * the target encoder minimises the cross-entropy of "source" on its
      target features, with the discriminator held fixed (the inverted
      label GAN loss of the paper).

    Logs ``domain_loss`` (the discriminator's), ``mapping_loss`` (the
    target encoder's) and ``domain_accuracy`` (0.5: the discriminator is
    fooled). ``predict``, ``evaluate`` and :attr:`classifier` run the
    target encoder then the (frozen) head: the adapted model.

    The paper trains with Adam(2e-4, beta_1=0.5) for the target encoder
    and the discriminator alike; one optimizer serves both here::

        source = keras.Sequential([encoder, head])       # stage 1
        source.compile("adam", "sparse_categorical_crossentropy")
        source.fit(xs, ys, epochs=10)
        adda = kerastl.adaptation.ADDA(encoder, head)                # stage 2
        adda.compile(keras.optimizers.Adam(2e-4, beta_1=0.5),
                     metrics=["accuracy"])
        adda.fit(kerastl.adaptation.domain_dataset((xs, ys), xt), epochs=10)
        adda.classifier.export("exported/")

    Args:
        encoder: the stage-1 source encoder (a ``keras.Model``): frozen
            (``trainable = False``) as ADDA's fixed source encoder; the
            target encoder is a clone of it.
        head: the stage-1 classifier on the encoder's features (a
            ``keras.Model`` or layer); reused frozen (``trainable =
            False``). To train either on its own again, set its
            ``trainable`` back first.
        discriminator_hidden: widths of the discriminator's hidden layers
            (paper: 500, 500).
    """

    def __init__(self, encoder, head, discriminator_hidden=(500, 500),
                 **kwargs):
        super().__init__(**kwargs)
        encoder = feature_layer(encoder, "ADDA", "encoder")
        head = feature_layer(head, "ADDA", "head")
        if not isinstance(encoder, keras.Model) or not encoder.inputs:
            raise KerastlError(
                "ADDA's encoder must be a functional or built Sequential "
                "keras.Model (it is cloned for the target).")
        self.discriminator_hidden = tuple(int(u)
                                          for u in discriminator_hidden)
        # The fixed source encoder, and the target encoder: a clone with
        # the same weights, the only part that learns besides the
        # discriminator.
        self.source_encoder = encoder
        self.target_encoder = keras.models.clone_model(encoder)
        # A name that follows the encoder's, so .keras files load back (the
        # weights are stored under the sublayers' names).
        self.target_encoder.name = f"{encoder.name}_target"
        self.target_encoder.set_weights(encoder.get_weights())
        self.target_encoder.trainable = True
        self.source_encoder.trainable = False
        self.head = head
        self.head.trainable = False
        self.pool = heads.pooling_layer("avg", "pool")
        self.discriminator_layers = heads.mlp(self.discriminator_hidden,
                                              "discriminator_hidden", False)
        self.discriminator = heads.output_layer(1, "sigmoid", "domain")
        self.domain_loss_tracker = keras.metrics.Mean(name="domain_loss")
        self.mapping_loss_tracker = keras.metrics.Mean(name="mapping_loss")
        self.domain_accuracy = keras.metrics.Mean(name="domain_accuracy")
        d = heads.build_mlp(self.discriminator_layers,
                            feature_width(encoder, "ADDA", "encoder"))
        self.discriminator.build((None, d))
        self.built = True

    def build(self, input_shape=None):
        self.built = True

    def build_from_config(self, config):
        self.built = True

    def kerastl_block_parts(self):
        """The block map: the target encoder's blocks (the part that
        adapts), then ``source_head`` (the frozen classifier),
        ``source_encoder`` (frozen, one block) and ``discriminator``."""
        return [self.target_encoder,
                ("source_head", [self.head], True),
                ("source_encoder", [self.source_encoder], True),
                ("discriminator", [self.pool] + self.discriminator_layers
                 + [self.discriminator], True)]

    # -- forward ----------------------------------------------------------

    def _features(self, encoder, x, training=False):
        f = encoder(x, training=training)
        return self.pool(f) if len(f.shape) == 4 else f

    def _discriminate(self, f, training=False):
        for layer in self.discriminator_layers:
            f = layer(f, training=training)
        return self.discriminator(f)

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict):  # the adapted classifier
            return self.head(self._features(self.target_encoder, inputs,
                                            training), training=False)
        f_s = ops.stop_gradient(self._features(
            self.source_encoder, inputs["source"], False))
        f_t = self._features(self.target_encoder, inputs["target"],
                             training)
        both = ops.concatenate([f_s, ops.stop_gradient(f_t)], axis=0)
        return {"domain": self._discriminate(both, training),
                "mapping": heads.apply_frozen(
                    self.discriminator_layers + [self.discriminator], f_t,
                    training)}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        if not isinstance(y_pred, dict):  # evaluate: the adapted classifier
            if _private.compiled_loss(self) is not None:
                return super().compute_loss(x, y, y_pred, sample_weight,
                                            training=training)
            return _distribute.scale_loss(ops.mean(
                keras.losses.sparse_categorical_crossentropy(y, y_pred)))
        n_s = ops.shape(x["source"])[0]
        domain = y_pred["domain"]
        truth = ops.concatenate([
            ops.zeros((n_s, 1)), ops.ones((ops.shape(domain)[0] - n_s, 1))],
            axis=0)
        domain_loss = ops.mean(keras.losses.binary_crossentropy(truth,
                                                                domain))
        # The target encoder's GAN loss: its features called "source".
        mapping = y_pred["mapping"]
        mapping_loss = ops.mean(keras.losses.binary_crossentropy(
            ops.zeros_like(mapping), mapping))
        self.domain_loss_tracker.update_state(domain_loss)
        self.mapping_loss_tracker.update_state(mapping_loss)
        self.domain_accuracy.update_state(ops.mean(ops.cast(ops.equal(
            ops.cast(domain > 0.5, "float32"), truth), "float32")))
        return _distribute.scale_loss(domain_loss + mapping_loss)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, dict):
            # No target labels in training: the compiled metrics (e.g.
            # accuracy) are for evaluate on labelled target data.
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_metrics_result(self):
        # Compiled metrics are first updated by evaluate; until then they
        # are left out of fit's logs.
        results = {}
        for metric in self.metrics:
            if not getattr(metric, "built", True):
                continue
            result = metric.result()
            if isinstance(result, dict):
                results.update(result)
            else:
                results[metric.name] = result
        return results

    # -- inference and export -------------------------------------------------

    @property
    def classifier(self):
        """The adapted classifier as a functional ``keras.Model`` (shares
        weights): the target encoder, then the source head."""
        inputs = keras.Input(self.target_encoder.input_shape[1:],
                             name="image")
        outputs = self.head(self._features(self.target_encoder, inputs),
                            training=False)
        return keras.Model(inputs, outputs, name=f"{self.name}_classifier")

    def get_config(self):
        return {
            "name": self.name,
            "encoder": keras.saving.serialize_keras_object(
                self.source_encoder),
            "head": keras.saving.serialize_keras_object(self.head),
            "discriminator_hidden": list(self.discriminator_hidden),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("encoder", "head"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects)
        return cls(**config)
