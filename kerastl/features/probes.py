"""``LinearProbe``: a linear classifier on fixed features."""

import math
import numbers

import keras
import numpy as np

from kerastl import heads
from kerastl.errors import KerastlError
from kerastl.features.extract import check_finite, flat_features


# What each numeric parameter of a LinearProbe takes: (integer?, lowest,
# lowest allowed?).
_CHECKS = {"l2": (False, 0, True), "C": (False, 0, False),
           "epochs": (True, 1, True), "batch_size": (True, 1, True),
           "learning_rate": (False, 0, False)}


def _check_params(**params):
    for name, value in params.items():
        integer, low, inclusive = _CHECKS[name]
        kinds = numbers.Integral if integer else numbers.Real
        ok = isinstance(value, kinds) and not isinstance(value, bool) and \
            math.isfinite(value) and (value >= low if inclusive
                                      else value > low)
        if not ok:
            raise KerastlError(
                f"LinearProbe({name}={value!r}): expected "
                f"{'a whole number' if integer else 'a finite number'} "
                f"{'>=' if inclusive else '>'} {low}.")


class LinearProbe:
    """A linear classifier on fixed features (off-the-shelf transfer).

    ``kind="softmax"``: a standardising ``Normalization`` layer and one
    softmax ``Dense`` layer with L2 weight decay, trained with Keras (Adam)
    on the features: multinomial logistic regression. ``kind="svm"``: a
    standardised linear SVM from scikit-learn (``pip install
    kerastl[data]``), as in Razavian et al. (2014).

    Labels can be any values (ints, strings); :attr:`classes_` holds them.

    Args:
        kind: ``"softmax"`` or ``"svm"``.
        l2: L2 penalty on the softmax weights.
        C: the SVM's inverse regularisation strength.
        epochs, batch_size, learning_rate: softmax training.
        verbose: Keras ``fit`` verbosity.

    Example::

        probe = kerastl.LinearProbe().fit(train_features, train_labels)
        probe.score(test_features, test_labels)
    """

    KINDS = ("softmax", "svm")

    def __init__(self, kind="softmax", l2=1e-4, C=1.0, epochs=100,
                 batch_size=128, learning_rate=1e-2, verbose=0):
        if kind not in self.KINDS:
            raise KerastlError(f"kind={kind!r}: expected 'softmax' or 'svm'.")
        _check_params(l2=l2, C=C, epochs=epochs, batch_size=batch_size,
                      learning_rate=learning_rate)
        # Stored as given: the scikit-learn estimator contract
        # (``sklearn.base.clone`` checks that get_params returns them).
        self.kind = kind
        self.l2 = l2
        self.C = C
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.verbose = verbose
        self.model = None
        self.classes_ = None
        self.history = None

    _PARAMS = ("kind", "l2", "C", "epochs", "batch_size", "learning_rate",
               "verbose")

    def get_params(self, deep=True):
        """The constructor arguments (scikit-learn estimator contract)."""
        return {p: getattr(self, p) for p in self._PARAMS}

    def set_params(self, **params):
        """Sets constructor arguments; returns ``self`` (as scikit-learn)."""
        unknown = sorted(set(params) - set(self._PARAMS))
        if unknown:
            raise KerastlError(f"LinearProbe has no parameter "
                               f"{', '.join(unknown)}; parameters are "
                               f"{', '.join(self._PARAMS)}.")
        if params.get("kind", self.kind) not in self.KINDS:
            raise KerastlError(f"kind={params['kind']!r}: expected 'softmax' "
                               "or 'svm'.")
        _check_params(**{k: v for k, v in params.items()
                         if k in _CHECKS})
        for p, v in params.items():
            setattr(self, p, v)
        return self

    def __repr__(self):
        return f"LinearProbe(kind={self.kind!r}, l2={self.l2}, C={self.C})"

    def build_model(self, dim, num_classes, mean=None, variance=None):
        """The softmax probe as a ``keras.Model`` on ``dim`` features."""
        inputs = keras.Input((dim,), name="features")
        norm = keras.layers.Normalization(mean=mean, variance=variance,
                                          name="standardize")
        outputs = heads.output_layer(
            num_classes, "softmax", "probe",
            kernel_regularizer=keras.regularizers.L2(float(self.l2)))(norm(inputs))
        return keras.Model(inputs, outputs, name="linear_probe")

    @staticmethod
    def _labels(y, what="y"):
        """``y`` as one label per row: ``(n, 1)`` flattened (CIFAR's
        shape), one-hot rows as their class index."""
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        elif y.ndim == 2 and y.shape[1] > 1 and len(y) and \
                np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all():
            y = y.argmax(axis=1)  # one-hot
        if y.ndim != 1:
            raise KerastlError(
                f"LinearProbe: {what} has shape {y.shape}; expected one label "
                "per feature row (or one-hot rows).")
        return y

    def _encode(self, y):
        # classes_ comes from np.unique: sorted, so a binary search encodes.
        y = np.asarray(y)
        codes = np.minimum(np.searchsorted(self.classes_, y),
                           len(self.classes_) - 1)
        unseen = self.classes_[codes] != y
        if unseen.any():
            raise KerastlError(f"Label {y[unseen][0]!r} was not seen in fit "
                               f"(classes: {self.classes_.tolist()}).")
        return codes.astype("int64")

    def fit(self, x, y, validation_data=None):
        """Trains on features ``x`` (array or dict) and labels ``y``."""
        x = flat_features(x)
        check_finite(x, "LinearProbe.fit: the features")
        y = self._labels(y)
        if len(x) != len(y):
            raise KerastlError(f"{len(x)} feature rows but {len(y)} labels.")
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise KerastlError("A probe needs at least two classes in y.")
        yi = self._encode(y)
        if self.kind == "svm":
            self.model = _svm(float(self.C))
            self.model.fit(x, yi)
            return self
        mean = x.mean(axis=0)
        variance = x.var(axis=0) + 1e-6
        self.model = self.build_model(x.shape[1], len(self.classes_),
                                      mean, variance)
        self.model.compile(keras.optimizers.Adam(float(self.learning_rate)),
                           "sparse_categorical_crossentropy",
                           metrics=["accuracy"])
        val = None
        if validation_data is not None:
            vx, vy = validation_data
            vx = flat_features(vx)
            check_finite(vx, "LinearProbe.fit: the validation features")
            vy = self._labels(vy, "the validation labels")
            if len(vx) != len(vy) or vx.shape[1:] != x.shape[1:]:
                raise KerastlError(
                    f"LinearProbe.fit: validation_data has {len(vx)} feature "
                    f"rows of {vx.shape[1:]} and {len(vy)} labels; expected "
                    f"as many labels as rows, of the training features' "
                    f"{x.shape[1:]}.")
            val = (vx, self._encode(vy))
        self.history = self.model.fit(
            x, yi, batch_size=int(self.batch_size), epochs=int(self.epochs),
            validation_data=val, verbose=self.verbose)
        return self

    def _check_fitted(self):
        if self.model is None:
            raise KerastlError("The probe is not fitted yet: call fit().")

    def decision_function(self, x):
        """Class scores: probabilities (softmax) or margins (SVM)."""
        self._check_fitted()
        x = flat_features(x)
        check_finite(x, "LinearProbe: the features")
        if self.kind == "svm":
            scores = self.model.decision_function(x)
            if scores.ndim == 1:  # binary
                scores = np.stack([-scores, scores], axis=1)
            return scores
        return self.model.predict(x, batch_size=1024, verbose=0)

    def predict_proba(self, x):
        """Class probabilities (softmax probes only)."""
        if self.kind != "softmax":
            raise KerastlError("predict_proba needs kind='softmax'; an SVM "
                               "gives margins: decision_function().")
        return self.decision_function(x)

    def predict(self, x):
        """Predicted labels (values of :attr:`classes_`)."""
        return self.classes_[np.argmax(self.decision_function(x), axis=1)]

    def score(self, x, y):
        """Accuracy on ``(x, y)``."""
        y = self._labels(y)
        predicted = self.predict(x)
        if len(predicted) != len(y):
            raise KerastlError(f"{len(predicted)} feature rows but {len(y)} "
                               "labels.")
        return float(np.mean(predicted == y))


def _svm(C):
    try:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC
    except ImportError:
        raise KerastlError(
            "LinearProbe(kind='svm') needs scikit-learn: pip install "
            "'kerastl[data]' (or scikit-learn), or use kind='softmax'.") \
            from None
    return make_pipeline(StandardScaler(), LinearSVC(C=C, max_iter=5000))


def softmax_probe(x, y, x_test, classes, epochs=60, batch_size=128,
                   learning_rate=1e-2, l2=1e-4, seed=0, initial=None):
    """``LinearProbe(epochs=60)``'s softmax probe (standardised features,
    one softmax layer, Glorot-uniform start, L2 on the weights, Adam at
    1e-2 with Keras's defaults, 60 epochs of shuffled batches of 128; an
    output for every class, also one missing from a fold), in NumPy: the same model without a Keras model to build
    and trace per fold, so a cross-validated probe of many candidates
    takes seconds, not minutes. Returns the predicted classes of
    ``x_test``. ``initial``: ``(kernel, bias)`` to start from."""
    rng = np.random.default_rng(seed)
    mean, std = x.mean(0), np.sqrt(x.var(0) + 1e-6)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    n, d = x.shape
    limit = np.sqrt(6.0 / (d + classes))
    params = [rng.uniform(-limit, limit, (d, classes)), np.zeros(classes)]
    if initial is not None:
        params = [np.array(p, "float64") for p in initial]
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in params]
    onehot = np.eye(classes)[y]
    step = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            logits = x[idx] @ params[0] + params[1]
            logits -= logits.max(1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(1, keepdims=True)
            delta = (p - onehot[idx]) / len(idx)
            grads = [x[idx].T @ delta + 2 * l2 * params[0], delta.sum(0)]
            step += 1
            for param, grad, (m, v) in zip(params, grads, moments):
                m += 0.1 * (grad - m)
                v += 0.001 * (grad * grad - v)
                rate = learning_rate * np.sqrt(1 - 0.999 ** step) / (
                    1 - 0.9 ** step)
                param -= rate * m / (np.sqrt(v) + 1e-7)
    return np.argmax(x_test @ params[0] + params[1], axis=1)
