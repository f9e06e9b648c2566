"""Does DANN close the domain gap? Offline digit pairs, kerastl defaults.

For each pair (source -> target) and seed, the same small CNN is trained
with the same number of steps three ways and scored on held-out target test
images:

* source only: source labels only (``kerastl.DANN`` with
  ``domain_weight=0``, fed source images in both halves of each batch);
* DANN: source labels + unlabelled target images, kerastl's defaults
  (``kerastl.DANN`` + ``GaninLambda`` + ``GaninLearningRate`` with SGD
  momentum 0.9, as in the paper; no target labels are used for anything,
  tuning included);
* target only (the oracle): target labels, ``domain_weight=0``.

Prints a table with the accuracies and the fraction of the
source-only -> target-only gap that DANN closes, mean and spread over seeds.

    python benchmarks/domain_adaptation.py [--seeds 2] [--steps 1500]
        [--pairs syn_digits:digits digits:digits_m]
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


def sgd():
    return keras.optimizers.SGD(0.01, momentum=0.9)


def train(labelled, unlabelled, steps, test, domain_weight):
    """One network for all three runs: kerastl.DANN with its defaults.

    ``domain_weight=0`` trains the same network, on the same kind of batches,
    with the label loss only: source only (unlabelled = source images) and
    target only (labelled = target).
    """
    model = kerastl.DANN(features(), 10, domain_weight=domain_weight)
    model.compile(sgd(), metrics=["accuracy"])
    data = kerastl.domain_dataset(labelled, unlabelled, batch_size=BATCH)
    epochs = max(1, round(steps * BATCH / len(labelled[0])))
    history = model.fit(data, epochs=epochs, verbose=0,
                        callbacks=[kerastl.GaninLambda(),
                                   kerastl.GaninLearningRate()])
    accuracy = model.evaluate(*test, verbose=0, return_dict=True)["accuracy"]
    return accuracy, history.history["domain_accuracy"][-1]


def run_pair(src_name, tgt_name, seed, steps):
    keras.utils.set_random_seed(seed)
    source = load(src_name, "train", seed)
    target = load(tgt_name, "train", seed)
    test = load(tgt_name, "test", seed)
    row = {}
    keras.utils.set_random_seed(seed)
    row["source_only"], _ = train(source, source[0], steps, test, 0.0)
    keras.utils.set_random_seed(seed)
    row["dann"], row["domain_acc"] = train(source, target[0], steps, test,
                                           1.0)
    keras.utils.set_random_seed(seed)
    row["target_only"], _ = train(target, target[0], steps, test, 0.0)
    gap = row["target_only"] - row["source_only"]
    row["closed"] = (row["dann"] - row["source_only"]) / gap if gap > 0 \
        else float("nan")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--pairs", nargs="+",
                        default=["syn_digits:digits", "digits:digits_m"])
    args = parser.parse_args()
    start = time.time()
    header = (f"{'pair':<24}{'seed':>5}{'source only':>13}{'DANN':>8}"
              f"{'target only':>13}{'gap closed':>12}{'domain acc':>12}")
    print(header)
    print("-" * len(header))
    summary = {}
    for pair in args.pairs:
        src, tgt = pair.split(":")
        rows = []
        for seed in range(args.seeds):
            r = run_pair(src, tgt, seed, args.steps)
            rows.append(r)
            print(f"{src + ' -> ' + tgt:<24}{seed:>5}{r['source_only']:>13.3f}"
                  f"{r['dann']:>8.3f}{r['target_only']:>13.3f}"
                  f"{r['closed']:>12.1%}{r['domain_acc']:>12.3f}", flush=True)
        summary[pair] = rows
    print("\nmean +- std over seeds")
    for pair, rows in summary.items():
        def ms(key):
            v = np.array([r[key] for r in rows])
            return f"{v.mean():.3f} +- {v.std():.3f}"
        print(f"{pair:<24} source only {ms('source_only')}, DANN {ms('dann')}, "
              f"target only {ms('target_only')}, gap closed {ms('closed')}")
    print(f"\n{time.time() - start:.0f} s in all")
    return summary


if __name__ == "__main__":
    main()
