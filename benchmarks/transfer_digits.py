"""Does transfer beat training from scratch on a small target set? (offline)

Source task: digits rendered from fonts (``kerastl.datasets.syn_digits``).
Target task: scikit-learn's handwritten digits (``datasets.digits``) with K
labelled images per class and a new head. A small CNN is pretrained on the
source, then transferred with kerastl three ways (frozen backbone + new head;
full fine-tuning with BN frozen; the same after AdaBN on the K target images)
and compared with the same architecture trained from scratch on the same
images. Prints target test accuracy per variant, mean over seeds.

    python benchmarks/transfer_digits.py [--per-class 1 2 3 5] [--seeds 3]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerastl  # noqa: E402
from kerastl import datasets  # noqa: E402
from kerastl.sampling import few_shot  # noqa: E402


# The demo's network and source pretraining (``kerastl demo`` runs the same).
from kerastl.pretrained import pretrain, small_cnn  # noqa: E402,F401


def labelled(x, y, per_class, seed):
    """``per_class`` images of every class (kerastl's one sampler)."""
    idx = few_shot(y, per_class, seed)
    return x[idx], y[idx]


def accuracy(model, train, test, epochs=40):
    model.compile(keras.optimizers.Adam(1e-3),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*train, batch_size=10, epochs=epochs, verbose=0)
    return model.evaluate(*test, verbose=0)[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--source-samples", type=int, default=4000)
    parser.add_argument("--source-epochs", type=int, default=10)
    args = parser.parse_args(argv)
    start = time.time()
    keras.utils.set_random_seed(0)
    backbone = small_cnn()
    source = pretrain(backbone, args.source_samples, args.source_epochs)
    weights = backbone.get_weights()
    xtr, ytr = datasets.digits("train")
    test = datasets.digits("test")
    print(f"source: syn_digits x{args.source_samples}, "
          f"{args.source_epochs} epochs; source-only accuracy on the target "
          f"test set: {source.evaluate(*test, verbose=0)[1]:.3f}\n")
    variants = ("frozen + head", "fine-tune", "AdaBN + fine-tune", "scratch")
    print(f"{'labels/class':>12}" + "".join(f"{v:>20}" for v in variants))
    results = {}
    for k in args.per_class:
        scores = {v: [] for v in variants}
        for seed in range(args.seeds):
            train = labelled(xtr, ytr, k, seed)
            for v in variants:
                keras.utils.set_random_seed(seed)
                if v == "scratch":
                    model = kerastl.build_classifier(small_cnn(), 10,
                                                     freeze=False, bn="train")
                else:
                    net = small_cnn()
                    net.set_weights(weights)
                    if v.startswith("AdaBN"):
                        kerastl.adaptation.adapt_batch_norm(net, train[0])
                    model = kerastl.build_classifier(
                        net, 10, freeze=v.startswith("frozen"))
                scores[v].append(accuracy(model, train, test))
        print(f"{k:>12}" + "".join(
            f"{np.mean(s):>13.3f} +-{np.std(s):.2f}" for s in scores.values()),
            flush=True)
        results[k] = {v: float(np.mean(s)) for v, s in scores.items()}
    print(f"\n{time.time() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
