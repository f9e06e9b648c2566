"""Off-the-shelf features: extraction, an on-disk cache, linear probes.

* :mod:`kerastl.features.extract` — :func:`extract_features` (one batched,
  prefetched ``predict`` pass over arrays, a ``tf.data.Dataset`` or an image
  folder) and :func:`feature_model`, the model it runs.
* :mod:`kerastl.features.cache` — :class:`FeatureCache`: computed once,
  read back while the model, the layers and the data are the same.
* :mod:`kerastl.features.probes` — :class:`LinearProbe`: a softmax (Keras)
  or linear-SVM (scikit-learn) classifier on fixed features.
"""

from kerastl.features.cache import FeatureCache, model_fingerprint
from kerastl.features.extract import (extract_features, feature_model,
                                      flat_features)
from kerastl.features.probes import LinearProbe

__all__ = ["FeatureCache", "LinearProbe", "extract_features",
           "feature_model", "flat_features", "model_fingerprint"]
