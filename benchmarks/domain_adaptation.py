"""Domain adaptation against strong baselines, absolute accuracy first.

Offline digit pairs (source -> target; ``kerastl.datasets``), every run the
same number of steps (batches of 32 per domain) and optimizer (Adam 1e-3
unless a method's paper says otherwise), scored on held-out target test
images. 20% of the source training images are held out as labelled source
validation data (for model selection); every method trains on the rest.

Baselines (no target data at all, or only its BatchNorm statistics):

* ``source only (paper net)``: the DANN paper's MNIST network (conv 32 5x5,
  max-pool, conv 48 5x5, max-pool, FC 100, FC 100, softmax; ReLU, no
  BatchNorm, inputs in [0, 1]) on the source labels. It has no BatchNorm,
  so AdaBN changes nothing for it.
* ``source only``: kerastl's recommended network on the source labels (the
  label path of ``kerastl.DANN``: the paper's conv layers as the feature
  extractor, kerastl's bottleneck Dense 256 + BN + ReLU, softmax);
  ``+ AdaBN``: the same with ``kerastl.adaptation.adapt_batch_norm`` on the target.
* ``source only, inverted copies`` (+ AdaBN): the recommended network on
  the source labels with every source image also given inverted
  (``255 - x``, :func:`inverted_copies`): the augmentation a user adds on
  seeing that many target digits are darker than their background.
* ``--all`` adds ``source only, pretrained backbone`` (+ AdaBN): the
  pretrained kerastl backbone below, trained on the source labels the way
  its DANN row is (first block frozen, 0.1x the rate on the rest).

The best baseline is the best of the source-only rows, seed by seed.

Adaptation (source labels + unlabelled target images):

* ``DANN``: ``kerastl.DANN`` with its defaults on that network,
  ``GaninLambda(warmup=0.5)``; ``+ AdaBN`` after it. ``DANN, inverted
  copies`` (+ AdaBN): the same on the augmented source, kerastl's
  recommended recipe.
* ``--all`` adds: DANN with ``alignment="mmd"`` (DAN) and
  ``"confusion"`` (Tzeng et al. 2015), ADDA (stage 1 is the source-only
  model above; Adam 2e-4, beta_1 0.5), DANN started from the weights of
  that source-only model (+ AdaBN), DANN on the pretrained kerastl
  backbone (``kerastl.pretrained``'s CNN pretrained on 4,000 syn_digits:
  its first block frozen, 0.1x the rate on its other blocks through
  ``LayerwiseOptimizer``), MMD and confusion on the augmented source, and,
  if ``adapt`` (ADAPT) is installed, ADAPT's DANN with the same network,
  data and steps (on the plain and on the augmented source).
* ``--new`` adds: ``CDAN`` (``alignment="cdan"``, CDAN+E), ``DANN +
  MCC`` (``mcc_weight=1``), ``MCC, no alignment`` (the source labels and
  minimum class confusion on the target) and ``TENT``
  (``kerastl.adaptation.tent`` on the source-only model, after its AdaBN
  step); they join the label-free selection's pool.
* ``--adamatch`` adds ``AdaMatch`` (``kerastl.adaptation.AdaMatch`` on
  the same conv layers with the same bottleneck, its defaults: weak and
  strong views, ``tau=0.9``, the target loss ramped over the first half of
  the steps) and ``+ AdaBN`` after it; they join the selection's pool.
  It runs through ``kerastl.adapt``, the default recipe (``+ AdaBN`` is
  what ``kerastl.adapt`` returns; the AdaBN step is done apart so that
  the model before it is a candidate too), with the zoom that its
  label-free check, ``kerastl.adaptation.scale_shift`` on the recommended
  network trained on the source labels for 600 steps, gives
  (:func:`scale_check`).
* ``--peers`` adds the peers, neither in the selection's pool: ``ADAPT
  DANN`` (as under ``--all``) and the keras.io AdaMatch example's recipe
  (:class:`KerasIoAdaMatch`) on the same network, data and steps, at the
  peak rates of ``--keras-io-rates`` (default 1e-3, the rate of every
  other row; its own 0.03 left this network at 0.13 on digits ->
  digits_m after 300 steps, against 0.71 at 1e-3).
* ``target only``: the oracle, the recommended network on target labels.

Label-free selection among every source-only and adapted model of the run
(ADAPT's and the oracle excluded): ``kerastl.adaptation.ensemble_validation`` (EnsV,
``select_model``'s default without source data; the unlabelled target
images only),
``kerastl.adaptation.deep_embedded_validation`` (DEV; also the held-out source
validation data) and ``kerastl.adaptation.average_thresholded_confidence``
(ATC, ``select_model``'s default given source data; the held-out source
validation data calibrates each candidate's confidence). The table shows the candidate each picked and its
accuracy next to the best candidate's. Every candidate's MixVal probes
(``kerastl.adaptation.mix_validation``) and EnsV agreement go into the
``--json`` file for selection studies; ``--dump`` saves their features and
predictions too.

``--markdown A.json B.json ...`` prints the default recipe's per-pair table
from the ``--json`` files of several runs (one seed per process, say). A run
with ``--peers-only`` trains only the peers, for runs made without
``--peers``; ``--markdown`` adds its rows to the run of the same pair and
seed. A run with ``--recipe-only`` trains only the default recipe, for
runs made with an earlier one; ``--markdown`` puts its rows in place of
the earlier recipe's (shown beside them) and counts no selection method
but "the recipe itself" on those runs (the others scored the earlier
pool). ``--markdown ... --first-seed S --seeds N`` keeps seeds S to
S + N - 1.

``--scale-check`` runs only a label-free check of a change of scale
between the domains (:func:`scale_check`: a source-only model's confidence
on the target images zoomed in and out), and says whether it finds what
the domains' digit heights say.

``--select-from-dump FOLDER [FOLDER ...]`` scores the label-free selection
methods again on the pools that ``--dump`` saved, with a later folder's
candidates in place of an earlier one's: a ``--recipe-only --dump`` run's
recipe in the pool of a run made with an earlier recipe, without training
the rest of the pool again.

    python benchmarks/domain_adaptation.py [--seeds 3] [--first-seed 0]
        [--steps 1500] [--pairs syn_digits:digits digits:digits_m] [--all]
        [--new] [--adamatch] [--peers | --peers-only]
        [--keras-io-rates 0.001 ...]
        [--json FILE] [--dump FOLDER]
    python benchmarks/domain_adaptation.py --recipe-only --pairs ...
        [--first-seed S] [--seeds N] --json FILE [--dump FOLDER]
    python benchmarks/domain_adaptation.py --scale-check --pairs ...
        [--first-seed S] [--seeds 3] [--json FILE]
    python benchmarks/domain_adaptation.py --select-from-dump FOLDER ...
        [--json FILE]
    python benchmarks/domain_adaptation.py --markdown FILE [FILE ...]
        [--first-seed S --seeds N]
    python benchmarks/domain_adaptation.py --atc-from-dump FOLDER --json FILE
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerastl  # noqa: E402
from kerastl import datasets  # noqa: E402

BATCH = 32


# -- networks -------------------------------------------------------------------------

def paper_features(name="features"):
    """The DANN paper's MNIST feature extractor (conv part), flattened."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(32, 5, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(48, 5, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, x, name=name)


def paper_network():
    """The DANN paper's whole MNIST classifier: no BatchNorm anywhere."""
    features = paper_features()
    x = keras.layers.Dense(100, activation="relu")(features.output)
    x = keras.layers.Dense(100, activation="relu")(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(features.input, outputs, name="paper_network")


def recommended(**options):
    """kerastl's recommended network: DANN's defaults on the paper's conv
    layers (``domain_weight=0`` makes it a source-only model)."""
    return kerastl.DANN(paper_features(), 10, **options)


# -- data -------------------------------------------------------------------------------

def load(name, split, seed):
    if name in ("syn_digits", "photo_digits"):  # rendered: any size
        return datasets.load(name, split, n=8000 if split == "train" else 2000,
                             seed=seed)
    return datasets.load(name, split)


def hold_out(data, seed, fraction=0.2):
    """(train, validation): a seeded split of labelled data."""
    x, y = data
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(fraction * len(x)))
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def inverted_copies(data):
    """Source augmentation: every image plus its inverse (255 - x), same
    label. digits_m draws each digit as ``|photo - digit|``, so about 40% of
    its digits are darker than their background; the source's are all
    lighter. Looking at unlabelled target images shows that; no label is
    needed to decide to augment for it."""
    x, y = data
    return np.concatenate([x, 255.0 - x]), np.concatenate([y, y])


def epochs_for(steps, n):
    return max(1, round(steps * BATCH / n))


# -- training ---------------------------------------------------------------------------

def fit_labels(model, data, steps, learning_rate=1e-3):
    """Plain supervised training on ``data`` (source or target labels)."""
    model.compile(keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    start = time.time()
    model.fit(*data, batch_size=BATCH, epochs=epochs_for(steps, len(data[0])),
              verbose=0)
    return time.time() - start


def fit_domains(model, source, target_images, steps, optimizer=None,
                ramp=True):
    """``fit`` on ``domain_dataset`` batches; returns (seconds per epoch,
    history)."""
    model.compile(optimizer or keras.optimizers.Adam(1e-3),
                  metrics=["accuracy"])
    epochs = epochs_for(steps, len(source[0]))
    callbacks = [kerastl.adaptation.GaninLambda(warmup=0.5)] if ramp else []
    start = time.time()
    history = model.fit(kerastl.adaptation.domain_dataset(source, target_images,
                                               batch_size=BATCH),
                        epochs=epochs, verbose=0, callbacks=callbacks)
    return (time.time() - start) / epochs, history.history


def accuracy(model, test):
    probs = model.predict(test[0], verbose=0, batch_size=256)
    return float(np.mean(np.argmax(probs, axis=-1) == test[1]))


def pretrained_dann(**options):
    """DANN on the pretrained kerastl backbone: first block frozen, 0.1x the
    rate on the rest of the backbone (through the block map)."""
    from kerastl.pretrained import pretrained_backbone
    backbone, _, _ = pretrained_backbone()
    model = kerastl.DANN(backbone, 10, **options)
    kerastl.freeze(model, up_to="block1", recompile=False)
    optimizer = kerastl.LayerwiseOptimizer(
        keras.optimizers.Adam(1e-3), {"block2": 0.1, "block3": 0.1},
        model=model)
    return model, optimizer


def adapt_peer(source, target_images, test, steps):
    """ADAPT's DANN on the same network, data and steps. Returns (accuracy,
    seconds per epoch), or None if ``adapt`` is not installed."""
    try:
        from adapt.feature_based import DANN as AdaptDANN
        from adapt.utils import UpdateLambda
        import tensorflow as tf
    except ImportError:
        return None
    net = recommended()  # the same layers as kerastl's DANN
    encoder = keras.Sequential([net.feature_extractor] + [
        layer for layer in net.bottleneck_layers])
    task = keras.Sequential([keras.layers.Dense(10, activation="softmax")])
    disc = keras.Sequential(
        [layer for width in (1024, 1024) for layer in (
            keras.layers.Dense(width), keras.layers.BatchNormalization(),
            keras.layers.ReLU())]
        + [keras.layers.Dense(1, activation="sigmoid")])
    epochs = epochs_for(steps, len(source[0]))
    # UpdateLambda ramps a variable lambda with Ganin's schedule.
    model = AdaptDANN(encoder, task, disc, lambda_=tf.Variable(0.0),
                      verbose=0,
                      copy=False, random_state=0,
                      optimizer=keras.optimizers.Adam(1e-3),
                      loss="categorical_crossentropy")
    onehot = np.eye(10, dtype="float32")[source[1]]
    start = time.time()
    model.fit(source[0], onehot, Xt=target_images, epochs=epochs,
              batch_size=BATCH, verbose=0,
              callbacks=[UpdateLambda(lambda_max=1.0)])
    seconds = (time.time() - start) / epochs
    return accuracy(model, test), seconds


class KerasIoAdaMatch(keras.Model):
    """The keras.io AdaMatch example's trainer (Sayak Paul, 2021,
    ``examples/vision/adamatch.py``) on our network and data: its
    augmentations (weak: a horizontal flip, the example's random crop being
    to the image's own size), three target images per source image, the
    source loss on both views (summed), its "distribution alignment" (the
    ratio of the two batches' mean probabilities taken over all classes at
    once, which is 1/C over 1/C: no alignment, as in the example) followed
    by an l2 normalisation into soft pseudo-labels, the relative threshold
    on the weak source views, the half-cosine ramp over the first half of
    training, and Adam with ``CosineDecay(0.03, steps, alpha=0.25)`` (see
    :func:`keras_io_peer`). ``network`` maps images to logits.

    Deviations, each forced or in the peer's favour: the strong view is
    Keras's ``RandAugment(num_ops=2, factor=0.5)``, the nearest Keras layer
    to the example's tf-models ``RandAugment(num_layers=2, magnitude=5)``
    but not the same (Keras rotates by up to 180 degrees one way and draws
    the two operations per batch; tf-models rotates by up to 15 degrees
    either way, per image, but shifts by up to 50 pixels and cuts out a
    40x40 square, made for 224-pixel images: on 32x32 images both are
    harsh); the source batch is 32 (every row of this benchmark) instead of
    64, the 3:1 ratio kept; and the ramp and the decay run over the steps
    actually trained, where the example's epochs end when its target data
    does (about 40% of its nominal steps, the ramp at 0.92 and the rate at
    0.73 of its peak at the end)."""

    def __init__(self, network, total_steps, tau=0.9, seed=0):
        super().__init__()
        self.network = network
        self.tau = tau
        self.total_steps = float(total_steps)
        self.weak = keras.layers.RandomFlip("horizontal", seed=seed)
        # (kerastl's RandAugment: Keras's images bit for bit, computing
        # only the drawn operations)
        self.strong = kerastl.augment.RandAugment(
            value_range=(0, 255), num_ops=2, factor=0.5, seed=seed + 1)
        self.generator = keras.random.SeedGenerator(seed + 2)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, x, training=False):
        return self.network(x, training=training)

    def train_step(self, data):
        import tensorflow as tf
        (xs, ys), xt = data
        source_w, source_s = self.weak(xs, training=True), \
            self.strong(xs, training=True)
        target_w, target_s = self.weak(xt, training=True), \
            self.strong(xt, training=True)
        n, m = tf.shape(xs)[0], tf.shape(xt)[0]
        onehot = tf.one_hot(ys, 10)
        with tf.GradientTape() as tape:
            both = self.network(tf.concat(
                [source_w, source_s, target_w, target_s], 0), training=True)
            source_only = self.network(tf.concat([source_w, source_s], 0),
                                       training=False)
            mix = keras.random.uniform((2 * n, 10), seed=self.generator)
            source = mix * both[:2 * n] + (1 - mix) * source_only
            p_source_w = tf.nn.softmax(source[:n])
            target = both[2 * n:]
            p_target_w = tf.nn.softmax(target[:m])
            ratio = tf.reduce_mean(p_source_w) / tf.reduce_mean(p_target_w)
            pseudo = tf.stop_gradient(tf.math.l2_normalize(
                p_target_w * ratio, 1))
            threshold = self.tau * tf.reduce_mean(
                tf.reduce_max(p_source_w, -1))
            mask = tf.cast(tf.reduce_max(pseudo, -1) >= threshold,
                           "float32")
            ce = keras.losses.categorical_crossentropy
            source_loss = tf.reduce_mean(ce(onehot, source[:n],
                                            from_logits=True)) + \
                tf.reduce_mean(ce(onehot, source[n:], from_logits=True))
            target_loss = tf.reduce_mean(
                ce(pseudo, target[m:], from_logits=True) * mask)
            step = tf.cast(self.optimizer.iterations, "float32")
            mu = 0.5 - tf.cos(tf.minimum(
                np.pi, 2 * np.pi * step / self.total_steps)) / 2
            loss = source_loss + mu * target_loss
        weights = self.network.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, weights),
                                           weights))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


def keras_io_peer(source, target_images, steps, seed=0, ratio=3,
                  learning_rate=0.03):
    """The keras.io AdaMatch recipe (:class:`KerasIoAdaMatch`) on kerastl's
    network for this benchmark (the paper's conv layers, Dense 256 + BN +
    ReLU, Dense 10 logits), ``steps`` steps of ``BATCH`` source and
    ``ratio * BATCH`` target images, Adam with ``CosineDecay(learning_rate,
    steps, alpha=0.25)``. Returns the trained logit network."""
    import tensorflow as tf
    features = paper_features()
    x = keras.layers.Dense(256)(features.output)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    network = keras.Model(features.input, keras.layers.Dense(10)(x))
    src = tf.data.Dataset.from_tensor_slices(
        (source[0].astype("float32"), source[1].astype("int32"))) \
        .shuffle(len(source[0]), seed=seed).repeat().batch(
            BATCH, drop_remainder=True)
    tgt = tf.data.Dataset.from_tensor_slices(
        target_images.astype("float32")).shuffle(
        len(target_images), seed=seed + 1).repeat().batch(
            ratio * BATCH, drop_remainder=True)
    epochs = epochs_for(steps, len(source[0]))
    steps = epochs * (steps // epochs)
    model = KerasIoAdaMatch(network, steps, seed=seed)
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
        learning_rate, steps, alpha=0.25)))
    model.fit(tf.data.Dataset.zip((src, tgt)).prefetch(2), epochs=epochs,
              steps_per_epoch=steps // epochs, verbose=0)
    return network


# -- one pair, one seed -------------------------------------------------------------

def run_pair(src_name, tgt_name, seed, args, log=print):
    """All rows for one pair and seed: ``{row: accuracy}`` plus the
    selection and timings."""
    keras.utils.set_random_seed(seed)
    source, source_val = hold_out(load(src_name, "train", seed), seed)
    target = load(tgt_name, "train", seed)
    test = load(tgt_name, "test", seed)
    xt = target[0]
    acc, seconds, candidates, target_probs = {}, {}, {}, {}
    probes = {}
    atc = {}  # ATC's predicted target accuracy

    def candidate(name, model):
        """Scores ``model`` now and keeps what the label-free selection
        needs (before any AdaBN that follows changes it)."""
        acc[name] = accuracy(model, test)
        if args.recipe_only and not args.dump:  # no pool to select from
            return
        target_probs[name] = model.predict(xt, verbose=0, batch_size=256)
        if args.recipe_only:  # (--select-from-dump scores it with a pool)
            dump(name, model)
            return
        candidates[name] = kerastl.adaptation.deep_embedded_validation(
            model, source_val, xt, seed=seed)
        e = kerastl.adaptation.mix_validation(model, xt[:2000], seed=seed)
        probes[name] = {"inter": e.inter, "intra": e.intra}
        atc[name] = kerastl.adaptation.average_thresholded_confidence(
            model.predict(source_val[0], verbose=0, batch_size=256),
            source_val[1], target_probs[name][:2000]).accuracy
        if args.dump:
            dump(name, model)

    def dump(name, model):
        """What a label-free selection method sees, for offline study."""
        from kerastl.adaptation.selection import feature_function
        embed = feature_function(model)
        xs_, xt_ = source_val[0], xt[:2000]
        os.makedirs(args.dump, exist_ok=True)
        np.savez_compressed(
            dump_path(args.dump, src_name, tgt_name, seed, name),
            fs=embed(xs_).astype("float16"), ft=embed(xt_).astype("float16"),
            ps=model.predict(xs_, verbose=0, batch_size=256),
            pt=target_probs[name][:2000],
            ys=source_val[1], acc=acc[name], name=name)

    def step(name, fn):
        keras.utils.set_random_seed(seed)
        start = time.time()
        fn()
        seconds[name] = time.time() - start
        score = acc.get(name, acc.get(name + " + AdaBN"))
        log(f"  {name}: " + ("" if score is None else f"{score:.3f} ")
            + f"({seconds[name]:.0f} s)")

    def source_only_paper():
        net = paper_network()
        fit_labels(net, source, args.steps)
        candidate("source only (paper net)", net)

    models = {}

    inverted = inverted_copies(source)

    def source_only(name="source only", data=source):
        def run():
            net = recommended(domain_weight=0)
            fit_labels(net.classifier, data, args.steps)
            candidate(name, net)
            if data is source:  # what ADDA and DANN from source only start at
                models["source only"] = net.classifier.get_weights()
                # ADDA's stage 1: this source model, copied before AdaBN
                # moves it.
                inputs = keras.Input((32, 32, 3))
                encoder = keras.Model(inputs, net.features(inputs),
                                      name="encoder")
                copy = keras.models.clone_model(encoder)
                copy.set_weights(encoder.get_weights())
                features = keras.Input((net.bottleneck,))
                models["ADDA stage 1"] = (copy, keras.Model(
                    features, net.labels(features), name="head"))
            kerastl.adaptation.adapt_batch_norm(net, xt)
            candidate(name + " + AdaBN", net)
        return run

    def adapted(name, adabn=True, data=source, **options):
        def run():
            net = recommended(**options)
            seconds[name + " /epoch"], _ = fit_domains(net, data, xt,
                                                       args.steps)
            candidate(name, net)
            if adabn:
                kerastl.adaptation.adapt_batch_norm(net, xt)
                candidate(name + " + AdaBN", net)
        return run

    def adda():
        encoder, head = models["ADDA stage 1"]
        model = kerastl.adaptation.ADDA(encoder, head)
        fit_domains(model, source, xt, args.steps,
                    optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
                    ramp=False)
        candidate("ADDA", model)

    def from_source():
        # Two stages: the source-only model's weights, then DANN.
        net = recommended()
        net.classifier.set_weights(models["source only"])
        seconds["DANN from source only /epoch"], _ = fit_domains(
            net, source, xt, args.steps)
        candidate("DANN from source only", net)
        kerastl.adaptation.adapt_batch_norm(net, xt)
        candidate("DANN from source only + AdaBN", net)

    def pretrained_source_only():
        model, optimizer = pretrained_dann(domain_weight=0)
        model.compile(optimizer, metrics=["accuracy"])
        model.fit(*source, batch_size=BATCH,
                  epochs=epochs_for(args.steps, len(source[0])), verbose=0)
        candidate("source only, pretrained backbone", model)
        kerastl.adaptation.adapt_batch_norm(model, xt)
        candidate("source only, pretrained backbone + AdaBN", model)

    def pretrained():
        model, optimizer = pretrained_dann()
        fit_domains(model, source, xt, args.steps, optimizer=optimizer)
        candidate("DANN, pretrained backbone", model)
        kerastl.adaptation.adapt_batch_norm(model, xt)
        candidate("DANN, pretrained backbone + AdaBN", model)

    def peer(name="ADAPT DANN", data=source):
        def run():
            result = adapt_peer(data, xt, test, args.steps)
            if result is None:
                log(f"  {name}: skipped (pip install adapt to compare)")
                return
            acc[name], seconds[name + " /epoch"] = result
        return run

    def keras_io(name, rate):
        def run():
            network = keras_io_peer(source, xt, args.steps, seed=seed,
                                    learning_rate=rate)
            acc[name] = accuracy(network, test)
        return run

    def target_only():
        net = recommended(domain_weight=0)
        fit_labels(net.classifier, target, args.steps)
        acc["target only"] = accuracy(net, test)

    def peers():
        if not args.all:
            step("ADAPT DANN", peer())
        for rate in args.keras_io_rates:
            name = "AdaMatch, keras.io recipe" + (
                "" if rate == 0.03 else f", Adam {rate:g}")
            step(name, keras_io(name, rate))

    scale = {}

    def check_scale():
        # The recipe's label-free check; its own step (seeded again before
        # the recipe's), not timed with the recipe.
        scale["shift"], scale["row"] = scale_check(src_name, tgt_name, seed,
                                                   log)

    def adamatch():
        # kerastl.adapt, the default recipe (its zoom from the scale
        # check), with its AdaBN step apart so that the model before it is
        # a candidate too.
        start = time.time()
        net = kerastl.adapt(paper_features(), source, xt, 10,
                            steps=args.steps, batch_size=BATCH, adabn=False,
                            zoom=scale["shift"].zoom, seed=seed, verbose=0)
        seconds["AdaMatch /epoch"] = (time.time() - start) / len(
            net.history.epoch)
        candidate("AdaMatch", net)
        kerastl.adaptation.adapt_batch_norm(net, xt)
        candidate("AdaMatch + AdaBN", net)

    if args.recipe_only:  # rows that --markdown puts in place of the run's
        step("scale check", check_scale)
        step("AdaMatch", adamatch)
        return {"acc": acc, "seconds": seconds, "recipe_only": True,
                "scale": scale["row"]}
    if args.peers_only:  # rows that --markdown adds to this pair and seed
        peers()
        return {"acc": acc, "seconds": seconds, "peers_only": True}
    step("source only (paper net)", source_only_paper)
    step("source only", source_only())
    step("DANN", adapted("DANN"))
    step("source only, inverted copies",
         source_only("source only, inverted copies", inverted))
    step("DANN, inverted copies", adapted("DANN, inverted copies",
                                          data=inverted))
    if args.all:
        step("MMD", adapted("MMD", alignment="mmd"))
        step("confusion", adapted("confusion", alignment="confusion"))
        step("ADDA", adda)
        step("DANN from source only", from_source)
        step("source only, pretrained backbone", pretrained_source_only)
        step("DANN, pretrained backbone", pretrained)
        step("MMD, inverted copies", adapted(
            "MMD, inverted copies", data=inverted, alignment="mmd"))
        step("confusion, inverted copies", adapted(
            "confusion, inverted copies", data=inverted,
            alignment="confusion"))
        step("ADAPT DANN", peer())
        step("ADAPT DANN, inverted copies", peer(
            "ADAPT DANN, inverted copies", inverted))
    def tent_after_adabn():
        # TENT on the source-only model (AdaBN is its first step).
        net = recommended(domain_weight=0)
        net.classifier.set_weights(models["source only"])
        kerastl.adaptation.tent(net.classifier, xt, seed=seed)
        candidate("TENT", net)

    if args.new:
        step("CDAN", adapted("CDAN", alignment="cdan"))
        step("DANN + MCC", adapted("DANN + MCC", mcc_weight=1.0))
        step("MCC, no alignment", adapted("MCC, no alignment",
                                          domain_weight=0, mcc_weight=1.0,
                                          entropy_weight=0))
        step("TENT", tent_after_adabn)
    if args.adamatch:
        step("scale check", check_scale)
        step("AdaMatch", adamatch)
    if args.peers:
        peers()
    step("target only", target_only)
    baselines = [k for k in acc if k.startswith("source only")]
    best_baseline = max(acc[b] for b in baselines)
    ensv = kerastl.adaptation.ensemble_validation(target_probs)
    chosen = max(ensv, key=lambda k: ensv[k].score)
    dev_chosen = min(candidates, key=lambda k: candidates[k].risk)
    best = max(candidates, key=lambda k: acc[k])
    extra = {"scale": scale["row"]} if scale else {}
    return {**extra, "acc": acc, "seconds": seconds,
            "best_baseline": best_baseline,
            "chosen": chosen, "dev_chosen": dev_chosen,
            "atc_chosen": max(atc, key=atc.get),
            "best_candidate": best,
            "ensv": {k: e.agreement for k, e in ensv.items()},
            "atc": atc, "mixval": probes,
            "dev": {k: {"risk": e.risk, "ess": e.ess, "n": e.n}
                    for k, e in candidates.items()}}


def dump_path(folder, src, tgt, seed, name):
    """Where ``--dump`` saves candidate ``name`` of one pair and seed."""
    return os.path.join(folder, f"{src}-{tgt}-{seed}-" + name.replace(
        " ", "_").replace(",", "").replace("+", "plus").replace(
        "(", "").replace(")", "") + ".npz")


def atc_from_dump(path, folder):
    """Adds ATC's scores and pick to the runs in the ``--json`` file
    ``path`` from their ``--dump`` files in ``folder`` (the source
    validation and first 2,000 target predictions a run made, scored as
    the run itself does): for runs made before the benchmark scored ATC."""
    with open(path) as f:
        summary = json.load(f)
    for pair, rows in summary.items():
        src, tgt = pair.split(":")
        for r in rows:
            if "atc" in r or r.get("peers_only") or r.get("recipe_only"):
                continue  # scored, or no pool of its own
            paths = {name: dump_path(folder, src, tgt, r["seed"], name)
                     for name in r["ensv"]}  # the selection's pool
            missing = [p for p in paths.values() if not os.path.isfile(p)]
            if missing:
                print(f"{pair}, seed {r['seed']}: no --dump file "
                      f"{missing[0]}; left without ATC")
                continue
            r["atc"] = {}
            for name, p in paths.items():
                d = np.load(p)
                r["atc"][name] = \
                    kerastl.adaptation.average_thresholded_confidence(
                        d["ps"], d["ys"], d["pt"]).accuracy
            r["atc_chosen"] = max(r["atc"], key=r["atc"].get)
    write_json(path, summary)
    return summary


# The source-only model that kerastl.adaptation.scale_shift reads (the
# recommended network): its training steps.
SCALE_CHECK_STEPS = 600
# How tall each domain draws its digits (kerastl.datasets): what the check
# should find.
DIGIT_HEIGHT = {"photo_digits": (0.4, 0.7)}
OTHER_HEIGHT = (0.6, 1.0)


def expected_scale(src_name, tgt_name):
    """What :func:`kerastl.adaptation.scale_shift`'s verdict should be,
    from the middle of the heights the two domains draw their digits at."""
    source, target = (sum(DIGIT_HEIGHT.get(n, OTHER_HEIGHT)) / 2
                      for n in (src_name, tgt_name))
    if abs(target - source) < 0.1:
        return "same"
    return "smaller" if target < source else "larger"


def scale_check(src_name, tgt_name, seed, log=print):
    """The label-free check of a change of scale that sets the recipe's
    zoom: :func:`kerastl.adaptation.scale_shift` on the recommended network
    trained on the source labels for :data:`SCALE_CHECK_STEPS` steps and
    the first 1,000 target training images (no target labels). Returns
    ``(shift, row)``: the :class:`~kerastl.adaptation.ScaleShift` and
    what a run keeps of it, with the verdict the domains' digit heights
    call for."""
    keras.utils.set_random_seed(seed)
    source, _ = hold_out(load(src_name, "train", seed), seed)
    xt = load(tgt_name, "train", seed)[0]
    net = recommended(domain_weight=0)
    fit_labels(net.classifier, source, SCALE_CHECK_STEPS)
    shift = kerastl.adaptation.scale_shift(net.classifier, xt)
    expected = expected_scale(src_name, tgt_name)
    log("  scale check: " + " ".join(
        f"{z:g}: {c:.3f}" for z, c in shift.confidence.items())
        + f"; the target draws them {shift.verdict} (the digit heights: "
        f"{expected}), zoom {shift.zoom}")
    return shift, {"confidence": {str(z): c for z, c in
                                  shift.confidence.items()},
                   "verdict": shift.verdict, "expected": expected,
                   "zoom": list(shift.zoom)}


def read_dumps(folders):
    """``{(pair, seed): {name: npz}}`` from ``--dump`` folders; a later
    folder's candidate replaces an earlier one of the same name, pair and
    seed (a ``--recipe-only --dump`` run's recipe in place of an earlier
    one)."""
    pools = {}
    for folder in folders:
        for file in sorted(os.listdir(folder)):
            parts = file.split("-", 3)
            if not file.endswith(".npz") or len(parts) != 4 or \
                    not parts[2].isdigit():
                continue
            d = np.load(os.path.join(folder, file))
            pools.setdefault((f"{parts[0]}:{parts[1]}", int(parts[2])),
                             {})[str(d["name"])] = d
    return dict(sorted(pools.items()))


def select_from_dump(folders, log=print):
    """Each label-free selection method's pick on each pool in ``--dump``
    ``folders`` (:func:`read_dumps`), scored as a run scores it on the
    dumped predictions (the first 2,000 target images): EnsV, ATC (the
    paper's entropy score, and ATC-MC: the highest probability) and taking
    the recipe without choosing. Logs each pick's shortfall from the
    pool's best and, per method, on how many pools it is within 2 points;
    returns ``{"pair:seed": {"acc": ..., "scores": {method: {candidate:
    score}}, "picks": {method: candidate}, "shortfall": {method: points
    below the pool's best}}}``."""
    pools = read_dumps(folders)
    if not pools:
        raise SystemExit(f"No --dump files in {', '.join(folders)}.")
    results = {}
    for (pair, seed), pool in pools.items():
        acc = {k: float(d["acc"]) for k, d in pool.items()}
        ensv = kerastl.adaptation.ensemble_validation(
            {k: d["pt"] for k, d in pool.items()})
        scores = {"EnsV": {k: e.agreement for k, e in ensv.items()}}
        for method, score in (("ATC", "entropy"), ("ATC-MC", "confidence")):
            scores[method] = {
                k: kerastl.adaptation.average_thresholded_confidence(
                    d["ps"], d["ys"], d["pt"], score=score).accuracy
                for k, d in pool.items()}
        picks = {m: max(sorted(s), key=s.get) for m, s in scores.items()}
        if RECIPE in acc:
            picks["the recipe itself"] = RECIPE
        best = max(acc.values())
        below = {m: 100 * (best - acc[k]) for m, k in picks.items()}
        results[f"{pair}:{seed}"] = {"acc": acc, "scores": scores,
                                     "picks": picks, "shortfall": below}
        log(f"{pair}, seed {seed}: {len(pool)} candidates, best "
            f"{best:.3f}; " + "; ".join(
                f"{m} {k} ({below[m]:.1f})" for m, k in picks.items()))
    for method in dict.fromkeys(m for r in results.values()
                                for m in r["shortfall"]):
        points = [r["shortfall"][method] for r in results.values()
                  if method in r["shortfall"]]
        near = sum(p <= NEAR_BEST for p in points)
        log(f"{method}: within 2 points of the pool's best on {near} of "
            f"{len(points)} ({np.mean(points):.1f} points below on "
            "average)")
    return results


def closed(row, key):
    gap = row["acc"]["target only"] - row["best_baseline"]
    return (row["acc"][key] - row["best_baseline"]) / gap if gap > 0 else \
        float("nan")


def mean_se(values):
    v = np.asarray(values, "float64")
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{v.mean():.3f} +- {se:.3f}"


# "Within 2 points of the pool's best", float-safe.
NEAR_BEST = 2.0 + 1e-9


def shortfall(run, pick):
    """Points by which a label-free selection's ``pick`` falls below the
    best candidate of ``run``."""
    return 100 * (run["acc"][run["best_candidate"]] - run["acc"][pick])


def report(summary):
    """The tables: accuracy per row (mean +- standard error over seeds),
    the gain and gap closed against the best baseline, and the selection."""
    lines = []
    for pair, rows in summary.items():
        keys = list(rows[0]["acc"])
        lines.append(f"\n{pair}: target test accuracy, mean +- standard "
                     f"error over {len(rows)} seeds")
        lines.append(f"{'':<42}" + "".join(f"{'seed ' + str(r['seed']):>9}"
                                            for r in rows) + "    mean")
        for key in keys + ["best baseline"]:
            vals = [r["best_baseline"] if key == "best baseline"
                    else r["acc"][key] for r in rows]
            lines.append(f"{key:<42}" + "".join(f"{v:>9.3f}" for v in vals)
                         + f"    {mean_se(vals)}")
        lines.append("gain over the best baseline (points), gap closed "
                     "against it:")
        for key in keys:
            if key.startswith(("source only", "target only")):
                continue
            gains = [100 * (r["acc"][key] - r["best_baseline"]) for r in rows]
            gaps = [closed(r, key) for r in rows]
            lines.append(f"  {key:<40}" + "".join(f"{g:>+9.1f}" for g in gains)
                         + f"    {np.mean(gains):+.1f} points, "
                         f"{np.mean(gaps):.0%} of the gap")
        for method, key in (("EnsV", "chosen"),
                            ("ATC, select_model's default given source "
                             "data", "atc_chosen"), ("DEV", "dev_chosen")):
            if key not in rows[0]:
                continue
            lines.append(f"label-free selection ({method}) among the "
                         f"{len(rows[0]['dev'])} source-only and adapted rows: "
                         f"picked -> its accuracy (best -> its accuracy)")
            hits = 0
            for r in rows:
                a, pick, best = r["acc"], r[key], r["best_candidate"]
                below = shortfall(r, pick)
                hits += below <= NEAR_BEST
                lines.append(f"  seed {r['seed']}: {pick} -> {a[pick]:.3f} "
                             f"({best} -> {a[best]:.3f}), {below:.1f} "
                             f"points below the best")
            lines.append(f"  within 2 points of the best: {hits} of "
                         f"{len(rows)}")
        per_epoch = {k[:-len(" /epoch")]: np.mean([r["seconds"][k]
                                                   for r in rows])
                     for k in rows[0]["seconds"] if k.endswith(" /epoch")}
        if per_epoch:
            lines.append("seconds per epoch: " + ", ".join(
                f"{k} {v:.2f}" for k, v in per_epoch.items()))
    return "\n".join(lines)


RECIPE = "AdaMatch + AdaBN"  # kerastl.adapt
PEERS = ("ADAPT DANN", "AdaMatch, keras.io recipe, Adam 0.001",
         "AdaMatch, keras.io recipe")


def load_runs(paths, seeds=None):
    """``{pair: [run, ...]}`` from several ``--json`` files (seeds run in
    separate processes), each pair's runs in seed order; only the runs of
    ``seeds`` where given. ``--peers-only`` rows join the run of their pair
    and seed; ``--recipe-only`` rows replace its recipe rows (the run is
    then marked ``recipe_rerun``: its label-free selection scores were
    made with the earlier recipe in the pool)."""
    runs, extra = {}, []
    for path in paths:
        with open(path) as f:
            for pair, rows in json.load(f).items():
                for row in rows:
                    if seeds is not None and row["seed"] not in seeds:
                        continue
                    if row.get("peers_only") or row.get("recipe_only"):
                        extra.append((path, pair, row))
                    else:
                        runs.setdefault(pair, []).append(row)
    for path, pair, row in extra:
        flag = "--recipe-only" if row.get("recipe_only") else "--peers-only"
        run = [r for r in runs.get(pair, []) if r["seed"] == row["seed"]]
        if len(run) != 1:
            raise SystemExit(
                f"{path}: {flag} rows of {pair}, seed {row['seed']}, "
                f"need exactly one run of that pair and seed in the --json "
                f"files; found {len(run)}.")
        run = run[0]
        if row.get("recipe_only"):
            if RECIPE not in run["acc"]:
                raise SystemExit(
                    f"{path}: --recipe-only rows of {pair}, seed "
                    f"{row['seed']}: its run has no {RECIPE} row to replace "
                    "(run it with --adamatch).")
            if run.get("recipe_rerun"):
                raise SystemExit(
                    f"{path}: {pair}, seed {row['seed']}: a second "
                    "--recipe-only run; pass one.")
            run["recipe_rerun"] = True
            run["earlier_recipe"] = run["acc"][RECIPE]
            # (the pool: every candidate the selection scored)
            run["best_candidate"] = max(
                list(run.get("ensv", ())) + list(row["acc"]),
                key=lambda k: row["acc"].get(k, run["acc"].get(k)))
        else:
            clash = sorted(set(row["acc"]) & set(run["acc"]))
            if clash:
                raise SystemExit(
                    f"{path}: {pair}, seed {row['seed']}: its run already "
                    f"has {', '.join(clash)}; pass one file with each "
                    "peer's row.")
        run["acc"].update(row["acc"])
        run["seconds"].update(row["seconds"])
    earlier = sorted({pair for pair, rows in runs.items() for r in rows
                      if not r.get("recipe_rerun")})
    if earlier and any(r.get("recipe_only") for *_, r in extra):
        raise SystemExit(
            "The recipe was rerun with --recipe-only on some runs only (the "
            f"earlier recipe remains on seeds of {', '.join(earlier)}), so "
            "the table would mix two recipes: "
            "pick the seeds with --first-seed and --seeds, or rerun the "
            "rest.")
    return {pair: sorted(rows, key=lambda r: r["seed"])
            for pair, rows in runs.items()}


def markdown(paths, seeds=None):
    """The default recipe's table (docs and README) from ``--json`` files:
    per pair, means over the seeds that have each row (of ``seeds`` where
    given)."""
    runs = load_runs(paths, seeds)

    def mean(rows, key):
        values = [r["acc"][key] for r in rows if key in r["acc"]]
        return (float(np.mean(values)), len(values)) if values else (None, 0)

    def cell(value):
        return "" if value[0] is None else f"{value[0]:.3f}" + (
            "" if value[1] == n else f" ({value[1]})")

    lines = [
        "| pair | best baseline | best DANN row | ADAPT's DANN | keras.io "
        "AdaMatch, Adam 1e-3 | AdaMatch | **AdaMatch + AdaBN "
        "(`kerastl.adapt`)** | target only | gap closed | lowest gain "
        "over the seeds (points) | time vs source only |",
        "|---|" + "---:|" * 10]
    # (load_runs: every run rerun with --recipe-only, or none)
    rerun = any(r.get("recipe_rerun") for rows in runs.values()
                for r in rows)
    if rerun:  # the recipe's rows come from --recipe-only runs
        lines[0] = lines[0].replace(
            " | target only |", " | earlier recipe, same seeds | target "
            "only |")
        lines[1] += "---:|"
    closed_big, worse, below = [], [], []
    short = ["| pair | best baseline | `kerastl.adapt` | target only | gap "
             "closed | better peer |", "|---|" + "---:|" * 5]
    for pair, rows in runs.items():
        n = len(rows)
        base = float(np.mean([r["best_baseline"] for r in rows]))
        dann = max((mean(rows, k) for k in rows[0]["acc"]
                    if k.startswith("DANN")), key=lambda v: v[0])
        recipe = mean(rows, RECIPE)
        oracle = mean(rows, "target only")[0]
        gap = oracle - base
        share = (recipe[0] - base) / gap if gap > 0 else float("nan")
        gains = [100 * (r["acc"][RECIPE] - r["best_baseline"]) for r in rows]
        ratio = np.mean([r["seconds"]["AdaMatch"] / r["seconds"]["source only"]
                         for r in rows])
        if gap > 0.10:
            closed_big.append(share)
            if min(gains) <= 0:
                below.append(f"{pair} ({sum(g <= 0 for g in gains)} of "
                             f"{len(gains)}, at worst {min(gains):+.1f} "
                             "points)")
        for peer in PEERS[:2]:
            value = mean(rows, peer)
            if value[0] is not None and value[0] > recipe[0]:
                worse.append(f"{pair}: {peer} {value[0]:.3f} against "
                             f"{recipe[0]:.3f}")
        src, tgt = pair.split(":")
        peer = max((mean(rows, p) for p in PEERS[:2]),
                   key=lambda v: -1 if v[0] is None else v[0])
        short.append(
            f"| {src} -> {tgt} | {base:.3f} | **{recipe[0]:.3f}** | "
            f"{oracle:.3f} | "
            + (f"{share:.0%}" if gap > 0.10 else "(gap under 1 point)"
               if gap < 0.01 else f"(gap {100 * gap:.0f} points)")
            + f" | {'' if peer[0] is None else f'{peer[0]:.3f}'} |")
        lines.append(
            f"| {src} -> {tgt} | {base:.3f} | {cell(dann)} | "
            f"{cell(mean(rows, PEERS[0]))} | {cell(mean(rows, PEERS[1]))} | "
            f"{cell(mean(rows, 'AdaMatch'))} | **{cell(recipe)}** | "
            + (f"{np.mean([r['earlier_recipe'] for r in rows]):.3f} | "
               if rerun else "")
            + f"{oracle:.3f} | "
            + (f"{share:.0%}" if gap > 0.10 else f"(gap {100 * gap:.1f} "
               f"points)")
            + f" | {min(gains):+.1f} | {ratio:.1f}x |")
    lines.append("")
    seed_sets = {}
    for rows in runs.values():
        key = ", ".join(str(r["seed"]) for r in rows)
        seed_sets[key] = seed_sets.get(key, 0) + 1
    lines.append("Seeds: " + "; ".join(
        f"{key} on {count} pair{'s' if count > 1 else ''}"
        for key, count in seed_sets.items())
        + " (a number in brackets: how many seeds have that row). "
                 f"Mean gap closed over the {len(closed_big)} pairs whose gap "
                 f"exceeds 10 points: {np.mean(closed_big):.1%}.")
    lines.append("Seeds where the recipe is not above the best baseline, "
                 "on pairs whose gap exceeds 10 points: "
                 + ("; ".join(below) if below else "none") + ".")
    if worse:
        lines.append("Peers ahead of the recipe: " + "; ".join(worse) + ".")
    def picks(r):
        if r.get("recipe_rerun"):  # scored on a pool with another recipe
            return {"EnsV": None, "ATC": None, "MixVal": None,
                    "the recipe itself": RECIPE}
        return {"EnsV": r["chosen"], "ATC": r.get("atc_chosen"),
                "MixVal": max(r["mixval"], key=lambda k:
                              r["mixval"][k]["inter"])
                if r.get("mixval") else None,
                # The strongest simple rule: no selection, the recipe.
                "the recipe itself": RECIPE if RECIPE in r["acc"] else None}

    every = [(r, picks(r)) for rows in runs.values() for r in rows]
    for label, chosen in (("all", every),
                          ("with ATC", [(r, p) for r, p in every
                                        if "atc" in r
                                        and not r.get("recipe_rerun")])):
        counts = []
        for method in ("EnsV", "ATC", "MixVal", "the recipe itself"):
            gaps = [shortfall(r, p[method]) for r, p in chosen
                    if p[method] is not None]
            if gaps:
                counts.append(
                    f"{method} {sum(g <= NEAR_BEST for g in gaps)} of "
                    f"{len(gaps)} ({np.mean(gaps):.1f} points below on "
                    f"average)")
        if chosen and counts:
            lines.append(f"Within 2 points of the pool's best, {label} "
                         f"runs: " + "; ".join(counts) + ".")
    lines += ["", "The README's table:", ""] + short
    print("\n".join(lines))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None,
                        help="how many seeds (default 3; with --markdown: "
                             "every seed in the files)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--pairs", nargs="+",
                        default=["syn_digits:digits", "digits:digits_m"])
    parser.add_argument("--all", action="store_true",
                        help="add MMD, confusion, ADDA, the pretrained "
                             "backbone and ADAPT's DANN")
    parser.add_argument("--new", action="store_true",
                        help="add CDAN+E, DANN + MCC, MCC without "
                             "alignment and TENT (issue #39's first "
                             "methods)")
    parser.add_argument("--adamatch", action="store_true",
                        help="add kerastl.adaptation.AdaMatch (+ AdaBN)")
    peers = parser.add_mutually_exclusive_group()
    peers.add_argument("--peers", action="store_true",
                       help="add the peers: ADAPT's DANN and the keras.io "
                            "AdaMatch recipe, on the same network, data "
                            "and steps")
    peers.add_argument("--peers-only", action="store_true",
                       help="run only the peers, for runs made without "
                            "--peers: --markdown adds their rows to the "
                            "run of the same pair and seed")
    peers.add_argument("--recipe-only", action="store_true",
                       help="run only the default recipe (AdaMatch, "
                            "+ AdaBN), for runs made with an earlier "
                            "recipe: --markdown puts its rows in place of "
                            "theirs in the run of the same pair and seed")
    parser.add_argument("--keras-io-rates", nargs="+", type=float,
                        default=[1e-3], metavar="RATE",
                        help="peak Adam rates of the keras.io AdaMatch "
                             "peer (its own is 0.03, which trains this "
                             "network poorly; default 1e-3, the rate "
                             "every other row uses)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--dump", help="a folder: save each candidate's "
                        "features and predictions for selection studies")
    parser.add_argument("--atc-from-dump", metavar="FOLDER",
                        help="add ATC's selection to the runs in --json "
                             "FILE from their --dump FOLDER, and exit")
    parser.add_argument("--scale-check", action="store_true",
                        help="only the recipe's label-free check of a "
                             "change of scale (a source-only model's "
                             "confidence on the target images zoomed in "
                             "and out), against the domains' digit "
                             "heights")
    parser.add_argument("--select-from-dump", nargs="+", metavar="FOLDER",
                        help="score the label-free selection methods on "
                             "the pools in these --dump folders (a later "
                             "folder's candidate replaces an earlier one "
                             "of the same name, pair and seed); --json "
                             "FILE: also write the scores and picks")
    parser.add_argument("--markdown", nargs="+", metavar="JSON",
                        help="print the default recipe's table from these "
                             "--json files and exit")
    args = parser.parse_args(argv)
    seeds_given = args.seeds
    args.seeds = 3 if seeds_given is None else seeds_given
    if args.seeds < 1 or args.first_seed < 0:
        parser.error("--seeds takes a number >= 1 and --first-seed >= 0")
    for flag, what in (("peers_only", "the peers"),
                       ("recipe_only", "the recipe")):
        if getattr(args, flag) and (args.adamatch or args.new or args.all
                                    or args.dump and flag == "peers_only"):
            parser.error(f"--{flag.replace('_', '-')} runs only {what}: "
                         "drop --adamatch, --new, --all"
                         + (" and --dump" if flag == "peers_only" else ""))
    if args.scale_check:
        summary = {}
        for pair in args.pairs:
            src, tgt = pair.split(":")
            summary[pair] = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                print(f"{src} -> {tgt}, seed {seed}", flush=True)
                summary[pair].append({"seed": seed, **scale_check(
                    src, tgt, seed, lambda m: print(m, flush=True))[1]})
        runs = [r for rows in summary.values() for r in rows]
        print(f"the check says what the domains' digit heights say on "
              f"{sum(r['verdict'] == r['expected'] for r in runs)} of "
              f"{len(runs)} runs")
        if args.json:
            write_json(args.json, summary)
        return summary
    if args.select_from_dump:
        results = select_from_dump(args.select_from_dump)
        if args.json:
            write_json(args.json, results)
        return results
    if args.atc_from_dump:
        if not args.json:
            parser.error("--atc-from-dump needs --json FILE (the runs to "
                         "score)")
        return atc_from_dump(args.json, args.atc_from_dump)
    if args.markdown:
        picked = seeds_given is not None or args.first_seed > 0
        return markdown(args.markdown, range(
            args.first_seed, args.first_seed + (seeds_given or 10 ** 6))
            if picked else None)
    start = time.time()
    print(f"{args.steps} steps of {BATCH} per domain, Adam; "
          f"{'all methods' if args.all else 'default rows (--all for more)'}",
          flush=True)
    summary = {}
    for pair in args.pairs:
        src, tgt = pair.split(":")
        rows = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            print(f"{src} -> {tgt}, seed {seed}", flush=True)
            row = run_pair(src, tgt, seed, args,
                           log=lambda m: print(m, flush=True))
            row["seed"] = seed
            rows.append(row)
            summary[pair] = rows
            if args.json:  # after every run: a long run keeps what it did
                write_json(args.json, summary)
    if not (args.peers_only or args.recipe_only):
        print(report(summary))
    print(f"\n{time.time() - start:.0f} s in all")
    return summary


def write_json(path, summary):
    """Writes ``summary`` to ``path`` whole or not at all."""
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
