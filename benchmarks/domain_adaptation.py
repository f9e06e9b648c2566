"""Does DANN close the domain gap? Offline digit pairs, kerastl defaults.

For each pair (source -> target) and seed, the same small CNN is trained
with the same number of steps, optimizer and learning-rate schedule three
ways and scored on held-out target test images:

* source only: source labels only (the label path of ``kerastl.DANN``,
  ``dann.classifier``, fitted on source batches of the same size);
* DANN: source labels + unlabelled target images, kerastl's recipe (the
  README's): ``kerastl.DANN`` with its defaults (per-domain batch
  statistics, the target information-maximisation loss at weight 0.5),
  Adam 1e-3, ``GaninLambda(warmup=0.5)`` (the label head learns the source
  before the reversal and the target loss ramp up), then
  ``kerastl.adapt_batch_norm`` on the unlabelled target (AdaBN). No target
  labels are used for anything, tuning included. The table shows the
  accuracy before (``DANN``) and after (``+AdaBN``) the BatchNorm
  re-estimation;
* target only (the oracle): the label path fitted on target labels.

Prints a table with the accuracies and the fraction of the
source-only -> target-only gap that DANN closes, mean and spread over seeds.

    python benchmarks/domain_adaptation.py [--seeds 2] [--first-seed 0]
        [--steps 1500]
        [--pairs syn_digits:digits digits:digits_m]
        [--optimizer adam|sgd] [--warmup 0.5] [--entropy-weight W]
        [--no-split-batchnorm]

``--optimizer sgd --warmup 0 --entropy-weight 0 --no-split-batchnorm``
runs the paper's DANN instead (SGD 0.01, momentum 0.9,
``GaninLearningRate`` annealing, no warm-up, one batch through BN, no
target loss); the optimizer and its schedule apply to all three runs alike.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerastl  # noqa: E402
from kerastl import datasets  # noqa: E402

BATCH = 32


def features(width=16):
    """The shared feature extractor: three conv blocks."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    for filters in (width, 2 * width, 4 * width):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inputs, x, name="features")


def load(name, split, seed):
    if name == "syn_digits":
        return datasets.syn_digits(8000 if split == "train" else 2000,
                                   split=split, seed=seed)
    return datasets.load(name, split)


def optimizer_and_schedule(name):
    """Adam 1e-3 (kerastl's recipe) or the paper's SGD + annealing."""
    if name == "adam":
        return keras.optimizers.Adam(1e-3), []
    return (keras.optimizers.SGD(0.01, momentum=0.9),
            [kerastl.GaninLearningRate()])


def epochs_for(steps, labelled):
    return max(1, round(steps * BATCH / len(labelled[0])))


def train_label_path(labelled, steps, test, args):
    """Source only or target only: the label path of the same network
    (``dann.classifier``, the same layers) fitted on ``labelled``."""
    net = kerastl.DANN(features(), 10).classifier
    optimizer, callbacks = optimizer_and_schedule(args.optimizer)
    net.compile(optimizer, loss="sparse_categorical_crossentropy",
                metrics=["accuracy"])
    net.fit(*labelled, batch_size=BATCH, epochs=epochs_for(steps, labelled),
            verbose=0, callbacks=callbacks)
    return net.evaluate(*test, verbose=0, return_dict=True)["accuracy"]


def train_dann(source, target_images, steps, test, args):
    """kerastl's recipe. Returns (accuracy, accuracy after AdaBN, final
    domain accuracy)."""
    # kerastl's defaults unless the command line says otherwise.
    options = {"split_batchnorm": False} if args.paper_batchnorm else {}
    if args.entropy_weight is not None:
        options["entropy_weight"] = args.entropy_weight
    model = kerastl.DANN(features(), 10, **options)
    optimizer, callbacks = optimizer_and_schedule(args.optimizer)
    model.compile(optimizer, metrics=["accuracy"])
    data = kerastl.domain_dataset(source, target_images, batch_size=BATCH)
    callbacks.append(kerastl.GaninLambda(warmup=args.warmup))
    history = model.fit(data, epochs=epochs_for(steps, source), verbose=0,
                        callbacks=callbacks)
    accuracy = model.evaluate(*test, verbose=0, return_dict=True)["accuracy"]
    kerastl.adapt_batch_norm(model, target_images)
    adabn = model.evaluate(*test, verbose=0, return_dict=True)["accuracy"]
    return accuracy, adabn, history.history["domain_accuracy"][-1]


def closed(row, key):
    gap = row["target_only"] - row["source_only"]
    return (row[key] - row["source_only"]) / gap if gap > 0 else float("nan")


def run_pair(src_name, tgt_name, seed, args):
    keras.utils.set_random_seed(seed)
    source = load(src_name, "train", seed)
    target = load(tgt_name, "train", seed)
    test = load(tgt_name, "test", seed)
    row = {}
    keras.utils.set_random_seed(seed)
    row["source_only"] = train_label_path(source, args.steps, test, args)
    keras.utils.set_random_seed(seed)
    row["dann"], row["adabn"], row["domain_acc"] = train_dann(
        source, target[0], args.steps, test, args)
    keras.utils.set_random_seed(seed)
    row["target_only"] = train_label_path(target, args.steps, test, args)
    row["closed"] = closed(row, "dann")
    row["closed_adabn"] = closed(row, "adabn")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--pairs", nargs="+",
                        default=["syn_digits:digits", "digits:digits_m"])
    parser.add_argument("--optimizer", choices=["adam", "sgd"],
                        default="adam")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--entropy-weight", type=float, default=None,
                        help="default: kerastl.DANN's")
    parser.add_argument("--no-split-batchnorm", dest="paper_batchnorm",
                        action="store_true",
                        help="one batch of both domains through BN")
    args = parser.parse_args(argv)
    start = time.time()
    print(f"optimizer {args.optimizer}, GaninLambda(warmup={args.warmup}), "
          f"DANN(entropy_weight="
          f"{'default' if args.entropy_weight is None else args.entropy_weight}"
          f", split_batchnorm={not args.paper_batchnorm}), "
          f"{args.steps} steps of {BATCH} per domain")
    header = (f"{'pair':<24}{'seed':>5}{'source only':>13}{'DANN':>8}"
              f"{'+AdaBN':>8}{'target only':>13}{'gap closed':>12}"
              f"{'(+AdaBN)':>10}{'domain acc':>12}")
    print(header)
    print("-" * len(header))
    summary = {}
    for pair in args.pairs:
        src, tgt = pair.split(":")
        rows = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            r = run_pair(src, tgt, seed, args)
            rows.append(r)
            print(f"{src + ' -> ' + tgt:<24}{seed:>5}{r['source_only']:>13.3f}"
                  f"{r['dann']:>8.3f}{r['adabn']:>8.3f}"
                  f"{r['target_only']:>13.3f}{r['closed']:>12.1%}"
                  f"{r['closed_adabn']:>10.1%}{r['domain_acc']:>12.3f}",
                  flush=True)
        summary[pair] = rows
    print("\nmean +- std over seeds")
    for pair, rows in summary.items():
        def ms(key):
            v = np.array([r[key] for r in rows])
            return f"{v.mean():.3f} +- {v.std():.3f}"
        print(f"{pair:<24} source only {ms('source_only')}, DANN {ms('dann')}"
              f" (+AdaBN {ms('adabn')}), target only {ms('target_only')}, "
              f"gap closed {ms('closed')} (+AdaBN {ms('closed_adabn')})")
    print(f"\n{time.time() - start:.0f} s in all")
    return summary


if __name__ == "__main__":
    main()
